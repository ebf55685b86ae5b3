"""The ``ultraedit`` command line: the only place argparse lives.

One module per command group, each with ``add_parsers(subparsers)`` setting ``func`` (called with
the parsed arguments, returning an exit code); this file only assembles them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .. import __version__
from . import bench, demo, models, presets, serve, session


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ultraedit", description="Lifelong knowledge editing of Hugging Face causal LMs (UltraEdit)."
    )
    parser.add_argument("--version", action="version", version=f"ultraedit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (demo, session, bench, models, presets, serve):
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
