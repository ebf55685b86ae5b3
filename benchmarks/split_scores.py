"""Which edit modules carry the edits and which cost retention: after a run, score the model with
only some modules' shifts kept (the others reset to the unedited weights): all of them, those below
``subject_depth`` (editing at the subject), those above it (at the target) and, with several kinds of
module, each kind above it. Turns of 100 (``turn``), as explore.py.

    python benchmarks/split_scores.py zsre:500 '{json config, as explore.py}'
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from explore import single_run  # noqa: E402


def main() -> None:
    spec, text, bench, editor, turn = single_run()
    model = bench.model
    for first in range(0, len(bench.requests), turn):
        editor.edit(bench.requests[first : first + turn])
    edited = {k: v.clone() for k, v in model.state_dict().items()}
    names = list(editor.modules)
    lower = editor._subject_modules()  # below subject_depth: the editor's own split
    groups = {"all": names, "lower": lower, "upper": [n for n in names if n not in lower]}
    kinds = sorted({n.rsplit(".", 1)[1] for n in names})
    if len(kinds) > 1:
        groups.update({f"upper {k}": [n for n in groups["upper"] if n.endswith(k)] for k in kinds})
    for label, kept in groups.items():
        state = dict(bench.unedited)
        state.update({f"{n}.weight": edited[f"{n}.weight"] for n in kept})
        model.load_state_dict(state)
        print(json.dumps({"data": spec, "config": text, "kept": label, **bench.scores()}), flush=True)


if __name__ == "__main__":
    main()
