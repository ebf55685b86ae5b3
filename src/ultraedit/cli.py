"""The ``ultraedit`` command line.

Each subcommand lives in the module of its idea and registers itself through an
``add_parser(subparsers)`` function that sets ``func`` (called with the parsed arguments and
returning an exit code). This file only assembles them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import __version__
from . import bench


def _presets_command(args: argparse.Namespace) -> int:
    from .presets import DEFAULT_PRESET, PRESETS

    defaults = {}
    for model_type, name in DEFAULT_PRESET.items():
        defaults.setdefault(name, []).append(model_type)
    for name, preset in PRESETS.items():
        ranges = ", ".join(f"layers {a}-{b} {s}" for a, b, s in preset.ranges)
        used = f" [default for {', '.join(defaults[name])}]" if name in defaults else ""
        print(f"{name:22s} {preset.reference_layers:3d} layers: {ranges}  ({preset.source}){used}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ultraedit", description="Lifelong knowledge editing of Hugging Face causal LMs (UltraEdit)."
    )
    parser.add_argument("--version", action="version", version=f"ultraedit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    presets = sub.add_parser("presets", help="list the edit-module presets per model family")
    presets.set_defaults(func=_presets_command)
    bench.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
