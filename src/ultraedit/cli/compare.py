"""``ultraedit compare``: one Markdown table and one plot across ``ultraedit bench`` result directories."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _compare_command(args: argparse.Namespace) -> int:
    from ..compare import CompareError, load_runs, markdown_table, plot_runs

    try:
        runs = load_runs(args.dirs)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        table = markdown_table(runs)
        (out / "comparison.md").write_text(table)
        plot_runs(runs, out / "comparison.png")
    except (CompareError, OSError) as err:
        print(f"ultraedit compare: error: {err}", file=sys.stderr)
        return 2
    print(table, end="")
    print(f"wrote {out / 'comparison.md'}, {out / 'comparison.png'}")
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "compare", help="one table and one plot across 'ultraedit bench' result directories",
        description="Read DIR/results.json of each bench run; write OUT/comparison.md (ES/GS/LS, seconds per "
        "edit, edits/s, peak memory, key-statistics build time) and OUT/comparison.png.",
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="'ultraedit bench --out' directories")
    p.add_argument("--out", default=".", metavar="OUT", help="where to write comparison.md and .png (default .)")
    p.set_defaults(func=_compare_command)
