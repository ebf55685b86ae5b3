"""Quick quality exploration: one data set, several configurations, one JSON line each.

    python diagnostics/explore.py demo recommended 'recommended layers=down:14-25 lr=7e-6'
    python diagnostics/explore.py zsre:500 'recommended memory=null' 'faithful lr=1e-5 lr_scale=width'

DATA is ``demo`` (the demo's 100 facts; locality = its 51 probes), ``zsre:N`` or ``cf:N`` (the first N
requests of ``$ULTRAEDIT_DATA``'s ``zsre-500.json`` / ``counterfact-20k.json.gz``, docs/datasets.md).
Each configuration is a named configuration (or JSON file) followed by ``--set``-style overrides,
plus ``layers=`` (e.g. ``gate:10-14,up:16-23``: those MLP projections of those layers; ``q``/``k``/
``v``/``o``: the attention projections) and ``turn=`` (requests per turn, default 100). ``MODEL``
picks the model (default smollm2-135m), ``THREADS`` the threads, ``RESCALE=c`` moves the scale of every
MLP neuron (up_proj rows times c, down_proj columns divided by c: the same function, other weights). Prints ES, GS, retention, agreement,
the perplexity rise on the first 80 held-out lines, the bleed (each edit's new target asked of its
locality prompts, token accuracy, before and after), edit seconds and steps per turn.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ultraedit import EditRequest, UltraEditor, configuration  # noqa: E402
from ultraedit.datasets import read_requests  # noqa: E402
from ultraedit.demo import demo_requests  # noqa: E402
from ultraedit.evaluation import MetricTotals, perplexity, score_requests  # noqa: E402
from ultraedit.models import load_model  # noqa: E402
from ultraedit.texts import package_text  # noqa: E402

FILES = {"zsre": ("zsre-500.json", "zsre"), "cf": ("counterfact-20k.json.gz", "counterfact")}


def requests_of(spec: str) -> list:
    if spec == "demo":
        return demo_requests()
    name, count = spec.split(":")
    if "ULTRAEDIT_DATA" not in os.environ:
        raise SystemExit("ULTRAEDIT_DATA=DIR: where zsre-500.json and counterfact-20k.json.gz are (docs/datasets.md)")
    file, fmt = FILES[name]
    path = Path(os.environ["ULTRAEDIT_DATA"]) / file
    out = []
    for request in read_requests(path, fmt, skip_invalid=True):
        out.append(request)
        if len(out) == int(count):
            return out
    raise SystemExit(f"{path} has {len(out)} requests; {count} asked for")


def modules_of(spec: str) -> list[str]:
    names = []
    for part in spec.split(","):
        kind, span = part.split(":")
        first, last = map(int, span.split("-"))
        block = "self_attn" if kind in ("q", "k", "v", "o") else "mlp"
        names += [f"model.layers.{i}.{block}.{kind}_proj" for i in range(first, last + 1)]
    return names


@torch.no_grad()
def rescale_neurons(model, c: float) -> None:
    """Every MLP neuron's scale moved: up_proj rows times ``c``, down_proj columns divided by ``c``."""
    for name, module in model.named_modules():
        if name.endswith("mlp.up_proj"):
            module.weight.mul_(c)
        elif name.endswith("mlp.down_proj"):
            module.weight.div_(c)


class Bench:
    """The SmolLM2 model, DATA's requests, the unedited model's locality predictions and held-out perplexity."""

    def __init__(self, spec: str) -> None:
        self.requests = requests_of(spec)
        self.model, self.tok = load_model(os.environ.get("MODEL", "smollm2-135m"), "cpu")
        if "RESCALE" in os.environ:
            rescale_neurons(self.model, float(os.environ["RESCALE"]))
        self.unedited = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.reference = score_requests(self.model, self.tok, self.requests).locality_predictions
        self.lines = package_text("heldout.txt")[:80]
        self.ppl_before = perplexity(self.model, self.tok, self.lines)
        # each edit's new target asked of its locality prompts (other subjects: CounterFact's neighbours)
        self.bled = [EditRequest(prompt, r.target) for r in self.requests for prompt, _ in r.locality]
        self.bleed_before = self.bleed()

    def bleed(self) -> float | None:
        """Token accuracy of the edits' new targets on their locality prompts (None without locality)."""
        if not self.bled:
            return None
        totals = MetricTotals()
        totals.add(score_requests(self.model, self.tok, self.bled))
        return round(totals.means()["efficacy"], 3)

    def scores(self) -> dict:
        """ES, GS, retention, agreement, the perplexity rise and the bleed of the model as it is now."""
        totals = MetricTotals()
        totals.add(score_requests(self.model, self.tok, self.requests, reference=self.reference))
        m = totals.means()
        return {"ES": round(m["efficacy"], 3), "GS": round(m["generalization"], 3),
                "retention": round(m["retention"], 3), "agreement": round(m["locality_vs_unedited"], 3),
                "perplexity_rise": round(perplexity(self.model, self.tok, self.lines) / self.ppl_before - 1, 3),
                "bleed": self.bleed(), "bleed_before": self.bleed_before}


def configured(bench: Bench, text: str) -> tuple[UltraEditor, int]:
    """An editor of ``bench``'s model (restored to unedited) for one configuration line, and its turn size."""
    name, *items = text.split()
    options = dict(item.split("=", 1) for item in items if item.startswith(("layers=", "turn=")))
    sets = [item for item in items if not item.startswith(("layers=", "turn="))]
    bench.model.load_state_dict(bench.unedited)
    modules = modules_of(options["layers"]) if "layers" in options else None
    config = configuration(name, bench.model, modules=modules, sets=sets).config
    return UltraEditor(bench.model, config, tokenizer=bench.tok), int(options.get("turn", 100))


def main() -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    spec, configs = sys.argv[1], sys.argv[2:]
    bench = Bench(spec)
    reqs = bench.requests
    for text in configs:
        editor, turn = configured(bench, text)
        start, steps = time.perf_counter(), []
        for first in range(0, len(reqs), turn):
            steps.append(editor.edit(reqs[first : first + turn]).steps)
        seconds = time.perf_counter() - start
        print(json.dumps({"data": spec, "config": text, **bench.scores(), "seconds": round(seconds, 1), "steps": steps}),
              flush=True)


if __name__ == "__main__":
    main()
