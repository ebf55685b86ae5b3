"""How much of each UltraEdit turn survives in bf16 weights, with and without the float32 delta.

Edits SmolLM2-135M (bf16) with real ZsRE requests, the model family's default preset and one lr,
three ways from the same base model:

* ``weights``: each turn's shift rounded and added to the bf16 weights
  (``UltraEditor(..., delta_accumulation="weights")``);
* ``float32``: the cumulative shift kept in float32 and written as ``round(W_base + delta)`` (the
  default);
* ``reference``: the same model in float32 (no rounding at all).

Per turn (all edit modules together): the intended shift norm ``|dW|``, the applied norm
``|W_after - W_before|`` and the surviving fraction ``<W_after - W_before, dW> / |dW|^2``. At the
end: the cosine and norm ratio of each bf16 run's total weight change with the float32 run's, and
with its own intended total (the sum of its turns' shifts).

    python diagnostics/bf16_survival.py --data $ULTRAEDIT_DATA/zsre-500.json --turns 4 --turn-size 10 \
        --lr 1e-4 --out diagnostics/results/bf16-survival-smollm2-lr1e-4.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from itertools import islice

import torch

from ultraedit import EditConfig, UltraEditor
from ultraedit.datasets import read_requests
from ultraedit.editor import LostShiftWarning
from ultraedit.models import load_model


def run(model_path: str, dtype: str, mode: str, turns: list, lr: float) -> dict:
    model, tokenizer = load_model(model_path, "cpu", dtype)
    editor = UltraEditor(model, EditConfig(lr=lr), tokenizer, delta_accumulation=mode)
    base = {n: m.weight.detach().float().clone() for n, m in editor.modules.items()}
    intended = {n: torch.zeros_like(w) for n, w in base.items()}
    per_turn = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LostShiftWarning)
        for requests in turns:
            before = {n: m.weight.detach().float().clone() for n, m in editor.modules.items()}
            pending = editor.prepare(*_batches(editor, requests))
            pending.requests = requests
            editor.commit(pending)
            dot = squared = applied = 0.0
            for name, module in editor.modules.items():
                shift = pending.shifts[name].float().T
                change = module.weight.detach().float() - before[name]
                intended[name] += shift
                dot += float((change * shift).sum())
                squared += float(shift.square().sum())
                applied += float(change.square().sum())
            per_turn.append({
                "turn": editor.turns, "intended_norm": squared**0.5, "applied_norm": applied**0.5,
                "surviving_fraction": dot / squared,
            })
    change = torch.cat([(m.weight.detach().float() - base[n]).flatten() for n, m in editor.modules.items()])
    total = torch.cat([intended[n].flatten() for n in editor.modules])
    return {
        "mode": mode, "dtype": dtype, "modules": list(editor.modules), "turns": per_turn,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, LostShiftWarning)],
        "change": change, "intended_total": total,
    }


def _batches(editor: UltraEditor, requests: list) -> tuple:
    from ultraedit.core.batching import minibatches

    batches, order = minibatches(editor.tokenizer, requests, editor.config.capture_batch_size)
    return batches, order


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", required=True, help="a ZsRE file (docs/datasets.md)")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--turn-size", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reader = read_requests(args.data, "zsre", skip_invalid=True)
    with reader:
        requests = list(islice(reader, args.turns * args.turn_size))
    turns = [requests[i : i + args.turn_size] for i in range(0, len(requests), args.turn_size)]
    began = time.perf_counter()
    runs = {mode: run(args.model, "bfloat16", mode, turns, args.lr) for mode in ("weights", "float32")}
    reference = run(args.model, "float32", "float32", turns, args.lr)
    result = {
        "model": args.model, "data": args.data, "lr": args.lr, "turns": args.turns, "turn_size": args.turn_size,
        "preset_modules": reference["modules"], "device": "cpu", "threads": args.threads,
        "reference_float32_turns": reference["turns"],
    }
    for mode, data in runs.items():
        fractions = [t["surviving_fraction"] for t in data["turns"]]
        result[f"bf16_{mode}"] = {
            "turns": data["turns"],
            "surviving_fraction_mean": sum(fractions) / len(fractions),
            "surviving_fraction_min": min(fractions),
            "total_change_vs_float32_run": {
                "cosine": cosine(data["change"], reference["change"]),
                "norm_ratio": float(data["change"].double().norm() / reference["change"].double().norm()),
            },
            "total_change_vs_own_intended_total": {
                "cosine": cosine(data["change"], data["intended_total"]),
                "norm_ratio": float(data["change"].double().norm() / data["intended_total"].double().norm()),
            },
            "lost_shift_warnings": len(data["warnings"]),
        }
    result["seconds"] = round(time.perf_counter() - began, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
