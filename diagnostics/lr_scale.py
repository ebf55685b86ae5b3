"""Measure how the target values V = -lr * ||K_hat||^2 * G_hat scale with a module's shape.

For each edit module shape (d_in, d_out) this captures one turn and reports the mean over rows of
||K_hat||^2 / d_in, ||G_hat|| / sqrt(d_out) and ||V_row|| / (lr * d_in * sqrt(d_out)), plus the
relative output change ||K dW|| / ||K W|| at the authors' lr 1e-6, raw and with lr_scale="width".
If the three ratios stay near 1 across shapes, ||V_row|| grows as d_in * sqrt(d_out), and
lr_scale="width" (lr * 4096 sqrt(14336) / (d_in sqrt(d_out))) gives every shape the row norm the
authors' lr gives Llama-3-8B's MLP projections (4096 -> 14336).

    python diagnostics/lr_scale.py --model smollm2-135m --data $ULTRAEDIT_DATA/zsre-500.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ultraedit import EditConfig
from ultraedit.core.batching import minibatches
from ultraedit.core.capture import capture
from ultraedit.datasets import read_requests
from ultraedit.models import load_model
from ultraedit.core.normalizer import LifelongNormalizer
from ultraedit.core.solver import ridge_solve, target_values


def measure(model, batches, names) -> list[dict]:
    modules = {n: model.get_submodule(n) for n in names}
    caps = capture(model, modules, batches)
    rows = []
    for name, module in modules.items():
        keys = torch.cat([c.keys[name] for c in caps])
        grads = torch.cat([c.grads[name] for c in caps])
        d_in, d_out = keys.shape[1], grads.shape[1]
        norm = LifelongNormalizer(d_in + d_out)
        for c in caps:
            norm.update(torch.cat((c.keys[name], c.grads[name]), -1))
        z = norm.normalize(torch.cat((keys, grads), -1))
        values = target_values(keys, grads, norm, 1.0)
        out = keys @ module.weight.detach().T
        row = {"module": name, "d_in": d_in, "d_out": d_out, "rows": keys.shape[0],
               "k_hat_sq_over_d_in": float(z[:, :d_in].square().sum(1).mean() / d_in),
               "g_hat_norm_over_sqrt_d_out": float(z[:, d_in:].norm(dim=1).mean() / math.sqrt(d_out)),
               "v_norm_over_lr_din_sqrt_dout": float(values.norm(dim=1).mean() / (d_in * math.sqrt(d_out)))}
        for scale in ("none", "width"):
            lr = EditConfig(lr=1e-6, lr_scale=scale).module_lr((d_in, d_out))
            shift = ridge_solve(keys, values * lr, 1.0)
            row[f"relative_output_change_lr1e-6_{scale}"] = float((keys @ shift).norm() / out.norm())
        rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", required=True, help="a ZsRE file (docs/datasets.md)")
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--out", default=str(ROOT / "diagnostics" / "results" / "lr-scale-by-module-shape.json"))
    args = p.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model(args.model, "cpu")
    reqs = [r for _, r in zip(range(args.requests), read_requests(args.data, skip_invalid=True))]
    batches, _ = minibatches(tok, reqs, 10)
    layers = model.config.num_hidden_layers
    names = [f"model.layers.{layers // 2}.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")]
    rows = measure(model, batches, names)
    Path(args.out).write_text(json.dumps({"model": args.model, "requests": args.requests, "modules": rows}, indent=1) + "\n")
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
