"""``ultraedit bench``: the lifelong editing benchmark (:mod:`ultraedit.bench`) from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..batching import EditError
from ..bench import DATASETS, EDIT_OPTIONS, METHODS, BenchConfig, BenchError, markdown, run
from ..datasets import DatasetError
from ..editor import PRESERVE_TEXTS, EditConfig
from ..models import DTYPES, ModelError
from ..subject_values import STOP_RULES

def _modules_arg(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [m for v in values for m in v.split(",") if m]


def _options_arg(values: list[str]) -> dict[str, str] | None:
    options = {}
    for value in values:
        key, sep, raw = value.partition("=")
        if not sep or not key:
            raise BenchError(f"--method-option expects KEY=VALUE, got {value!r}")
        options[key.strip()] = raw.strip()
    return options or None


#: ``bench`` flags that override one :class:`EditConfig` option: (field, type, metavar, what it is).
_OPTION_FLAGS = (
    ("refine_steps", int, "S", "closed-form steps per turn"),
    ("preserve", float, "ALPHA", "weight of generic-text keys in the ridge"),
    ("memory", float, "BETA", "weight of earlier turns' keys in the ridge"),
    ("confidence", float, "P", "refinement: target probability a request must reach"),
    ("neighbours", int, "N", "subject-swapped prompts preserved per request"),
    ("neighbour_weight", float, "W", "weight of the neighbour prompts' keys in the ridge"),
    ("prefixes", int, "N", "context-prefixed copies edited per request"),
    ("paraphrases", int, "N", "rewordings the model samples itself, edited per request"),
    ("subject_keys", float, "W", "weight of the rows at the subject's last token; 0 = off"),
    ("subject_depth", float, "F", "modules below this fraction of the layers edit at the subject"),
    ("key_outliers", float, "R", "rows with keys over R x the median norm are kept, not edited"),
    ("subject_steps", int, "S", "first S refinement steps edit only the subject rows (lower modules)"),
    ("subject_optimise", int, "N", "Adam steps optimising the subject rows' values (ROME/MEMIT's z); 0 = off"),
    ("subject_clamp", float, "C", "optimised subject change at most C x the hidden state's norm"),
    ("subject_kl", float, "W", "weight of the KL term keeping '{subject} is a' (ROME/MEMIT's essence)"),
    ("subject_contexts", int, "N", "the subject search also runs each prompt behind N generic sentences"),
    ("subject_preserve", float, "F", "modules below subject_depth weigh the generic-text keys F times as much"),
)


def add_parsers(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``ultraedit bench`` on an ``argparse`` subparsers object."""
    from ..presets import PRESETS

    p = subparsers.add_parser(
        "bench",
        help="run the lifelong editing benchmark (T turns of N edits, then evaluate every edit)",
        description="Lifelong editing benchmark: edit T turns of N requests, evaluate every edited request, "
        "write DIR/results.json, DIR/results.md and DIR/curve.png.",
    )
    p.add_argument("--model", default="testbed",
                   help="Hugging Face name or local path, or 'testbed' (default: the built-in testbed model)")
    p.add_argument("--dataset", default="testbed", choices=DATASETS,
                   help="record format of --data (default 'testbed': the built-in testbed's edit requests)")
    p.add_argument("--data", metavar="FILE", help="dataset file (JSON list or JSON Lines, optionally .gz)")
    p.add_argument("--turns", type=int, default=20, metavar="T", help="number of turns (default 20)")
    p.add_argument("--turn-size", type=int, default=100, metavar="N", help="requests per turn (default 100)")
    p.add_argument("--batch-size", type=int, default=10, help="requests per minibatch (default 10)")
    p.add_argument("--lr", type=float, default=None, help=f"step size (default {EditConfig.lr})")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--modules", nargs="+", metavar="NAME", help="edit modules (dotted names, space or comma separated)")
    group.add_argument("--preset", choices=sorted(PRESETS), help="edit-module preset (default: the model family's)")
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
    p.add_argument("--faithful", action="store_true",
                   help="the authors' exact method (their lr 1e-6 and family preset); default: the model's "
                   "recommended configuration (EditConfig.recommended, see 'ultraedit presets')")
    for name, kind, metavar, what in _OPTION_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, metavar=metavar,
                       help=f"override EditConfig.{name} ({what})")
    p.add_argument("--lr-scale", choices=("none", "width"), default=None, help="override EditConfig.lr_scale")
    p.add_argument("--preserve-text", choices=PRESERVE_TEXTS, default=None,
                   help="override EditConfig.preserve_text (the text the preserved generic keys come from)")
    p.add_argument("--subject-stop", choices=STOP_RULES, default=None,
                   help="override EditConfig.subject_stop (when a request's subject search stops)")
    p.add_argument("--preserve-base", type=float, default=None,
                   help="override EditConfig.preserve_base (weight of the unedited model's outputs at the generic keys)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=_command)
    return p


def _command(args: argparse.Namespace) -> int:
    try:
        config = BenchConfig(
            model=args.model, dataset=args.dataset, data=args.data, out=args.out, turns=args.turns,
            turn_size=args.turn_size, batch_size=args.batch_size, lr=args.lr, modules=_modules_arg(args.modules),
            preset=args.preset, eval_every=args.eval_every, device=args.device, dtype=args.dtype, seed=args.seed,
            method=args.method, skip_invalid=args.skip_invalid, eval_batch_size=args.eval_batch_size,
            eval_max_tokens=args.eval_max_tokens, forward_batch_size=args.forward_batch_size,
            progress=not args.quiet, faithful=args.faithful, method_options=_options_arg(args.method_option),
            **{name: getattr(args, name) for name in EDIT_OPTIONS},
        )
        results = run(config)
    except (BenchError, DatasetError, EditError, ModelError, OSError) as err:  # user errors; bugs keep their traceback
        print(f"ultraedit bench: error: {err}", file=sys.stderr)
        return 2
    print(markdown(results), end="")
    print(f"wrote {Path(args.out) / 'results.json'}, results.md, curve.png")
    return 0
