"""How much of an edit's change in the residual stream reaches the paraphrase (docs/research-log.md).

    python diagnostics/paraphrase_reach.py [zsre:100] ['recommended subject.search.clamp=0.6']

Edits the requests in one turn with the configuration given (default ``recommended``; the format of
``explore.py``) and compares, per request, the change
of the residual stream (edited minus unedited) on the edit prompt and on its first rephrase:

* at the subject's last token, at the input of the first layer above the subject modules (where
  the subject search writes its change: layer 13 of SmolLM2's 30);
* at the last token, after the last edit layer and after the final layer.

Prints the medians over requests of the rephrase's change projected on the prompt's (as a fraction
of the prompt's), their cosine and their norm ratio. A fraction near 1 means the paraphrase gets
the prompt's change; what falls short is the part tied to the prompt's wording.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "src"))

from explore import requests_of  # noqa: E402

from ultraedit import UltraEditor, configuration  # noqa: E402
from ultraedit.models import load_model  # noqa: E402
from ultraedit.core.anatomy import layer_index, num_layers  # noqa: E402


def subject_end(tokenizer, text: str, subject: str) -> int:
    """Index of the token holding the subject's last character (its last occurrence)."""
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    end = text.rfind(subject) + len(subject)
    return [i for i, (a, b) in enumerate(offsets) if a < end <= b][-1]


@torch.no_grad()
def states(model, tokenizer, texts, subjects, views):
    """Per view ``(name, hidden_states index, "subject"|"last")``: ``(requests, hidden)`` rows."""
    out = {name: [] for name, _, _ in views}
    for text, subject in zip(texts, subjects):
        ids = tokenizer(text)["input_ids"]
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        for name, index, where in views:
            position = subject_end(tokenizer, text, subject) if where == "subject" else len(ids) - 1
            out[name].append(hidden[index][0, position].clone())
    return {name: torch.stack(rows) for name, rows in out.items()}


def main() -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    spec = sys.argv[1] if len(sys.argv) > 1 else "zsre:100"
    fields = sys.argv[2] if len(sys.argv) > 2 else "recommended"
    requests = [r for r in requests_of(spec) if r.rephrases and r.extra.get("subject")]
    model, tokenizer = load_model(os.environ.get("MODEL", "smollm2-135m"), "cpu")
    name, *sets = fields.split()
    config = configuration(name, model, sets=sets).config
    split = config.subject.depth * num_layers(model)
    above_subject = 1 + max(layer_index(n) for n in config.modules if layer_index(n) < split)
    last_edit = 1 + max(layer_index(n) for n in config.modules)
    views = [(f"subject token, input of layer {above_subject}", above_subject, "subject"),
             (f"last token, after layer {last_edit - 1}", last_edit, "last"),
             ("last token, after the final layer and norm", num_layers(model), "last")]
    subjects = [r.extra["subject"] for r in requests]
    texts = {"prompt": [r.prompt for r in requests], "rephrase": [r.rephrases[0] for r in requests]}
    before = {k: states(model, tokenizer, t, subjects, views) for k, t in texts.items()}
    UltraEditor(model, config, tokenizer=tokenizer).edit(requests)
    after = {k: states(model, tokenizer, t, subjects, views) for k, t in texts.items()}
    for name, _, _ in views:
        prompt = after["prompt"][name] - before["prompt"][name]
        rephrase = after["rephrase"][name] - before["rephrase"][name]
        projection = (rephrase * prompt).sum(1) / prompt.norm(dim=1).square()
        relative = prompt.norm(dim=1) / before["prompt"][name].norm(dim=1)
        print(json.dumps({
            "data": spec, "config": fields, "view": name, "requests": len(requests),
            "projection": round(float(projection.median()), 3),
            "cosine": round(float(F.cosine_similarity(rephrase, prompt, dim=1).median()), 3),
            "norm_ratio": round(float((rephrase.norm(dim=1) / prompt.norm(dim=1)).median()), 3),
            "prompt_change_over_norm": round(float(relative.median()), 3),
        }), flush=True)


if __name__ == "__main__":
    main()
