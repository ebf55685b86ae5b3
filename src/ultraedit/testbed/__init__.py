"""The built-in knowledge testbed: a fictional world and a small Llama that knows its facts.

Edits are only proven on a model that KNOWS things. Here the world (:mod:`.world`: invented
people, cities, countries, companies, ... and a dozen relations with several templates each, some
held out as paraphrases) and a model trained on it (:mod:`.train`) ship inside the package, so
``ultraedit demo`` and ``ultraedit bench --model testbed --dataset testbed`` run on any laptop
with no download::

    from ultraedit import UltraEditor, configuration
    from ultraedit.testbed import load_testbed, load_requests
    model, tokenizer = load_testbed()
    editor = UltraEditor(model, configuration("testbed", model).config, tokenizer)
    editor.edit(load_requests(100))

Shipped files (``data/``): ``tokenizer.json`` (+ HF tokenizer files), ``config.json``,
``model.safetensors`` (float16), ``training.json`` (how it was trained, accuracies), and the world's
edit sets: ``requests.jsonl.gz`` (our format), ``zsre.json.gz``, ``counterfact.json.gz`` and
``facts.jsonl.gz``. ``ultraedit testbed train --out DIR`` reproduces them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "DATA_DIR",
    "TESTBED_MODULES",
    "counterfact_path",
    "data_path",
    "facts_path",
    "load_requests",
    "load_testbed",
    "requests_path",
    "zsre_path",
]

#: Directory of the shipped model, tokenizer and data files.
DATA_DIR: Path = Path(__file__).resolve().parent / "data"

#: The testbed's edit modules (its named configuration ``testbed``, ``PRESETS["testbed"]``): the MLP
#: output projections of layers 1-3 (``d_in`` = 384, the widest keys this model has; layer 0 feeds
#: everything after it).
TESTBED_MODULES: list[str] = [f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)]


def data_path(name: str, data_dir: str | Path | None = None) -> Path:
    """Path of shipped file ``name`` in ``data_dir`` (default :data:`DATA_DIR`); clear error if absent."""
    path = Path(data_dir or DATA_DIR) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"testbed file {path} is missing; this installation lacks the shipped testbed "
            "(rebuild it with 'ultraedit testbed train --out DIR')"
        )
    return path


def requests_path(data_dir: str | Path | None = None) -> Path:
    """The testbed's edit requests in our JSONL format (gzip): ``id``, ``prompt``, ``target``,
    ``rephrases`` (held-out templates) and ``locality`` (``[{prompt, answer}]``), in edit order."""
    return data_path("requests.jsonl.gz", data_dir)


def zsre_path(data_dir: str | Path | None = None) -> Path:
    """The same edits in the ZsRE (MEND) format (gzip JSON list)."""
    return data_path("zsre.json.gz", data_dir)


def counterfact_path(data_dir: str | Path | None = None) -> Path:
    """The same edits in ROME's CounterFact format (gzip JSON list)."""
    return data_path("counterfact.json.gz", data_dir)


def facts_path(data_dir: str | Path | None = None) -> Path:
    """Every fact of the world (``subject``, ``relation``, ``object``, ``locality``), gzip JSONL."""
    return data_path("facts.jsonl.gz", data_dir)


def load_requests(limit: int | None = None, data_dir: str | Path | None = None) -> list:
    """The first ``limit`` (default all) edit requests as :class:`ultraedit.EditRequest` objects."""
    from itertools import islice

    from ..datasets import read_requests

    with read_requests(requests_path(data_dir), format="jsonl") as reader:
        return list(islice(reader, limit))


def load_testbed(device: Any = "cpu", data_dir: str | Path | None = None, dtype: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``: the shipped ``LlamaForCausalLM`` (eval mode) and its
    ``PreTrainedTokenizerFast``, from local files only (never the network).

    Args:
        device: where to put the model.
        data_dir: a directory written by ``ultraedit testbed train`` (default: the shipped one).
        dtype: torch dtype of the model; default float32 (weights are stored in float16).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from safetensors.torch import load_file

    directory = Path(data_dir or DATA_DIR)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(data_path("tokenizer.json", directory).parent),
                                                        local_files_only=True)
    config = LlamaConfig.from_json_file(str(data_path("config.json", directory)))
    state = load_file(str(data_path("model.safetensors", directory)))
    model = LlamaForCausalLM(config)  # small: a random init costs milliseconds, then is overwritten
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"testbed weights in {directory} do not match its config.json: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model = model.to(device=device, dtype=dtype or torch.float32).eval()
    return model, tokenizer
