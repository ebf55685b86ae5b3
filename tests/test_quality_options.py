"""Options beyond the paper (EditConfig.lr_scale, refine_steps, preserve) against plain computations."""

import copy
import math

import pytest
import torch
from reference import reference_refined_turn, reference_turn
from tiny import random_turn, tiny_model

from ultraedit import EditConfig, EditError, UltraEditor
from ultraedit.capture import capture
from ultraedit.presets import resolve_modules
from ultraedit.solver import ridge_solve


def test_new_options_default_to_the_authors_method():
    config = EditConfig()
    assert (config.lr_scale, config.refine_steps, config.preserve) == ("none", 1, 0.0)
    assert config.module_lr((576, 1536)) == config.lr


def test_width_lr_scale_keeps_the_row_norm_of_v_at_the_reference_shape():
    config = EditConfig(lr=1e-6, lr_scale="width")
    assert config.module_lr((4096, 14336)) == pytest.approx(1e-6)
    assert config.module_lr((576, 1536)) == pytest.approx(1e-6 * 4096 * math.sqrt(14336) / (576 * math.sqrt(1536)))


@pytest.mark.parametrize("bad", [{"lr_scale": "auto"}, {"refine_steps": 0}, {"preserve": -1.0}])
def test_bad_option_values_are_refused(bad):
    with pytest.raises(ValueError, match="EditConfig"):
        EditConfig(**bad)


def test_ridge_solve_with_preserved_keys_matches_a_plain_solve():
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 7, 5, generator=gen), torch.randn(2, 7, 3, generator=gen)
    kept = torch.randn(2, 9, 5, generator=gen)
    preserve = kept.transpose(-1, -2) @ kept
    ours = ridge_solve(keys, values, 0.5, "dual", preserve=preserve)  # preserve forces the primal form
    for m in range(2):
        k, v = keys[m].double(), values[m].double()
        a = k.T @ k + 0.5 * torch.eye(5, dtype=torch.float64) + preserve[m].double()
        torch.testing.assert_close(ours[m].double(), torch.linalg.solve(a, k.T @ v), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lr", [1e-3, 0.3])  # 0.3: some requests are right after step 1, some not
def test_refine_steps_match_a_plain_implementation(lr):
    model = tiny_model("llama")
    ref_model = copy.deepcopy(model)
    names = resolve_modules(model)
    base = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    editor = UltraEditor(model, EditConfig(modules=names, lr=lr, refine_steps=3))
    ref_norms = {}
    steps = []
    for turn in range(2):
        batches = random_turn(200 + turn)
        steps.append(editor.edit_tokens(batches).steps)
        reference_refined_turn(ref_model, names, batches, ref_norms, steps=3, lr=lr)
    for n in names:
        ours = model.get_submodule(n).weight.detach() - base[n]
        ref = ref_model.get_submodule(n).weight.detach() - base[n]
        assert float((ours - ref).norm() / ref.norm()) <= 1e-3, n
    assert all(1 <= s <= 3 for s in steps)


def test_refine_steps_stop_when_every_request_is_right():
    model = tiny_model("llama")
    names = resolve_modules(model)
    batches = random_turn(5, requests=4, batch_size=2)
    editor = UltraEditor(model, EditConfig(modules=names, lr=1.0, refine_steps=20))
    report = editor.edit_tokens(batches)
    assert 1 < report.steps < 20  # refined, then stopped early: all right
    after = capture(model, editor.modules, batches)
    assert all(bool(mb.hits.all()) for mb in after)


def test_one_refine_step_is_the_faithful_turn():
    model = tiny_model("qwen2")
    ref_model = copy.deepcopy(model)
    names = resolve_modules(model)
    batches = random_turn(9)
    UltraEditor(model, EditConfig(modules=names, lr=1e-3, refine_steps=1)).edit_tokens(batches)
    reference_turn(ref_model, names, batches, {}, lr=1e-3)
    for n in names:
        torch.testing.assert_close(model.get_submodule(n).weight, ref_model.get_submodule(n).weight, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_recommended_config_comes_from_rules_for_any_supported_family(arch):
    model = tiny_model(arch)
    config = EditConfig.recommended(model)
    assert config.modules == resolve_modules(model)
    assert config.lr_scale == "width" and config.refine_steps > 1 and config.preserve > 0
    assert EditConfig.recommended(model, refine_steps=2).refine_steps == 2
    with pytest.raises(EditError, match="needs the tokenizer"):
        UltraEditor(model, config).edit_tokens(random_turn(1))


def test_generic_key_moments_match_a_plain_one_sequence_at_a_time_computation():
    import transformers as T
    from test_bench import _tokenizer
    from tiny import tiny_config

    from ultraedit.preserve import key_moments, package_text, text_batches

    tok = _tokenizer()
    config = tiny_config("llama")
    config.vocab_size = len(tok)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    names = resolve_modules(model)
    modules = {n: model.get_submodule(n) for n in names}
    ours = key_moments(model, tok, modules)

    inputs = {}
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: inputs.__setitem__(n, args[0][0])) for n, m in modules.items()]
    sums = {n: 0 for n in names}
    count = 0
    lines = package_text("generic.txt")
    with torch.no_grad():
        for batch in text_batches(tok, lines, batch_size=1):  # one unpadded sequence per forward
            model(input_ids=batch["input_ids"])
            count += batch["input_ids"].shape[1]
            for n in names:
                sums[n] = sums[n] + inputs[n].double().T @ inputs[n].double()
    for h in handles:
        h.remove()
    for n in names:
        torch.testing.assert_close(ours[n].double(), sums[n] / count, rtol=1e-4, atol=1e-6)


def test_a_resumed_session_with_the_new_options_equals_an_uninterrupted_one(tmp_path):
    import transformers as T
    from test_bench import _tokenizer
    from tiny import tiny_config

    tok = _tokenizer()
    config = tiny_config("llama")
    config.vocab_size = len(tok)
    torch.manual_seed(0)
    base = T.AutoModelForCausalLM.from_config(config).eval()
    options = EditConfig.recommended(base, lr=1e-3)
    turns = [random_turn(40 + t, vocab=len(tok)) for t in range(2)]

    straight = UltraEditor(copy.deepcopy(base), options, tokenizer=tok)
    for batches in turns:
        straight.edit_tokens(batches)
    first = UltraEditor(copy.deepcopy(base), options, tokenizer=tok)
    first.edit_tokens(turns[0])
    first.save(tmp_path / "state")
    resumed = UltraEditor.load(copy.deepcopy(base), tmp_path / "state", tok)
    resumed.edit_tokens(turns[1])
    for name in options.modules:
        torch.testing.assert_close(resumed.model.get_submodule(name).weight, straight.model.get_submodule(name).weight)


def test_bench_configurations_and_explicit_overrides():
    from ultraedit.bench import BenchConfig, bench_edit_config

    model = tiny_model("llama")
    common = dict(model="m", dataset="zsre", data="f", out="o", turns=1)
    recommended = bench_edit_config(model, BenchConfig(**common))
    assert recommended == EditConfig.recommended(model)
    faithful = bench_edit_config(model, BenchConfig(**common, faithful=True))
    assert faithful == EditConfig()
    tuned = bench_edit_config(model, BenchConfig(**common, lr=2e-6, refine_steps=2, preserve=0.0, preset="llama3-fever"))
    assert (tuned.lr, tuned.lr_scale, tuned.refine_steps, tuned.preserve) == (2e-6, "width", 2, 0.0)
    assert tuned.modules is None and tuned.preset == "llama3-fever"
