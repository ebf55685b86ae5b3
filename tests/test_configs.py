"""Named configurations as data, ``--set`` overrides, configurations made concrete for a model (the
module rule, its fallback, stages left out where they cannot apply), and the configurations of
sessions saved by earlier versions."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from ultraedit import EditConfig, UltraEditor, configuration
from ultraedit.configs import ConfigError, apply_sets, check, load_spec, names, parse_set
from ultraedit.core.presets import resolve_modules

from tiny import random_turn, tiny_model, tiny_text_model

FIXTURES = Path(__file__).parent / "fixtures"


def test_the_named_configurations_are_data_that_build():
    assert {"faithful", "recommended", "recommended+paraphrases", "testbed"} <= set(names())
    assert load_spec("faithful")["config"] == {} and check("faithful") == EditConfig()
    both = load_spec("recommended+paraphrases")
    assert both["config"] == {**load_spec("recommended")["config"], "paraphrases": {"count": 2}}
    ending = check("recommended+ending")
    assert ending.ending.text == "." and ending.chat.weight == 10000.0 and check("recommended").ending is None
    for name in names():
        assert load_spec(name)["description"] and isinstance(check(name), EditConfig)


def test_a_configuration_file_is_read_like_a_named_one(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"description": "mine", "extends": "recommended", "config": {"memory": None}}))
    config = check(str(path))
    assert config.memory is None and config.refine == check("recommended").refine
    path.write_text(json.dumps({"config": {}, "stop": 1}))
    with pytest.raises(ConfigError, match=r"unknown keys \['stop'\]"):
        load_spec(str(path))
    with pytest.raises(ConfigError, match="not a named configuration"):
        load_spec("nope")


def test_set_overrides_nest_turn_stages_on_and_off():
    assert parse_set("refine.steps=3") == (["refine", "steps"], 3)
    assert parse_set("generic.text=package") == (["generic", "text"], "package")
    assert parse_set("subject=null") == (["subject"], None)
    data = apply_sets({"refine": {"steps": 5, "confidence": 0.8}}, ["refine.steps=2", "paraphrases.count=1", "refine=null"])
    assert data == {"refine": None, "paraphrases": {"count": 1}}
    config = check("recommended", sets=["subject.search.clamp=0.6", "outliers=null", "runtime.solver=primal"])
    assert config.subject.search.clamp == 0.6 and config.outliers is None and config.runtime.solver == "primal"
    assert check("faithful", sets=["memory.weight=2"]).memory.weight == 2.0  # turned on with its defaults
    with pytest.raises(ConfigError, match="--set expects KEY=VALUE"):
        parse_set("refine")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma3"])
def test_the_recommended_configuration_comes_from_rules_for_any_supported_family(arch):
    """Gemma-3 normalises the MLP's output before the residual stream: no subject search there, said."""
    model = tiny_model(arch)
    resolved = configuration("recommended", model)
    suffix = {"gpt2": "mlp.c_proj"}.get(arch, "mlp.down_proj")
    assert resolved.config.modules and all(name.endswith(suffix) for name in resolved.config.modules)
    assert (resolved.config.lr_scale, resolved.config.ridge_scale) == ("output", "keys")
    assert resolved.config.refine.steps > 1 and resolved.config.guard is not None
    if arch == "gemma3":
        assert resolved.config.subject.search is None and len(resolved.notes) == 1
        assert resolved.notes[0].startswith("left out subject.search:") and "passes through a norm" in resolved.notes[0]
        with pytest.raises(Exception, match="passes through a norm"):
            UltraEditor(model, EditConfig(modules=resolved.config.modules, subject={"depth": 0.5}))
    else:
        assert resolved.config.subject.search is not None and resolved.notes == []
    assert configuration("recommended", model, sets=["refine.steps=2"]).config.refine.steps == 2


