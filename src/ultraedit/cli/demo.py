"""``ultraedit demo`` and ``ultraedit testbed train``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..testbed.demo import run_demo

def _demo_command(args: argparse.Namespace) -> int:
    from ..testbed import TESTBED_CONFIG

    config = TESTBED_CONFIG
    if args.lr is not None:
        config = replace(config, lr=args.lr)
    try:
        scores = run_demo(edits=args.edits, turn_size=args.turn_size, show=args.show, config=config,
                          device=args.device, data_dir=args.data_dir, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as err:
        print(f"ultraedit demo: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(scores, indent=2) + "\n")
    return 0


def _train_command(args: argparse.Namespace) -> int:
    from ..testbed.train import TrainConfig, train_testbed

    kw = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "seed", "threads") if getattr(args, k) is not None}
    summary = train_testbed(args.out, TrainConfig(**kw), progress=not args.quiet)
    print(f"wrote {args.out}: {summary['parameters']} parameters, {summary['weights_bytes'] / 1e6:.2f} MB weights, "
          f"{summary['seconds']:.0f} s; token accuracy on trained facts {summary['train_accuracy']:.3f}, "
          f"on held-out paraphrases {summary['heldout_accuracy']:.3f}")
    return 0


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def add_parsers(subparsers: Any) -> None:
    """Register ``ultraedit demo`` and ``ultraedit testbed train`` on the CLI's subparsers."""
    demo = subparsers.add_parser(
        "demo", help="edit the built-in testbed model (no download) and show before/after and ES/GS/LS",
        description="Edit a model, show answers before/after and ES/GS/LS.",
    )
    demo.add_argument("--edits", type=_positive, default=300, help="edit requests to apply (default 300)")
    demo.add_argument("--turn-size", type=_positive, default=100, help="requests per lifelong turn (default 100)")
    demo.add_argument("--show", type=int, default=3, help="edits to show before/after (default 3)")
    demo.add_argument("--lr", type=float, default=None, help="override the testbed preset's lr")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--data-dir", default=None, help="a directory from 'ultraedit testbed train' (default: shipped)")
    demo.add_argument("--json", default=None, metavar="PATH", help="also write the scores as JSON")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo_command)

    testbed = subparsers.add_parser("testbed", help="the built-in knowledge testbed (train it again)")
    tsub = testbed.add_subparsers(dest="testbed_command", required=True, metavar="ACTION")
    train = tsub.add_parser("train", help="generate the world and train the testbed tokenizer and model (CPU, seeded)")
    train.add_argument("--out", required=True, help="output directory (the shipped one is ultraedit/testbed/data)")
    train.add_argument("--steps", type=_positive, default=None)
    train.add_argument("--batch-size", type=_positive, default=None)
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--threads", type=_positive, default=None, help="torch threads (default 1: repeatable)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_train_command)
