"""Which edit modules cost the locality: edit in turns, then score with all edits, with only the
modules below ``subject_depth`` edited (the subject rows) and with only those above it.

    python benchmarks/locality_split.py zsre:500 '{"subject_optimise": 8, "subject_clamp": 0.4}'

DATA and CONFIG as in ``explore.py`` (CONFIG: ``EditConfig`` fields on top of the recommended
configuration). One JSON line per view; the README's stop-18 numbers came from this.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from explore import Bench  # noqa: E402  (puts ../src on the path)

from ultraedit import EditConfig, UltraEditor  # noqa: E402
from ultraedit.core.anatomy import layer_index, num_layers  # noqa: E402


def main() -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    spec, text = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "{}"
    bench = Bench(spec)
    model = bench.model
    config = EditConfig.recommended(model, **json.loads(text))
    editor = UltraEditor(model, config, tokenizer=bench.tok)
    start = time.perf_counter()
    for first in range(0, len(bench.requests), 100):
        editor.edit(bench.requests[first : first + 100])
    seconds = time.perf_counter() - start
    edited = {k: v.clone() for k, v in model.state_dict().items()}
    split = config.subject_depth * num_layers(model)
    weights = {f"{name}.weight": layer_index(name) < split for name in config.modules}  # below the split?
    views = {"all": lambda below: True, "lower only": lambda below: below, "upper only": lambda below: not below}
    for view, keep in views.items():
        model.load_state_dict({k: edited[k] if k in weights and keep(weights[k]) else bench.unedited[k]
                               for k in bench.unedited})
        print(json.dumps({"data": spec, "config": text, "view": view, **bench.scores(), "seconds": round(seconds, 1)}),
              flush=True)


if __name__ == "__main__":
    main()