def test_the_recommended_modules_fall_back_to_the_family_preset_when_their_statistics_would_not_fit():
    """SmolLM2-135M's shape gets layers 4-25 of 30 of down_proj; Llama-3-8B's (MLP width 14336: 0.8 GB
    per d_in x d_in matrix) gets the authors' gate/up preset, with the step measured for it and no
    subject rows, and says so."""
    import transformers as T

    def model(hidden, width, layers):
        config = T.LlamaConfig(hidden_size=hidden, intermediate_size=width, num_hidden_layers=layers,
                               num_attention_heads=4, num_key_value_heads=4, vocab_size=64)
        with torch.device("meta"):
            return T.AutoModelForCausalLM.from_config(config)

    small, large = model(576, 1536, 30), model(4096, 14336, 32)
    mine, theirs = configuration("recommended", small), configuration("recommended", large)
    assert mine.config.modules == [f"model.layers.{i}.mlp.down_proj" for i in range(4, 26)] and mine.notes == []
    assert 14 * 2 * 4 * 14336**2 > load_spec("recommended")["select"]["max_statistics_bytes"]
    assert theirs.config.modules is None and resolve_modules(large, theirs.config.preset) == resolve_modules(large)
    assert (mine.config.lr, theirs.config.lr) == (0.107, 0.083)
    assert mine.config.subject is not None and theirs.config.subject is None
    assert "the family's preset modules" in theirs.notes[0]
    for config in (mine.config, theirs.config):  # the pull-back and the generated text apply to any modules
        assert (config.generic.pull_back, config.generic.text) == (20.0, "generated")


def test_user_modules_keep_every_stage_that_applies_and_say_which_are_left_out():
    """The recommended configuration with modules the user names: no module below the subject split
    (the layers' lower 43%), so the subject stage is left out with one note; the rest applies; a
    module below the split that does not write the residual stream drops only the search."""
    model = tiny_model("llama")
    upper = ["model.layers.2.mlp.gate_proj", "model.layers.2.mlp.up_proj", "model.layers.3.mlp.up_proj"]
    resolved = configuration("recommended", model, modules=upper, lr=1e-4)
    assert resolved.config.modules == upper and resolved.config.lr == 1e-4 and resolved.config.subject is None
    assert len(resolved.notes) == 1 and "left out the subject stage: no edit module lies below" in resolved.notes[0]
    assert resolved.config.refine is not None and resolved.config.memory is not None
    lower = ["model.layers.0.mlp.gate_proj", "model.layers.3.mlp.up_proj"]
    resolved = configuration("recommended", model, modules=lower)
    assert resolved.config.subject is not None and resolved.config.subject.search is None
    assert resolved.notes[0].startswith("left out subject.search:") and "residual stream" in resolved.notes[0]
    model, tok = tiny_text_model("llama")
    UltraEditor(model, configuration("recommended", model, modules=upper, sets=["generic=null"]).config, tok).edit_tokens(
        random_turn(1))


def test_the_issues_module_commands_work_with_the_default_configuration(tmp_path, capsys):
    """``ultraedit edit --modules ... --lr 1e-4`` and ``ultraedit bench --modules ...`` on a small Llama,
    with the default (recommended) configuration: the subject stage is left out, said once, and the
    run edits."""
    from test_bench import FIXTURES as BENCH_FIXTURES
    from test_cli import make_checkpoint, make_records, write_jsonl

    from ultraedit.cli import main
    from ultraedit.session import read_state

    ckpt = make_checkpoint(tmp_path / "m")
    modules = ["model.layers.3.mlp.gate_proj", "model.layers.3.mlp.up_proj", "model.layers.2.mlp.up_proj"]
    edits = write_jsonl(tmp_path / "e.jsonl", make_records(6))
    assert main(["edit", "--model", str(ckpt), "--edits", str(edits), "--state", str(tmp_path / "s"), "--quiet",
                 "--turn-size", "3", "--modules", *modules, "--lr", "1e-4"]) == 0
    err = capsys.readouterr().err
    assert err.count("left out the subject stage") == 1
    saved = read_state(tmp_path / "s")[0]
    assert saved["turns"] == 2 and saved["config"]["modules"] == modules and saved["config"]["subject"] is None
    assert main(["bench", "--model", str(ckpt), "--dataset", "zsre", "--data", str(BENCH_FIXTURES / "zsre_eval.json"),
                 "--turns", "1", "--turn-size", "4", "--device", "cpu", "--quiet", "--out", str(tmp_path / "b"),
                 "--modules", *modules]) == 0
    method = json.loads((tmp_path / "b" / "results.json").read_text())["method"]
    assert method["modules"] == modules and method["subject"] is None and "subject" in method["notes"][0]


