"""The package's shape, checked like its behaviour: the import contract (``.importlinter``: floors,
a core that imports nothing else of ours, stages independent of each other) and file sizes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "ultraedit"


def test_the_import_contract_holds():
    """``lint-imports`` (import-linter, installed with the test extras) over ``.importlinter``: a new
    import circle, an upward import or a stage importing another fails here, and so in CI. Run with
    this interpreter (``importlinter.cli``), so that a ``lint-imports`` script of another environment
    on ``PATH`` cannot stand in for it."""
    if importlib.util.find_spec("importlinter") is None:
        pytest.fail("import-linter is missing: install the test extras (pip install -e '.[test]')")
    run = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    done = subprocess.run([sys.executable, "-c", run, "--config", str(ROOT / ".importlinter")], cwd=ROOT,
                          capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_no_source_file_is_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in SOURCE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"split these by concern: {long}"
