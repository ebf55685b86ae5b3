"""``ultraedit models``: list the built-in models; ``ultraedit models pull NAME`` fetches one."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .common import human_bytes, reporting


@reporting
def _list_command(args: argparse.Namespace) -> int:
    from ..models import cache_dir, list_models

    rows = list_models()
    if args.json:
        print(json.dumps({"cache": str(cache_dir()), "models": rows}, indent=1))
        return 0
    print(f"{'name':14s} {'family':11s} {'parameters':>10s} {'download':>9s}  {'cached':6s}  path")
    for row in rows:
        size = human_bytes(row["download_bytes"]) if row["download_bytes"] else "-"
        print(f"{row['name']:14s} {row['family']:11s} {row['parameters'] / 1e6:9.1f}M {size:>9s}  "
              f"{'yes' if row['cached'] else 'no':6s}  {row['path'] or '(in the package)'}")
    print(f"cache: {cache_dir()} (set ULTRAEDIT_CACHE to move it)")
    return 0


@reporting
def _pull_command(args: argparse.Namespace) -> int:
    from ..models import BUILTINS, TESTBED, ModelError, is_cached, pull

    if args.name == TESTBED:
        print("testbed ships in the package; nothing to fetch")
        return 0
    if args.name not in BUILTINS:
        raise ModelError(f"unknown built-in model {args.name!r}; built-ins: {', '.join(sorted(BUILTINS))}")
    was_cached = is_cached(args.name)
    path = pull(args.name, say=(lambda line: None) if args.json else None)
    if args.json:
        print(json.dumps({"name": args.name, "path": str(path), "fetched": not was_cached}))
    else:
        print(f"{args.name}: {'already cached' if was_cached else 'fetched'} at {path}", file=sys.stdout)
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("models", help="list the built-in models (and 'models pull NAME' to fetch one)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_list_command)
    actions = p.add_subparsers(dest="models_command", metavar="ACTION")
    pull = actions.add_parser("pull", help="fetch and convert a built-in model into the cache (once)")
    pull.add_argument("name", help="built-in model name (see 'ultraedit models')")
    pull.add_argument("--json", action="store_true", help="machine-readable output")
    pull.set_defaults(func=_pull_command)
