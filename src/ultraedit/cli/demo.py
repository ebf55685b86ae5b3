"""``ultraedit demo`` and ``ultraedit testbed train``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..models import DTYPES
from .common import EXIT_BAD_INPUT


def _demo_command(args: argparse.Namespace) -> int:
    from ..configs import ConfigError
    from ..demo import run_demo
    from ..models import ModelError

    try:
        scores = run_demo(args.model, edits=args.edits, turn_size=args.turn_size, show=args.show, config=args.config,
                          sets=args.sets, lr=args.lr, device=args.device, dtype=args.dtype, progress=not args.quiet)
    except ModelError as err:
        print(f"ultraedit demo: error: {err}", file=sys.stderr)
        print("ultraedit demo: 'ultraedit demo --model testbed' runs fully offline on the built-in testbed model",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"ultraedit demo: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
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
        "demo", help="edit a real model (built in, fetched once) and show before/after and ES/GS/LS",
        description="Edit a model, show answers before/after and ES/GS/LS.",
    )
    demo.add_argument("--model", default="smollm2-135m",
                      help="the model to edit (default smollm2-135m, the built-in real model, fetched once); "
                      "'testbed' for the offline toy; or any --model spec")
    demo.add_argument("--edits", type=_positive, default=None,
                      help="edit requests to apply (default: all shipped facts; the testbed's first 100)")
    demo.add_argument("--turn-size", type=_positive, default=100, help="requests per lifelong turn (default 100)")
    demo.add_argument("--show", type=int, default=3, help="edits to show before/after (default 3)")
    demo.add_argument("--config", metavar="NAME|FILE", help="configuration (default: recommended; the testbed's own "
                      "for --model testbed; 'ultraedit presets' lists them)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                      help="override one field of the configuration (repeatable), e.g. --set refine.steps=3")
    demo.add_argument("--lr", type=float, default=None, help="override the configuration's step size")
    demo.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, or auto")
    demo.add_argument("--dtype", default="auto", choices=list(DTYPES),
                      help="dtype to load a real model in (default: as stored, float32 for the built-ins)")
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
