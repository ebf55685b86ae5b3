"""How much of the searched subject change (subject_optimise's delta) the lower modules' ridge
solve actually writes into the residual stream at the subject, for one turn: the mean projection of
the actual change on delta (1 = all of it), their cosine and the length ratio, then the scores.

    python benchmarks/subject_realised.py zsre:100 '{json config, as explore.py}'

DATA's requests are edited in one turn.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from explore import single_run  # noqa: E402

from ultraedit.core.batching import SUBJECT_INDEX, minibatches  # noqa: E402
from ultraedit.core.anatomy import layer_index  # noqa: E402


def subject_states(model, batches, layer):
    """The input of decoder layer ``layer`` at each sequence's subject (last token), in row order."""
    out = []
    with torch.no_grad():
        for batch in batches:
            states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True).hidden_states[layer]
            index = batch[SUBJECT_INDEX]
            rows = torch.nonzero(index >= 0).flatten()
            out.append(states[rows, index[rows]])
    return torch.cat(out)


def main() -> None:
    _, text, bench, editor, _ = single_run()
    model, config = bench.model, editor.config
    requests = bench.requests  # one turn of all of them
    batches, _ = minibatches(bench.tok, requests, config.capture_batch_size, subjects=True)
    layer = max(map(layer_index, editor._subject_modules())) + 1  # where the search's change is measured
    before = subject_states(model, batches, layer)
    delta = editor._subject_values(batches)  # the editor's own (internal) search, as its first step runs it
    editor.edit(requests)
    actual = subject_states(model, batches, layer) - before
    dn = delta.norm(dim=-1)
    proj = (actual * delta).sum(-1) / dn.square().clamp(min=1e-12)
    cos = torch.nn.functional.cosine_similarity(actual, delta, dim=-1)
    print(json.dumps({"config": text, "layer": layer, "rows": len(dn),
                      "delta/|h|": round(float((dn / before.norm(dim=-1)).mean()), 3),
                      "realised (projection)": round(float(proj.mean()), 3), "cos": round(float(cos.mean()), 3),
                      "|actual|/|delta|": round(float((actual.norm(dim=-1) / dn).mean()), 3), **bench.scores()}),
          flush=True)


if __name__ == "__main__":
    main()