# --------------------------------------------------------------------------- earlier versions
OLD_RECOMMENDED = {
    "modules": ["model.layers.4.mlp.down_proj"], "preset": None, "lr": 1e-5, "ridge": 1.0, "capture_batch_size": 10,
    "forward_batch_size": 100, "normalizer": "paper", "dtype": "float32", "solver": "auto", "lr_scale": "width",
    "refine_steps": 5, "preserve": 300.0, "preserve_text": "generated", "memory": 1.0, "confidence": 0.8,
    "neighbours": 8, "neighbour_weight": 1.0, "prefixes": 0, "paraphrases": 0, "subject_keys": 1.0,
    "subject_depth": 0.43, "key_outliers": 4.0, "subject_steps": 0, "subject_optimise": 8, "subject_lr": 2.0,
    "subject_decay": 0.5, "subject_clamp": 0.4, "subject_kl": 0.0, "subject_contexts": 0, "subject_stop": "loss",
    "preserve_base": 20.0, "subject_preserve": 1.0,
}


def test_an_earlier_versions_flat_configuration_maps_to_the_nested_one():
    old = EditConfig.from_dict(OLD_RECOMMENDED)  # the recommended configuration before measured scales and the guard
    new = check("recommended", sets=["lr=1e-5", "lr_scale=width", "ridge=1", "ridge_scale=none", "guard=null",
                                     "chat=null"])
    assert {**old.to_dict(), "modules": None} == new.to_dict()
    flat_faithful = {k: v for k, v in OLD_RECOMMENDED.items() if k in ("modules", "lr")}
    flat_faithful.update(refine_steps=1, preserve=0.0, memory=0.0, neighbours=0, subject_keys=0.0, subject_depth=0.0,
                         key_outliers=0.0, subject_optimise=0, preserve_base=0.0)
    assert EditConfig.from_dict(flat_faithful).stages() == []


@pytest.mark.parametrize("removed,message", [
    ({"prefixes": 2}, "prefixes=2 was removed: context prefixes"),
    ({"subject_steps": 1}, "subject_steps=1 was removed"),
    ({"subject_kl": 2.0}, "subject_kl=2.0 was removed"),
    ({"subject_contexts": 4}, "subject_contexts=4 was removed"),
    ({"subject_stop": "argmax"}, "subject_stop='argmax' was removed"),
    ({"subject_preserve": 4.0}, "subject_preserve=4.0 was removed"),
    ({"preserve_text": "both"}, "preserve_text='both' was removed"),
])
def test_a_removed_option_that_was_on_is_refused_by_name_with_the_reason(removed, message):
    with pytest.raises(ValueError, match=message):
        EditConfig.from_dict({**OLD_RECOMMENDED, **removed})


def test_a_session_saved_by_the_previous_version_resumes_and_reverts(tmp_path):
    """``tests/fixtures/state-0.1.0``: two turns saved by ultraedit 0.1.0 (flat configuration with
    refinement, key memory, outliers and subject rows; one revertible turn). It loads, continues
    exactly as a run of this version from the start, and reverts its saved turn exactly."""
    from test_stages import with_subjects

    state = tmp_path / "state"
    shutil.copytree(FIXTURES / "state-0.1.0", state)
    names_ = [f"model.layers.{i}.mlp.down_proj" for i in range(4)]
    config = EditConfig(modules=names_, lr=1e-3, refine={"steps": 2, "confidence": 0.5}, memory={"weight": 1.0},
                        outliers={"ratio": 4.0}, subject={"weight": 1.0, "depth": 0.5, "search": None})
    turns = [with_subjects(random_turn(seed, requests=10, batch_size=5), seed, low=1) for seed in (1, 2, 3)]
    straight = UltraEditor(tiny_model("llama"), config, keep_turn_deltas=1)
    for batches in turns[:2]:
        straight.edit_tokens(copy.deepcopy(batches))
    resumed = UltraEditor.load(tiny_model("llama"), state)
    assert resumed.config.to_dict() == config.to_dict() and (resumed.turns, resumed.edits) == (2, 20)
    for name in names_:
        assert torch.equal(resumed.modules[name].weight, straight.modules[name].weight)
    straight.edit_tokens(copy.deepcopy(turns[2]))
    resumed.edit_tokens(copy.deepcopy(turns[2]))
    for name in names_:
        assert torch.equal(resumed.modules[name].weight, straight.modules[name].weight)
    again = UltraEditor.load(tiny_model("llama"), state)
    once = UltraEditor(tiny_model("llama"), config)
    once.edit_tokens(copy.deepcopy(turns[0]))
    after_one = {n: m.weight.detach().clone() for n, m in once.modules.items()}
    again.revert_last(1)
    assert again.turns == 1 and all(torch.equal(again.modules[n].weight, after_one[n]) for n in names_)
