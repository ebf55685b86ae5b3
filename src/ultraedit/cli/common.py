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
        from ..batching import EditError
        from ..datasets import DatasetError
        from ..models import ModelError
        from ..state import StateError

        try:
            return int(func(args) or 0)
        except (CliError, StateError, DatasetError, EditError, ModelError) as err:
            print(f"ultraedit {args.command}: error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT

    return run


def state_dtype(state_dir: str) -> str | None:
    """The dtype the saved state's base model was edited in (None if there is no state)."""
    from ..state import has_state, read_state

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
