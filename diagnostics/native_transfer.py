"""How far does the model carry what it ALREADY knows from the edit prompt to the rephrases?

An edit is asked to reach a data set's rephrases (GS). This measures the same reach for the
model's own facts, with no edit at all: the unedited model's teacher-forced token accuracy on the
record's TRUE answer (``extra["target_true"]``: ZsRE's ``answers[0]``, CounterFact's
``ground_truth``) through the edit prompt and through each rephrase, over all records and over
those whose true answer the model already gets from the prompt (all tokens, or at least half).
The last ratio, rephrase over prompt accuracy on facts the model holds, is the transfer an edit
stored as well as a native fact could expect; compare it with an edited model's GS / ES.

    python diagnostics/native_transfer.py --model smollm2-135m --rows zsre:500 counterfact:10000

Writes ``diagnostics/results/native-transfer.json`` (or ``--out``); the data as for benchmarks/quality.py.
"""

from __future__ import annotations  # noqa: I001 (quality must come first: it puts src on the path)

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from quality import ROOT, data_dir, requests_of  # noqa: E402  (the same files, read the same way; puts src on the path)

from ultraedit.evaluation import score_pairs  # noqa: E402
from ultraedit.models import load_model  # noqa: E402

#: Subsets by the prompt's accuracy on the true answer: (name, lowest accuracy).
KNOWN = (("all", 0.0), ("half known", 0.5), ("fully known", 1.0))


def transfer(model, tok, requests) -> dict:
    """Prompt and rephrase accuracy on the true answer, per subset of :data:`KNOWN`."""
    facts = [r for r in requests if r.extra.get("target_true") and r.rephrases]
    prompt_acc = score_pairs(model, tok, [(r.prompt, r.extra["target_true"]) for r in facts])["accuracy"]
    pairs = [(p, r.extra["target_true"]) for r in facts for p in r.rephrases]
    flat = iter(score_pairs(model, tok, pairs)["accuracy"])
    rephrase_acc = [sum(next(flat) for _ in r.rephrases) / len(r.rephrases) for r in facts]
    out = {}
    for name, lowest in KNOWN:
        chosen = [(p, q) for p, q in zip(prompt_acc, rephrase_acc) if p >= lowest]
        n = len(chosen)
        prompt = sum(p for p, _ in chosen) / n if n else None
        rephrase = sum(q for _, q in chosen) / n if n else None
        ratio = rephrase / prompt if n and prompt else None
        out[name] = {"records": n, "prompt": prompt, "rephrase": rephrase, "ratio": ratio}
    return out


def _shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", nargs="+", default=["zsre:500", "counterfact:10000"], help="dataset:count")
    ap.add_argument("--out", type=Path, default=ROOT / "diagnostics" / "results" / "native-transfer.json")
    ap.add_argument("--data-dir", help="where the data is (default $ULTRAEDIT_DATA)")
    args = ap.parse_args(argv)
    model, tok = load_model(args.model)
    results = {"model": args.model, "rows": {}}
    for row in args.rows:
        dataset, count = row.split(":")
        results["rows"][row] = transfer(model, tok, requests_of(data_dir(args.data_dir), dataset, int(count)))
        for name, m in results["rows"][row].items():
            print(f"{row:18} {name:12} n={m['records']:5}  prompt {_shown(m['prompt'])}  rephrase "
                  f"{_shown(m['rephrase'])}  ratio {_shown(m['ratio'])}", flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
