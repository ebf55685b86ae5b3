"""What every command shares: the user-error type and its reporting, model options and loading."""

from __future__ import annotations

import argparse
import sys
from typing import Any

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A user-facing error: printed as ``ultraedit <command>: error: ...``, exit code 2."""


def reporting(func: Any) -> Any:
    """Turn the library's input errors into one clear line on stderr and exit code 2."""

    def run(args: argparse.Namespace) -> int:
        from ..configs import ConfigError
        from ..contexts import ContextError
        from ..core.batching import EditError
        from ..datasets import DatasetError
        from ..models import ModelError
        from ..session import StateError

        try:
            return int(func(args) or 0)
        except (CliError, ConfigError, ContextError, StateError, DatasetError, EditError, ModelError) as err:
            print(f"ultraedit {args.command}: error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT

    return run


def state_dtype(state_dir: str) -> str | None:
    """The dtype the saved state's base model was edited in (None if there is no state)."""
    from ..session import has_state, read_state

    if not has_state(state_dir):
        return None
    dtypes = {m["dtype"] for m in read_state(state_dir)[0]["fingerprint"]["modules"].values()}
    return dtypes.pop() if len(dtypes) == 1 else None


def load_model(spec: str, device: str, dtype: str, *, tokenizer: bool = True) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``--model`` (:func:`ultraedit.models.load_model`); errors are CliErrors."""
    from ..models import ModelError, load_model as load

    try:
        return load(spec, device, dtype, tokenizer=tokenizer)
    except ModelError:
        raise
    except (OSError, ValueError) as err:
        raise CliError(f"cannot load --model {spec!r}: {err}") from None


MODEL_HELP = ("the BASE model: a built-in name ('smollm2-135m', fetched once; 'testbed', shipped), "
              "a .gguf file, a Hugging Face directory or a hub id")


def model_args(p: argparse.ArgumentParser, *, default: str | None = None) -> None:
    """``--model``, ``--device``, ``--dtype``."""
    if default is None:
        p.add_argument("--model", required=True, help=MODEL_HELP)
    else:
        p.add_argument("--model", default=default, help=f"{MODEL_HELP} (default {default})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available; default)")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="model dtype; auto = the saved state's, else the checkpoint's",
    )


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def config_args(p: argparse.ArgumentParser, *, new: str = "") -> None:
    """``--config``, ``--set``, ``--modules`` / ``--preset`` and ``--lr`` (``new``: "of a NEW state" in the help)."""
    from ..configs import names

    p.add_argument("--config", metavar="NAME|FILE",
                   help=f"configuration{new}: {', '.join(names())}, or a JSON file (default: recommended; the "
                   "testbed's own for --model testbed; 'ultraedit presets' lists them)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="override one field of the configuration (repeatable), e.g. --set refine.steps=3, "
                   "--set paraphrases.count=2, --set subject=null")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--modules", nargs="+", metavar="NAME",
                       help=f"edit modules{new} (dotted names, space or comma separated)")
    group.add_argument("--preset", help=f"edit-module preset{new} (see 'ultraedit presets')")
    p.add_argument("--lr", type=float, help=f"step size{new} (default: the configuration's)")


def modules_arg(values: list[str] | None) -> list[str] | None:
    """``--modules`` values, commas allowed."""
    if not values:
        return None
    return [m for v in values for m in v.split(",") if m]


def check_preset(preset: str | None) -> None:
    from ..core.presets import PRESETS

    if preset is not None and preset not in PRESETS:
        raise CliError(f"--preset {preset!r} is unknown; known: {', '.join(sorted(PRESETS))} (see 'ultraedit presets')")


def resolve_config(args: argparse.Namespace, model: Any, say: Any = None) -> Any:
    """The :class:`EditConfig` the command line asks for on ``model`` (:func:`ultraedit.configs.resolve`);
    each stage left out is said on stderr (or to ``say``)."""
    from ..configs import default_for, resolve

    resolved = resolve(args.config or default_for(args.model), model, modules=modules_arg(args.modules),
                       preset=args.preset, lr=args.lr, sets=args.sets)
    for note in resolved.notes:
        (say or (lambda line: print(line, file=sys.stderr)))(f"ultraedit {args.command}: configuration {note}")
    return resolved.config


def config_given(args: argparse.Namespace) -> bool:
    return bool(args.config or args.sets or args.modules or args.preset or args.lr is not None)


def check_resumed(saved: dict[str, Any], args: argparse.Namespace, model: Any) -> None:
    """A resumed session keeps its configuration: refuse command-line choices that differ from it
    (``--config`` is compared whole; ``--set``, ``--lr``, ``--modules``, ``--preset`` each)."""
    if not config_given(args):
        return
    from ..config import EditConfig
    from ..configs import apply_sets
    from ..core.presets import resolve_modules

    have = EditConfig.from_dict(saved).to_dict()
    if args.config:
        asked = resolve_config(args, model, say=lambda line: None).to_dict()
    else:
        data = apply_sets(have, args.sets)
        if args.lr is not None:
            data["lr"] = args.lr
        asked = EditConfig.from_dict(data).to_dict()
    modules, preset = asked.pop("modules"), asked.pop("preset")
    saved_modules = have.pop("modules")
    have.pop("preset")
    differ = [f"{k}={asked.get(k)!r} (saved {have.get(k)!r})" for k in sorted(set(asked) | set(have))
              if asked.get(k) != have.get(k)]
    if (args.modules or args.preset) and (modules or resolve_modules(model, preset)) != saved_modules:
        differ.append(f"modules (saved {saved_modules})")
    if differ:
        raise CliError(f"the configuration asked for differs from the saved state's: {'; '.join(differ)}; a lifelong "
                       "session keeps its configuration (use a new --state directory to change it)")
