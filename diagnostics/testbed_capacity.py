"""Why the testbed model cannot hold 2,000 UltraEdit edits: its key space, as JSON on stdout.

UltraEdit writes each edit into ``dW = K^T (K K^T + lambda I)^-1 V``: a new fact is a new key row.
An edit leaves other facts alone only to the extent that their keys are orthogonal to the keys
written, and every later turn writes new rows into the same key space. This script measures,
on the shipped testbed model:

* ``key_space``: per layer's ``mlp.down_proj`` (the preset's modules), over the keys of the first
  N edit prompts at their last token (where a one-token answer is read): ``d_in``, the
  participation ratio and the number of directions holding 90% / 99% of the key energy, and the
  mean cosine of an edit's key with its neighbour probe (same relation, same old answer) and with
  an unrelated probe;
* ``lifelong``: for the testbed's configuration (or ``--config``), after turns 1, 5, 10, 20 (of 100 edits): ``|W - W0| / |W0|`` per
  module, how coherently the turns' shifts add (``|sum dW| / sqrt(sum |dW|^2)``: 1 = a random
  walk), the efficacy of turn 1's edits and the accuracy on unrelated probes.

    python diagnostics/testbed_capacity.py                 # 3,000 prompts, the testbed configuration
    python diagnostics/testbed_capacity.py --prompts 2000 --config faithful --lr 2e-3
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ultraedit import EditConfig, UltraEditor, configuration
from ultraedit.evaluation import score_pairs
from ultraedit.testbed import load_requests, load_testbed


def last_token_inputs(model, tokenizer, prompts: list[str], module: torch.nn.Module) -> torch.Tensor:
    """``module``'s input at each prompt's last token, ``(len(prompts), d_in)``."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            model(**enc)
    finally:
        handle.remove()
    last = enc["attention_mask"].sum(1) - 1  # right padding
    return seen[0][torch.arange(len(prompts)), last].float()


def key_space(model, tokenizer, requests, layers: int) -> list[dict]:
    cos = torch.nn.functional.cosine_similarity
    rows = []
    for layer in range(layers):
        module = model.get_submodule(f"model.layers.{layer}.mlp.down_proj")
        keys = last_token_inputs(model, tokenizer, [r.prompt for r in requests], module)
        neighbours = last_token_inputs(model, tokenizer, [r.locality[0][0] for r in requests], module)
        others = last_token_inputs(model, tokenizer, [r.locality[-1][0] for r in requests], module)
        energy = torch.linalg.svdvals(keys).square()
        share = energy.cumsum(0) / energy.sum()
        rows.append({
            "module": f"model.layers.{layer}.mlp.down_proj",
            "d_in": keys.shape[1],
            "participation_ratio": round(float(energy.sum() ** 2 / energy.square().sum()), 1),
            "directions_90pct_energy": int((share < 0.9).sum()) + 1,
            "directions_99pct_energy": int((share < 0.99).sum()) + 1,
            "cos_edit_neighbour": round(float(cos(keys, neighbours, dim=-1).mean()), 3),
            "cos_edit_unrelated": round(float(cos(keys, others, dim=-1).mean()), 3),
        })
    return rows


def lifelong(model, tokenizer, requests, config: EditConfig, turn_size: int) -> list[dict]:
    editor = UltraEditor(model, config, tokenizer)
    base = {n: m.weight.detach().clone() for n, m in editor.modules.items()}
    squares = {n: 0.0 for n in base}
    first = requests[:turn_size]
    unrelated = [r.locality[-1] for r in requests]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    out = []
    turns = len(requests) // turn_size
    for t in range(turns):
        before = {n: m.weight.detach().clone() for n, m in editor.modules.items()}
        editor.edit(requests[t * turn_size : (t + 1) * turn_size])
        for n, m in editor.modules.items():
            squares[n] += float((m.weight.detach() - before[n]).norm() ** 2)
        if t + 1 in (1, 5, 10, 20) or t + 1 == turns:
            out.append({
                "turns": t + 1,
                "relative_weight_change": {n: round(float((m.weight.detach() - base[n]).norm() / base[n].norm()), 3)
                                           for n, m in editor.modules.items()},
                "coherence": {n: round(float((m.weight.detach() - base[n]).norm()) / squares[n] ** 0.5, 2)
                              for n, m in editor.modules.items()},
                "turn1_efficacy": round(mean(score_pairs(model, tokenizer, [(r.prompt, r.target) for r in first])["accuracy"]), 3),
                "unrelated_accuracy": round(mean(score_pairs(model, tokenizer, unrelated, batch_size=256)["accuracy"]), 3),
            })
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=3000, help="edit prompts whose keys are measured")
    parser.add_argument("--edits", type=int, default=2000)
    parser.add_argument("--turn-size", type=int, default=100)
    parser.add_argument("--config", default="testbed", help="a named configuration (default testbed)")
    parser.add_argument("--lr", type=float, default=None, help="its step size (default: the configuration's)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_testbed()
    config = configuration(args.config, model, preset="testbed", lr=args.lr).config
    requests = load_requests(max(args.prompts, args.edits))
    report = {
        "benchmark": "testbed_capacity",
        "prompts": args.prompts,
        "key_space": key_space(model, tokenizer, requests[: args.prompts], model.config.num_hidden_layers),
        # one key row per answer token: what the edits write into each module's key space
        "edit_key_rows": sum(len(tokenizer(" " + r.target, add_special_tokens=False)["input_ids"])
                             for r in requests[: args.edits]),
        "lifelong": lifelong(model, tokenizer, requests[: args.edits], config, args.turn_size),
        "config": {"configuration": args.config, **config.to_dict()},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
