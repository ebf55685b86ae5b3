"""``ultraedit bench``: the lifelong editing benchmark (:mod:`ultraedit.bench`) from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..bench import DATASETS, METHODS, RUN_ERRORS, BenchConfig, BenchError, markdown, run
from ..configs import ConfigError
from ..contexts import CONTEXTS, ContextError
from ..judge import JudgeError
from ..core.batching import EditError
from ..datasets import DatasetError
from ..models import DTYPES, ModelError
from .common import CliError, check_preset, config_args, modules_arg


def _options_arg(values: list[str]) -> dict[str, str] | None:
    options = {}
    for value in values:
        key, sep, raw = value.partition("=")
        if not sep or not key:
            raise BenchError(f"--method-option expects KEY=VALUE, got {value!r}")
        options[key.strip()] = raw.strip()
    return options or None


def add_parsers(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``ultraedit bench`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "bench",
        help="run the lifelong editing benchmark (T turns of N edits, then evaluate every edit)",
        description="Lifelong editing benchmark: edit T turns of N requests, evaluate every edited request, "
        "write DIR/results.json, DIR/results.md and DIR/curve.png.",
    )
    p.add_argument("--model", default="testbed",
                   help="Hugging Face name or local path, a built-in or 'testbed' (default: the built-in testbed model)")
    p.add_argument("--dataset", default="testbed", choices=DATASETS,
                   help="record format of --data (default 'testbed': the built-in testbed's edit requests)")
    p.add_argument("--data", metavar="FILE", help="dataset file (JSON list or JSON Lines, optionally .gz)")
    p.add_argument("--turns", type=int, default=20, metavar="T", help="number of turns (default 20)")
    p.add_argument("--turn-size", type=int, default=100, metavar="N", help="requests per turn (default 100)")
    p.add_argument("--batch-size", type=int, default=10, help="requests per minibatch (default 10)")
    config_args(p)
    p.add_argument("--eval-every", type=int, default=None, metavar="K", help="also evaluate after every K turns")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="dtype to load the model in")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="ultraedit", choices=sorted(METHODS), help="editing method")
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a baseline's hyperparameter (repeatable), e.g. --method-option v_num_grad_steps=10")
    p.add_argument("--skip-invalid", action="store_true", help="skip malformed records (listed in DIR/rejects.jsonl)")
    p.add_argument("--eval-batch-size", type=int, default=64, help="sequences per evaluation forward (default 64)")
    p.add_argument("--eval-max-tokens", type=int, default=16384,
                   help="padded tokens per evaluation forward, bounds logits memory (default 16384)")
    p.add_argument("--forward-batch-size", type=int, default=100,
                   help="requests per UltraEdit forward/backward; speed/memory only, same results (default 100)")
    p.add_argument("--eval-context", action="append", choices=CONTEXTS, metavar="CONTEXT",
                   help="ask the generation-based evaluation in this context (repeatable): plain, qa or chat "
                   "(default: plain, and chat where the model has a chat template)")
    p.add_argument("--no-generation", action="store_true",
                   help="teacher-forced scores only (no greedy generation before and after editing)")
    p.add_argument("--judge", metavar="URL",
                   help="also grade each generation CORRECT/INCORRECT through this OpenAI-compatible endpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=_command)
    return p


def _command(args: argparse.Namespace) -> int:
    try:
        check_preset(args.preset)
        config = BenchConfig(
            model=args.model, dataset=args.dataset, data=args.data, out=args.out, turns=args.turns,
            turn_size=args.turn_size, batch_size=args.batch_size, config=args.config, sets=list(args.sets),
            lr=args.lr, modules=modules_arg(args.modules), preset=args.preset, eval_every=args.eval_every,
            device=args.device, dtype=args.dtype, seed=args.seed, method=args.method, skip_invalid=args.skip_invalid,
            eval_batch_size=args.eval_batch_size, eval_max_tokens=args.eval_max_tokens,
            forward_batch_size=args.forward_batch_size, progress=not args.quiet,
            method_options=_options_arg(args.method_option), generation=not args.no_generation,
            contexts=args.eval_context, judge=args.judge,
        )
        results = run(config)
    except (*RUN_ERRORS, CliError, ConfigError, ContextError, JudgeError, DatasetError, EditError, ModelError, OSError) as err:  # user errors
        print(f"ultraedit bench: error: {err}", file=sys.stderr)
        return 2
    print(markdown(results), end="")
    print(f"wrote {Path(args.out) / 'results.json'}, results.md, curve.png")
    return 0
