"""Options beyond the paper (EditConfig.lr_scale, refine_steps, preserve, memory) against plain computations."""

import copy
import math

import pytest
import torch
from reference import reference_refined_turn, reference_turn
from tiny import ARCHS, random_turn, tiny_model

from ultraedit import EditConfig, EditError, EditRequest, UltraEditor
from ultraedit.capture import capture
from ultraedit.editor import apply_shift
from ultraedit.neighbours import neighbour_grams, neighbour_pairs, subject_of
from ultraedit.presets import recommended_preset, resolve_modules
from ultraedit.solver import Preserved, ridge_solve


def test_new_options_default_to_the_authors_method():
    config = EditConfig()
    assert (config.lr_scale, config.refine_steps, config.preserve, config.memory) == ("none", 1, 0.0, 0.0)
    assert config.module_lr((576, 1536)) == config.lr


def test_width_lr_scale_keeps_the_row_norm_of_v_at_the_reference_shape():
    config = EditConfig(lr=1e-6, lr_scale="width")
    assert config.module_lr((4096, 14336)) == pytest.approx(1e-6)
    assert config.module_lr((576, 1536)) == pytest.approx(1e-6 * 4096 * math.sqrt(14336) / (576 * math.sqrt(1536)))


@pytest.mark.parametrize("bad", [{"lr_scale": "auto"}, {"refine_steps": 0}, {"preserve": -1.0}, {"memory": float("nan")}, {"confidence": 1.0},
                                 {"neighbours": -1}, {"neighbour_weight": -1.0}, {"subject_keys": -1.0},
                                 {"key_outliers": float("nan")}, {"subject_depth": 1.5}])
def test_bad_option_values_are_refused(bad):
    with pytest.raises(ValueError, match="EditConfig"):
        EditConfig(**bad)


@pytest.mark.parametrize("method", ["auto", "dual", "primal"])
@pytest.mark.parametrize("n", [3, 7, 12])  # fewer rows than d_in (auto: the dual form), as many, more
def test_ridge_solve_with_preserved_keys_matches_a_plain_solve(method, n):
    gen = torch.Generator().manual_seed(n)
    keys, values = torch.randn(2, n, 7, generator=gen), torch.randn(2, n, 3, generator=gen)
    kept = torch.randn(2, 9, 7, generator=gen)
    preserve = kept.transpose(-1, -2) @ kept
    ours = ridge_solve(keys, values, 0.5, method, preserve=preserve)
    for m in range(2):
        k, v = keys[m].double(), values[m].double()
        a = k.T @ k + 0.5 * torch.eye(7, dtype=torch.float64) + preserve[m].double()
        torch.testing.assert_close(ours[m].double(), torch.linalg.solve(a, k.T @ v), rtol=1e-4, atol=1e-5)


def test_a_preserved_term_is_factored_once_and_solves_any_rows_against_it():
    """The refinement steps' use: one ``Preserved`` per turn, solved against with new rows each step."""
    gen = torch.Generator().manual_seed(1)
    kept = torch.randn(4, 30, 16, generator=gen, dtype=torch.float64)
    terms = Preserved(kept.transpose(-1, -2) @ kept, 2.0)
    first = terms.factor()
    for rows in (5, 11):
        keys, values = torch.randn(4, rows, 16, generator=gen, dtype=torch.float64), torch.randn(4, rows, 6, generator=gen, dtype=torch.float64)
        a = keys.transpose(-1, -2) @ keys + 2.0 * torch.eye(16, dtype=torch.float64) + terms.matrix
        torch.testing.assert_close(ridge_solve(keys, values, 2.0, "dual", preserve=terms),
                                   torch.linalg.solve(a, keys.transpose(-1, -2) @ values))
    assert terms.factor() is first
    with pytest.raises(ValueError, match="ridge"):
        ridge_solve(keys, values, 1.0, preserve=terms)


def test_a_preserved_term_that_cannot_be_factored_falls_back_to_the_primal_system():
    """``lambda I + P`` not positive definite (P outside its contract): no factor, the primal system solved as it is."""
    gen = torch.Generator().manual_seed(2)
    keys, values = torch.randn(5, 8, dtype=torch.float64, generator=gen), torch.randn(5, 3, dtype=torch.float64, generator=gen)
    terms = Preserved(-3.0 * torch.eye(8, dtype=torch.float64), 1.0)
    assert terms.factor() is None
    a = keys.T @ keys - 2.0 * torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(ridge_solve(keys, values, 1.0, "dual", preserve=terms), torch.linalg.solve(a, keys.T @ values))


@pytest.mark.parametrize("solver", ["dual", "primal"])
def test_refine_steps_with_preserved_keys_match_a_plain_implementation(solver):
    """Every refinement step solves against the turn's preserved term, the right rows kept as well."""
    model = tiny_model("llama")
    ref_model = copy.deepcopy(model)
    names = resolve_modules(model)
    gen = torch.Generator().manual_seed(3)
    grams = {}
    for n in names:
        rows = torch.randn(20, model.get_submodule(n).weight.shape[1], generator=gen)
        grams[n] = 5.0 * rows.T @ rows
    editor = UltraEditor(model, EditConfig(modules=names, lr=0.3, refine_steps=3, solver=solver))
    base = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    batches = random_turn(210)
    pending = editor.prepare(batches, preserved=grams)
    editor.commit(pending)
    assert pending.report.steps > 1
    reference_refined_turn(ref_model, names, batches, {}, steps=3, lr=0.3, preserve=grams)
    for n in names:
        ours = model.get_submodule(n).weight.detach() - base[n]
        ref = ref_model.get_submodule(n).weight.detach() - base[n]
        assert float((ours - ref).norm() / ref.norm()) <= 1e-3, n


@pytest.mark.parametrize("arch,steps,factored", [("llama", 1, True), ("gpt2", 1, True), ("llama", 3, True),
                                                  ("llama", 3, False)])
def test_preserve_base_penalises_the_cumulative_shift_like_a_plain_solve(arch, steps, factored, monkeypatch):
    """``preserve_base=gamma``: every solve is ``(K^T K + lambda I + (alpha + gamma) E0) dW = K^T V - gamma E0 D``,
    ``D`` the module's shift since the unedited model (earlier turns and this turn's earlier
    steps), against a plain primal solve; without it the same turns differ. ``factored=False``: the
    preserved system cannot be factored (the primal fallback)."""
    from ultraedit.solver import Preserved

    if not factored:
        monkeypatch.setattr(Preserved, "factor", lambda self: None)
    model = tiny_model(arch)
    ref_model, plain = copy.deepcopy(model), copy.deepcopy(model)
    names = resolve_modules(model)
    gen = torch.Generator().manual_seed(11)
    moments = {}
    for n in names:
        rows = torch.randn(40, model.get_submodule(n).weight.shape[0 if arch == "gpt2" else 1], generator=gen)
        moments[n] = rows.T @ rows / 40
    alpha, gamma = 3.0, 2.0
    base = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    options = dict(modules=names, lr=0.3, refine_steps=steps, preserve=alpha)
    editors = {}
    for kind, target in ((gamma, model), (0.0, plain)):
        editors[kind] = UltraEditor(target, EditConfig(**options, preserve_base=kind))
        editors[kind]._moments = moments  # E0 without a tokenizer
    normalizers = {}
    for turn in range(2):
        batches = random_turn(400 + turn)
        reports = [editor.edit_tokens(batches) for editor in editors.values()]
        assert reports[0].steps == steps or (steps > 1 and reports[0].steps > 1)
        grams = {n: (alpha + gamma) * moments[n] for n in names}
        base_term = ({n: gamma * moments[n] for n in names}, base)
        if steps == 1:
            reference_turn(ref_model, names, batches, normalizers, lr=0.3, preserve=grams, base_term=base_term)
        else:
            reference_refined_turn(ref_model, names, batches, normalizers, steps=steps, lr=0.3, preserve=grams,
                                   base_term=base_term)
    for n in names:
        ours = model.get_submodule(n).weight.detach() - base[n]
        ref = ref_model.get_submodule(n).weight.detach() - base[n]
        assert float((ours - ref).norm() / ref.norm()) <= 1e-3, n
        assert not torch.allclose(plain.get_submodule(n).weight, model.get_submodule(n).weight, rtol=1e-4, atol=1e-6)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="preserve_base"):
            EditConfig(preserve_base=bad)


def test_subject_preserve_weighs_e0_more_in_the_modules_at_the_subject():
    """``subject_preserve=f``: the modules below ``subject_depth`` solve with ``f (alpha + gamma) E0``
    in the ridge, the others with ``(alpha + gamma) E0``; the pull-back's ``gamma E0 D`` is the same
    in both (plain primal solve, two turns so that ``D`` is not zero); 1 leaves the turn as it was."""
    model = tiny_model("llama")
    ref_model, plain = copy.deepcopy(model), copy.deepcopy(model)
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(4)]
    gen = torch.Generator().manual_seed(5)
    moments = {}
    for n in names:
        rows = torch.randn(40, model.get_submodule(n).weight.shape[1], generator=gen)
        moments[n] = rows.T @ rows / 40
    alpha, gamma, f = 3.0, 2.0, 4.0
    base = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    options = dict(modules=names, lr=0.3, refine_steps=1, preserve=alpha, preserve_base=gamma, subject_depth=0.5)
    editors = [UltraEditor(model, EditConfig(**options, subject_preserve=f)), UltraEditor(plain, EditConfig(**options))]
    for editor in editors:
        editor._moments = moments  # E0 without a tokenizer
    normalizers = {}
    lower = names[:2]
    for turn in range(2):
        batches = with_subjects(random_turn(600 + turn), 600 + turn, low=1)
        for editor in editors:
            editor.edit_tokens(batches)
        grams = {n: (f if n in lower else 1.0) * (alpha + gamma) * moments[n] for n in names}
        reference_turn(ref_model, names, batches, normalizers, lr=0.3, preserve=grams, subject_only=lower,
                       base_term=({n: gamma * moments[n] for n in names}, base))
    for n in names:
        ours = model.get_submodule(n).weight.detach() - base[n]
        ref = ref_model.get_submodule(n).weight.detach() - base[n]
        assert float((ours - ref).norm() / ref.norm()) <= 1e-3, n
    for n in lower:
        assert not torch.allclose(plain.get_submodule(n).weight, model.get_submodule(n).weight, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="subject_preserve needs subject_depth"):
        EditConfig(subject_preserve=2.0)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="subject_preserve"):
            EditConfig(subject_depth=0.5, subject_preserve=bad)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_key_memory_matches_a_plain_sum_of_earlier_turns_keys(arch):
    """With ``memory=beta``, turn t solves ``(K^T K + lambda I + beta sum_{s<t} K_s^T K_s)^-1 K^T V``,
    with each K_s as captured in its own turn (before that turn's shift)."""
    model = tiny_model(arch)
    ref_model = copy.deepcopy(model)
    names = resolve_modules(model)
    beta, lr = 2.0, 1e-3
    editor = UltraEditor(model, EditConfig(modules=names, lr=lr, memory=beta))
    ref_norms, memory = {}, None
    for turn in range(3):
        batches = random_turn(300 + turn)
        editor.edit_tokens(batches)
        keys = {}
        preserve = None if memory is None else {n: beta * memory[n] for n in names}
        reference_turn(ref_model, names, batches, ref_norms, lr=lr, preserve=preserve, keys_out=keys)
        memory = {n: keys[n].T @ keys[n] + (0 if memory is None else memory[n]) for n in names}
        for n in names:
            torch.testing.assert_close(editor.key_memory[n].double(), memory[n], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(model.get_submodule(n).weight, ref_model.get_submodule(n).weight, rtol=1e-4, atol=1e-6)


def test_key_memory_holds_earlier_edits_in_place():
    """The memory is what keeps a turn from moving the outputs at earlier turns' keys: with a
    large beta, turn 2 changes the edit modules' outputs at turn 1's keys far less."""
    moved = {}
    for beta in (0.0, 1e4):
        model = tiny_model("llama")
        names = resolve_modules(model)
        editor = UltraEditor(model, EditConfig(modules=names, lr=1e-2, memory=beta))
        first = random_turn(400)
        editor.edit_tokens(first)
        keys = {n: torch.cat([mb.keys[n] for mb in capture(model, editor.modules, first)]) for n in names}
        with torch.no_grad():
            before = {n: model.get_submodule(n)(keys[n]) for n in names}
        editor.edit_tokens(random_turn(401))
        with torch.no_grad():
            moved[beta] = sum(float((model.get_submodule(n)(keys[n]) - before[n]).norm()) for n in names)
    assert moved[1e4] < 0.05 * moved[0.0]


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
    assert config.modules == resolve_modules(model, recommended_preset(model))
    suffix = {"llama": "mlp.down_proj", "qwen2": "mlp.down_proj", "gpt2": "mlp.c_proj"}[arch]
    assert config.modules and all(name.endswith(suffix) for name in config.modules)
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


def test_preserve_text_takes_e0_over_the_package_text_generated_text_or_both(tmp_path, monkeypatch):
    """``preserve_text``: the preserved term's ``E0[k k^T]`` is the package text's (as before), the
    model-generated text's (:func:`ultraedit.covariance.second_moments`, tested against a plain
    computation there), or the mean of the two; taken on the model as given, before any edit."""
    from ultraedit.covariance import second_moments
    from ultraedit.preserve import key_moments

    monkeypatch.setenv("ULTRAEDIT_CACHE", str(tmp_path / "cache"))
    model, tok = _text_model()
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(4)]
    modules = {n: model.get_submodule(n) for n in names}
    package = key_moments(model, tok, modules)
    generated, info = second_moments(model, tok, names, progress=False)
    assert info["tokens"] == 64 * 256
    moments = {}
    for source in ("package", "generated", "both"):
        editor = UltraEditor(copy.deepcopy(model), EditConfig(modules=names, lr=1e-3, preserve=5.0, preserve_text=source),
                             tokenizer=tok)
        moments[source] = editor._generic_moments()
        editor.edit_tokens(random_turn(3, vocab=60))
        moments[source + " after"] = editor.model.get_submodule(names[0]).weight.detach().clone()
    for n in names:
        torch.testing.assert_close(moments["package"][n], package[n])
        torch.testing.assert_close(moments["generated"][n], generated[n])
        torch.testing.assert_close(moments["both"][n], (package[n] + generated[n]) / 2)
    assert not torch.allclose(moments["package after"], moments["generated after"])
    with pytest.raises(ValueError, match="preserve_text"):
        EditConfig(preserve_text="wikipedia")


@pytest.mark.parametrize("extra", [{}, {"preserve": 0.0, "preserve_base": 30.0}])
def test_a_resumed_session_with_the_new_options_equals_an_uninterrupted_one(tmp_path, extra):
    """(``preserve_base``, in the recommended options, reads the earlier turns' shift off the
    session's base weights, so a resumed session must see the same ``D``; with ``preserve`` 0 it
    alone needs ``E0``, which must still come from the unedited model.)"""
    import transformers as T
    from test_bench import _tokenizer
    from tiny import tiny_config

    tok = _tokenizer()
    config = tiny_config("llama")
    config.vocab_size = len(tok)
    torch.manual_seed(0)
    base = T.AutoModelForCausalLM.from_config(config).eval()
    options = EditConfig.recommended(base, lr=1e-3, **extra)
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
    options = bench_edit_config(model, BenchConfig(**common, memory=0.0, confidence=0.5, neighbours=3, prefixes=1,
                                                   paraphrases=2))
    assert (options.memory, options.confidence, options.neighbours, options.prefixes) == (0.0, 0.5, 3, 1)
    assert options.paraphrases == 2


def _text_model():
    import transformers as T
    from test_bench import _tokenizer
    from tiny import tiny_config

    tok = _tokenizer()
    config = tiny_config("llama")
    config.vocab_size = len(tok)
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config).eval(), tok


SUBJECT_REQUESTS = [
    EditRequest("The capital of France is", "Rome", extra={"subject": "France"}),
    EditRequest("The capital of Spain is", "Oslo", extra={"subject": "Spain"}),
    EditRequest("Paris is located in the country of", "Peru", extra={"subject": "Paris"}),
    EditRequest("Danielle Darrieux speaks", "Dutch", extra={"subject": "Danielle Darrieux"}),
    EditRequest("No subject here is", "given"),
]


def test_neighbour_pairs_swap_the_subject_for_other_subjects_of_the_turn():
    pairs = neighbour_pairs(SUBJECT_REQUESTS, 2)
    assert pairs == neighbour_pairs(SUBJECT_REQUESTS, 2)  # seeded by the requests' text
    edited = {r.prompt for r in SUBJECT_REQUESTS}
    by_target = {}
    for prompt, target in pairs:
        by_target.setdefault(target, []).append(prompt)
        assert prompt not in edited
    # "The capital of Spain is" is an edit of the turn: France's neighbours skip it
    assert len(by_target["Rome"]) == 2 and all(p.startswith("The capital of ") for p in by_target["Rome"])
    assert "The capital of Spain is" not in by_target["Rome"]
    assert all(p.endswith(" is located in the country of") and not p.startswith("Paris") for p in by_target["Peru"])
    assert "given" not in by_target  # no subject, no neighbours
    assert neighbour_pairs([SUBJECT_REQUESTS[0]], 3) == []  # nobody to swap in
    assert subject_of(EditRequest("p q", "t", extra={"subject": "absent"})) is None


def test_neighbour_grams_match_a_plain_one_sequence_at_a_time_sum():
    from ultraedit.batching import tokenize_pair

    model, tok = _text_model()
    names = resolve_modules(model)
    modules = {n: model.get_submodule(n) for n in names}
    pairs = neighbour_pairs(SUBJECT_REQUESTS, 3)
    ours = neighbour_grams(model, tok, modules, pairs, batch_size=2)  # padded batches
    inputs = {}
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: inputs.__setitem__(n, args[0][0])) for n, m in modules.items()]
    sums = {n: 0 for n in names}
    with torch.no_grad():
        for prompt, target in pairs:
            ids, labels = tokenize_pair(tok, prompt, target)
            model(input_ids=torch.tensor([ids]))
            at = torch.tensor(labels) != -100
            for n in names:
                keys = inputs[n][at].double()
                sums[n] = sums[n] + keys.T @ keys
    for h in handles:
        h.remove()
    for n in names:
        torch.testing.assert_close(ours[n].double(), sums[n], rtol=1e-4, atol=1e-5)


def test_a_turn_with_neighbours_solves_with_their_keys_preserved():
    """``neighbours=k``: the turn is the faithful turn with ``gamma N^T N`` (the neighbour prompts'
    target-position keys on the model before the turn) added to the ridge system."""
    from ultraedit.batching import minibatches

    model, tok = _text_model()
    ref_model = copy.deepcopy(model)
    names = resolve_modules(model)
    gamma, lr = 3.0, 1e-3
    UltraEditor(model, EditConfig(modules=names, lr=lr, neighbours=2, neighbour_weight=gamma), tokenizer=tok).edit(SUBJECT_REQUESTS)
    grams = neighbour_grams(ref_model, tok, {n: ref_model.get_submodule(n) for n in names}, neighbour_pairs(SUBJECT_REQUESTS, 2))
    batches, _ = minibatches(tok, SUBJECT_REQUESTS, 10)
    reference_turn(ref_model, names, batches, {}, lr=lr, preserve={n: gamma * grams[n] for n in names})
    for n in names:
        torch.testing.assert_close(model.get_submodule(n).weight, ref_model.get_submodule(n).weight, rtol=1e-4, atol=1e-6)


def test_captured_target_probabilities_are_the_softmax_of_the_full_logits():
    model = tiny_model("llama")
    batches = random_turn(7)
    captured = capture(model, {n: model.get_submodule(n) for n in resolve_modules(model)}, batches)
    for batch, mb in zip(batches, captured):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        at = batch["labels"] != -100
        expected = logits[at].float().softmax(-1).gather(1, batch["labels"][at][:, None])[:, 0]
        torch.testing.assert_close(mb.probs, expected, rtol=1e-4, atol=1e-6)


def test_a_request_is_done_when_every_target_token_is_the_argmax_with_enough_probability():
    from ultraedit.capture import MinibatchCapture
    from ultraedit.editor import _unsolved_rows

    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, -100], [-100, 8, 9, 4]])  # 2 + 1 + 3 targets
    batch = {"labels": labels}
    hits = torch.tensor([True, True, True, True, False, True])
    probs = torch.tensor([0.95, 0.60, 0.99, 0.97, 0.40, 0.99])
    mb = MinibatchCapture(keys={}, grads={}, rows=6, loss=0.0, hits=hits, probs=probs)
    rows = lambda c: _unsolved_rows([batch], [mb], c)[0].tolist()  # noqa: E731
    assert rows(0.0) == [False, False, False, True, True, True]  # argmax only: the third misses one
    assert rows(0.9) == [True, True, False, True, True, True]  # the first has a token at 0.60
    assert rows(0.5) == rows(0.0)


def test_refinement_with_confidence_keeps_editing_unsure_requests():
    steps = {}
    for confidence in (0.0, 0.5):
        model = tiny_model("llama")
        names = resolve_modules(model)
        batches = random_turn(5, requests=4, batch_size=2)
        editor = UltraEditor(model, EditConfig(modules=names, lr=1.0, refine_steps=6, confidence=confidence))
        steps[confidence] = editor.edit_tokens(batches).steps
    # the tiny random model's targets are right after 2 steps but far from probability 0.5
    assert steps == {0.0: 2, 0.5: 6}


def test_with_prefixes_adds_seeded_context_copies_named_by_their_request():
    from ultraedit.neighbours import with_prefixes
    from ultraedit.preserve import package_text

    sentences = set(package_text("generic.txt"))
    sequences, owners = with_prefixes(SUBJECT_REQUESTS, 2)
    assert (sequences, owners) == with_prefixes(SUBJECT_REQUESTS, 2)
    n = len(SUBJECT_REQUESTS)
    assert sequences[:n] == SUBJECT_REQUESTS and owners == list(range(n)) + [i for i in range(n) for _ in range(2)]
    for copy_, owner in zip(sequences[n:], owners[n:]):
        original = SUBJECT_REQUESTS[owner]
        assert copy_.target == original.target and copy_.prompt.endswith(" " + original.prompt)
        assert copy_.prompt[: -len(original.prompt) - 1] in sentences
    assert with_prefixes(SUBJECT_REQUESTS, 0) == (list(SUBJECT_REQUESTS), list(range(n)))


def test_a_turn_with_prefixes_edits_the_prefixed_copies_too_and_counts_the_requests():
    from ultraedit.neighbours import with_prefixes

    model, tok = _text_model()
    twin = copy.deepcopy(model)
    names = resolve_modules(model)
    editor = UltraEditor(model, EditConfig(modules=names, lr=1e-3, prefixes=2), tokenizer=tok)
    report = editor.edit(SUBJECT_REQUESTS)
    assert report.requests == editor.edits == len(SUBJECT_REQUESTS)
    assert sorted(set(report.order)) == list(range(len(SUBJECT_REQUESTS)))
    UltraEditor(twin, EditConfig(modules=names, lr=1e-3), tokenizer=tok).edit(with_prefixes(SUBJECT_REQUESTS, 2)[0])
    for n in names:
        assert torch.equal(model.get_submodule(n).weight, twin.get_submodule(n).weight)


def test_recommended_modules_fall_back_to_the_family_preset_when_their_statistics_would_not_fit():
    """SmolLM2-135M's shape gets layers 4-25 of 30 of down_proj; Llama-3-8B's (MLP width 14336:
    0.8 GB per d_in x d_in matrix) gets the authors' gate/up preset."""
    import transformers as T

    from ultraedit.presets import RECOMMENDED_STATS_BYTES

    def model(hidden, width, layers):
        config = T.LlamaConfig(hidden_size=hidden, intermediate_size=width, num_hidden_layers=layers,
                               num_attention_heads=4, num_key_value_heads=4, vocab_size=64)
        with torch.device("meta"):
            return T.AutoModelForCausalLM.from_config(config)

    small = model(576, 1536, 30)
    assert resolve_modules(small, recommended_preset(small)) == [f"model.layers.{i}.mlp.down_proj" for i in range(4, 26)]
    large = model(4096, 14336, 32)
    assert 14 * 2 * 4 * 14336**2 > RECOMMENDED_STATS_BYTES
    assert recommended_preset(large).name == "llama3"
    # each kind of module gets the step size measured for it; subject rows only on the MLP outputs
    assert (EditConfig.recommended(small).lr, EditConfig.recommended(large).lr) == (1e-5, 5e-6)
    assert (EditConfig.recommended(small).subject_keys, EditConfig.recommended(large).subject_keys) == (1.0, 0.0)
    # the subject search needs subject rows; the pull-back and the generated text apply to any modules
    assert (EditConfig.recommended(small).subject_optimise, EditConfig.recommended(large).subject_optimise) == (8, 0)
    for config in (EditConfig.recommended(small), EditConfig.recommended(large)):
        assert (config.preserve_base, config.preserve_text) == (20.0, "generated")


# --------------------------------------------------------------------------- subject keys
def with_subjects(batches, seed, low=0):
    """Give most sequences a random subject position in ``[low, last prompt token)``, the rest -1.
    (A position 0 empties a prefix: the capture then runs without its prefix/tail split.)"""
    gen = torch.Generator().manual_seed(seed)
    for batch in batches:
        last_prompt = (batch["labels"] != -100).int().argmax(1).tolist()  # the first target column
        batch["subject_index"] = torch.tensor([
            int(torch.randint(low, last, (1,), generator=gen)) if float(torch.rand(1, generator=gen)) < 0.8 else -1
            for last in last_prompt
        ])
    return batches


@pytest.mark.parametrize("arch", ARCHS)
def test_subject_keys_match_a_plain_capture_at_the_subject_and_target_positions(arch):
    """With ``subject_index`` in the batches (``subject_keys``), each sequence adds the row (key at
    its subject position, output gradient there) to the turn; the prefix/tail split and passes
    that mix minibatches must give what a plain full forward per minibatch gives."""
    from test_editor import edit_modules

    model = tiny_model(arch)
    ref_model = copy.deepcopy(model)
    names = edit_modules(model, arch)
    base = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    editor = UltraEditor(model, EditConfig(modules=names, lr=1e-3, forward_batch_size=7))
    ref_norms = {}
    for turn in range(2):
        batches = with_subjects(random_turn(300 + turn), turn, low=turn)  # turn 1: split; turn 0: mostly not
        report = editor.edit_tokens(batches)
        extra = sum(int((b["subject_index"] >= 0).sum()) for b in batches)
        assert report.rows[names[0]] == sum(int((b["labels"] != -100).sum()) for b in batches) + extra
        reference_turn(ref_model, names, batches, ref_norms, lr=1e-3)
    for n in names:
        ours = model.get_submodule(n).weight.detach() - base[n]
        ref = ref_model.get_submodule(n).weight.detach() - base[n]
        assert float((ours - ref).norm() / ref.norm()) <= 1e-4, n


def test_subject_keys_with_refine_steps_match_a_plain_implementation():
    model = tiny_model("llama")
    ref_model = copy.deepcopy(model)
    names = resolve_modules(model)
    base = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    batches = with_subjects(random_turn(210), 5)
    report = UltraEditor(model, EditConfig(modules=names, lr=0.3, refine_steps=3)).edit_tokens(batches)
    reference_refined_turn(ref_model, names, batches, {}, steps=3, lr=0.3)
    assert report.steps > 1
    for n in names:
        ours = model.get_submodule(n).weight.detach() - base[n]
        ref = ref_model.get_submodule(n).weight.detach() - base[n]
        assert float((ours - ref).norm() / ref.norm()) <= 1e-3, n


def test_subject_position_is_the_last_token_of_the_subject():
    from test_bench import _tokenizer

    from ultraedit.batching import SUBJECT_INDEX, minibatches, subject_position

    tok = _tokenizer()
    for prompt, subject in [("The capital of France is", "France"), ("Danielle Darrieux speaks", "Danielle Darrieux")]:
        ids = tok(prompt)["input_ids"]
        position = subject_position(tok, prompt, subject)
        assert tok.decode(ids[: position + 1]).endswith(subject)
        assert not tok.decode(ids[:position]).endswith(subject)
    assert subject_position(tok, "He speaks France", "France") == -1  # the last prompt token: a target row already
    assert subject_position(tok, "The capital of France is", "Spain") == -1
    batches, order = minibatches(tok, SUBJECT_REQUESTS, 2, subjects=True)
    positions = torch.cat([b[SUBJECT_INDEX] for b in batches]).tolist()
    by_request = {order[i]: p for i, p in enumerate(positions)}
    assert by_request[4] == -1  # "No subject here is": none given
    assert all(by_request[i] >= 0 for i in range(4))
    assert all(SUBJECT_INDEX not in b for b in minibatches(tok, SUBJECT_REQUESTS, 2)[0])


def test_edit_with_subject_keys_adds_one_row_per_request_with_a_subject():
    model, tok = _text_model()
    plain = UltraEditor(copy.deepcopy(model), EditConfig(lr=1e-3), tokenizer=tok).edit(SUBJECT_REQUESTS)
    subject = UltraEditor(model, EditConfig(lr=1e-3, subject_keys=1.0), tokenizer=tok).edit(SUBJECT_REQUESTS)
    assert all(subject.rows[n] == plain.rows[n] + 4 for n in plain.rows)


@pytest.mark.parametrize("bad", [[0, 99], [-2, 0], [0.5, 1.0], [0]])
def test_a_bad_subject_index_is_refused_before_any_change(bad):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = random_turn(3, requests=4, batch_size=2)
    batches[1]["subject_index"] = torch.tensor(bad)
    with pytest.raises(EditError, match="minibatch 1: 'subject_index'"):
        UltraEditor(model, EditConfig(lr=1e-3)).edit_tokens(batches)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_key_outlier_rows_are_kept_not_edited():
    """``key_outliers=r``: rows whose key is longer than r x the module's median are rows of the
    ridge with value 0 (tiny random models have no massive activations: r = 1.15 marks some of
    the down_proj inputs, which no norm precedes)."""
    model = tiny_model("llama")
    ref_model = copy.deepcopy(model)
    names = [f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)]
    batches = random_turn(12)
    keys = torch.cat([mb.keys[names[0]] for mb in capture(model, {names[0]: model.get_submodule(names[0])}, batches)])
    norms = keys.norm(dim=1)
    outlying = int((norms > 1.15 * norms.median()).sum())
    assert 0 < outlying < len(norms) // 2
    UltraEditor(model, EditConfig(modules=names, lr=1e-3, key_outliers=1.15)).edit_tokens(batches)
    reference_turn(ref_model, names, batches, {}, lr=1e-3, outliers=1.15)
    for n in names:
        torch.testing.assert_close(model.get_submodule(n).weight, ref_model.get_submodule(n).weight, rtol=1e-4, atol=1e-6)
    plain = tiny_model("llama")
    UltraEditor(plain, EditConfig(modules=names, lr=1e-3)).edit_tokens(batches)
    assert not torch.allclose(plain.get_submodule(names[0]).weight, model.get_submodule(names[0]).weight, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("subject_steps", [1, 2])
def test_subject_steps_leave_the_upper_modules_out_of_the_first_steps(subject_steps):
    """``subject_steps=k``: the turn's first k steps solve only the modules below ``subject_depth``
    (at the subject rows); the later steps all modules, each at its own rows."""
    model = tiny_model("llama")
    ref_model, plain = copy.deepcopy(model), copy.deepcopy(model)
    names = [f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)]
    batches = with_subjects(random_turn(210), 3, low=1)
    options = dict(modules=names, lr=0.3, refine_steps=3, subject_depth=0.5)
    base = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    pending = UltraEditor(model, EditConfig(**options, subject_steps=subject_steps)).prepare(batches)
    assert pending.report.steps == 3
    for n in names:
        apply_shift(model.get_submodule(n), pending.shifts[n])
    reference_refined_turn(ref_model, names, batches, {}, steps=3, lr=0.3, subject_only=names[:1],
                           lower_only_steps=subject_steps)
    UltraEditor(plain, EditConfig(**options)).edit_tokens(batches)
    for n in names:
        ours = model.get_submodule(n).weight.detach() - base[n]
        ref = ref_model.get_submodule(n).weight.detach() - base[n]
        assert float((ours - ref).norm() / ref.norm()) <= 1e-3, n
        assert not torch.allclose(plain.get_submodule(n).weight, model.get_submodule(n).weight, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="subject_steps"):
        EditConfig(refine_steps=2, subject_steps=2, subject_depth=0.5)
    with pytest.raises(ValueError, match="subject_depth"):
        EditConfig(refine_steps=2, subject_steps=1)


def test_subject_depth_splits_the_rows_between_lower_and_upper_modules():
    """``subject_depth=0.5`` on a 4-layer model: layer 1 edits only the subject rows, layers 2-3
    only the target rows; each module keeps the rows it does not edit in its ridge (value 0)."""
    model = tiny_model("llama")
    ref_model = copy.deepcopy(model)
    names = [f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)]
    batches = with_subjects(random_turn(21), 3, low=1)
    UltraEditor(model, EditConfig(modules=names, lr=1e-3, subject_depth=0.5)).edit_tokens(batches)
    reference_turn(ref_model, names, batches, {}, lr=1e-3, subject_only=names[:1])
    for n in names:
        torch.testing.assert_close(model.get_submodule(n).weight, ref_model.get_submodule(n).weight, rtol=1e-4, atol=1e-6)
    both = tiny_model("llama")
    UltraEditor(both, EditConfig(modules=names, lr=1e-3)).edit_tokens(batches)
    for n in names:
        assert not torch.allclose(both.get_submodule(n).weight, model.get_submodule(n).weight, rtol=1e-4, atol=1e-6)


def _subject_rows_deltas(model, block, batches, essence=None, **options):
    """The reference ``delta`` of every sequence with a subject, one unpadded sequence at a time, in row order."""
    from reference import reference_subject_delta

    out = []
    for b, batch in enumerate(batches):
        for row, position in enumerate(batch["subject_index"].tolist()):
            if position >= 0:
                length = int(batch["attention_mask"][row].sum())
                own = None
                if essence is not None:
                    size = int(essence[b]["attention_mask"][row].sum())
                    own = (essence[b]["input_ids"][row, :size], int(essence[b]["subject_index"][row]))
                out.append(reference_subject_delta(model, block, batch["input_ids"][row, :length],
                                                   batch["labels"][row, :length], position, essence=own, **options))
    return torch.stack(out)


def _essence_of(batches, seed):
    """Random essence prompts row for row (2-5 tokens, the subject somewhere in them), as
    :func:`ultraedit.subject_values.essence_batches` lays them out."""
    from ultraedit.batching import collate

    gen = torch.Generator().manual_seed(seed)
    out = []
    for batch in batches:
        encoded, index = [], []
        for position in batch["subject_index"].tolist():
            ids = torch.randint(3, 60, (int(torch.randint(2, 6, (1,), generator=gen)),), generator=gen).tolist()
            encoded.append((ids, [-100] * (len(ids) - 1) + [0]))
            index.append(int(torch.randint(0, len(ids), (1,), generator=gen)) if position >= 0 else -1)
        out.append({**collate(encoded, 0), "subject_index": torch.tensor(index)})
    return out


def test_subject_deltas_keep_the_essence_like_a_plain_loop():
    """``subject_kl``: each request's loss also has kl * KL(p0 || p) after its own essence prompt
    (``delta`` added at the subject there too), as the published loop computes it per request."""
    from ultraedit.subject_values import subject_deltas

    model = tiny_model("llama")
    batches = with_subjects(random_turn(9, requests=8, batch_size=4), 9)
    essence = _essence_of(batches, 9)
    block = model.model.layers[1]
    options = dict(steps=5, lr=0.5, decay=0.5, clamp=0.75)
    ours = torch.cat([d[b["subject_index"] >= 0] for d, b in
                      zip(subject_deltas(model, 2, batches, **options, essence=essence, kl=2.0), batches)])
    without = torch.cat([d[b["subject_index"] >= 0] for d, b in zip(subject_deltas(model, 2, batches, **options), batches)])
    reference = _subject_rows_deltas(model, block, batches, essence=essence, kl=2.0, **options)
    torch.testing.assert_close(ours, reference, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(ours, without, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_subject_deltas_match_a_plain_loop_per_sequence(arch):
    """``subject_deltas`` optimises a minibatch's deltas together (padded, logits at the targets
    only); each must be what the published loop gives for its sequence alone: Adam on its own loss,
    its own early stop, its own norm ball."""
    from ultraedit.subject_values import subject_deltas

    model = tiny_model(arch)
    batches = with_subjects(random_turn(5, requests=12, batch_size=4), 5)
    block = model.get_submodule("model.layers.1" if arch == "llama" else "transformer.h.1")
    options = dict(steps=6, lr=0.5, decay=0.5, clamp=0.75)
    ours = torch.cat([d[b["subject_index"] >= 0] for d, b in zip(subject_deltas(model, 2, batches, **options), batches)])
    assert all(p.requires_grad for p in model.parameters())  # the model's flags are restored
    reference = _subject_rows_deltas(model, block, batches, **options)
    assert float(reference.norm(dim=-1).min()) > 0
    torch.testing.assert_close(ours, reference, rtol=1e-3, atol=1e-4)
    assert all(float(d[b["subject_index"] < 0].abs().max()) == 0
               for d, b in zip(subject_deltas(model, 2, batches, **options), batches) if bool((b["subject_index"] < 0).any()))


def _contexts_of(batches, seed, copies=2):
    """Per minibatch, ``copies`` context copies of each row (random 1-4 token prefix + the row's
    sequence, subject shifted by the prefix; -1 stays -1 and one copy in five loses its subject),
    rows shuffled, ``owner`` naming each copy's row; and the unpadded copies per row."""
    from ultraedit.batching import collate

    gen = torch.Generator().manual_seed(seed)
    out, plain = [], []
    for batch in batches:
        encoded, index, owner = [], [], []
        for row, position in enumerate(batch["subject_index"].tolist()):
            length = int(batch["attention_mask"][row].sum())
            ids, labels = batch["input_ids"][row, :length].tolist(), batch["labels"][row, :length].tolist()
            for _ in range(copies):
                prefix = torch.randint(3, 60, (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen).tolist()
                moved = position + len(prefix) if position >= 0 and float(torch.rand(1, generator=gen)) < 0.8 else -1
                encoded.append((prefix + ids, [-100] * len(prefix) + labels))
                index.append(moved)
                owner.append(row)
        shuffle = torch.randperm(len(encoded), generator=gen).tolist()
        out.append({**collate([encoded[i] for i in shuffle], 0), "subject_index": torch.tensor([index[i] for i in shuffle]),
                    "owner": torch.tensor([owner[i] for i in shuffle])})
        plain.append([[(torch.tensor(encoded[i][0]), torch.tensor(encoded[i][1]), index[i]) for i in range(len(encoded))
                       if owner[i] == row] for row in range(len(batch["input_ids"]))])
    return out, plain


@pytest.mark.parametrize("stop", ["loss", "argmax"])
def test_subject_deltas_over_context_copies_match_a_plain_loop(stop):
    """``subject_contexts``: one delta per request, added at the subject in the prompt and in each
    context copy, the loss the mean of their mean NLLs (``subject_stop``: MEMIT's NLL rule or
    every target token the argmax), as a plain loop over the request's own sequences computes it."""
    from reference import reference_subject_delta
    from ultraedit.subject_values import subject_deltas

    model = tiny_model("llama")
    batches = with_subjects(random_turn(11, requests=8, batch_size=4), 11)
    contexts, plain = _contexts_of(batches, 11)
    options = dict(steps=6, lr=0.5, decay=0.5, clamp=0.75)
    ours = torch.cat([d[b["subject_index"] >= 0] for d, b in
                      zip(subject_deltas(model, 2, batches, **options, contexts=contexts, stop=stop), batches)])
    alone = torch.cat([d[b["subject_index"] >= 0] for d, b in zip(subject_deltas(model, 2, batches, **options, stop=stop), batches)])
    reference = []
    for b, batch in enumerate(batches):
        for row, position in enumerate(batch["subject_index"].tolist()):
            if position >= 0:
                length = int(batch["attention_mask"][row].sum())
                reference.append(reference_subject_delta(
                    model, model.model.layers[1], batch["input_ids"][row, :length], batch["labels"][row, :length],
                    position, contexts=plain[b][row], stop=stop, **options))
    torch.testing.assert_close(ours, torch.stack(reference), rtol=1e-3, atol=1e-4)
    assert not torch.allclose(ours, alone, rtol=1e-3, atol=1e-4)


def test_argmax_stop_moves_less_than_the_loss_rule():
    """``subject_stop="argmax"`` (ENCORE's most-probable early stop) ends a search once the target is
    the argmax, far from the NLL rule's 0.05 on a tiny model whose logits are nearly flat, so its
    deltas are shorter (one-token targets, the change at the last prompt token)."""
    from ultraedit.batching import collate
    from ultraedit.subject_values import subject_deltas

    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(3)
    examples = [(torch.randint(3, 60, (5,), generator=gen).tolist(), [-100] * 4 + [int(torch.randint(3, 60, (1,), generator=gen))])
                for _ in range(6)]
    batch = {**collate(examples, 0), "subject_index": torch.tensor([4, 4, 4, 4, 4, -1])}
    options = dict(steps=12, lr=0.02, decay=0.0, clamp=5.0)
    by_loss = subject_deltas(model, 2, [batch], **options)[0].norm(dim=-1)
    by_argmax = subject_deltas(model, 2, [batch], **options, stop="argmax")[0].norm(dim=-1)
    assert (by_argmax[:5] > 0).all() and (by_argmax[:5] < 0.5 * by_loss[:5]).all()
    assert float(by_argmax[5]) == float(by_loss[5]) == 0


def test_subject_optimise_writes_delta_over_n_at_the_subject_rows():
    """``subject_optimise``: in the modules below ``subject_depth`` the subject rows' value is the
    optimised delta divided by how many such modules there are (together they add delta to the
    residual stream); everything else is the turn as before."""
    from ultraedit.subject_values import subject_deltas

    model = tiny_model("llama")
    ref_model, plain = copy.deepcopy(model), copy.deepcopy(model)
    names = [f"model.layers.{i}.mlp.down_proj" for i in (0, 1, 2, 3)]
    batches = with_subjects(random_turn(7, requests=12, batch_size=4), 7, low=1)
    options = dict(modules=names, lr=1e-3, subject_depth=0.5)
    z = dict(steps=4, lr=0.3, decay=0.5, clamp=0.5)
    deltas = torch.cat([d[b["subject_index"] >= 0]
                        for d, b in zip(subject_deltas(model, 2, batches, **z), batches)])
    UltraEditor(model, EditConfig(**options, subject_optimise=4, subject_lr=0.3, subject_clamp=0.5)).edit_tokens(batches)
    reference_turn(ref_model, names, batches, {}, lr=1e-3, subject_only=names[:2], subject_values=deltas)
    UltraEditor(plain, EditConfig(**options)).edit_tokens(batches)
    for n in names:
        torch.testing.assert_close(model.get_submodule(n).weight, ref_model.get_submodule(n).weight, rtol=1e-4, atol=1e-6)
    for n in names[:2]:
        assert not torch.allclose(plain.get_submodule(n).weight, model.get_submodule(n).weight, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="subject_optimise needs subject_depth"):
        EditConfig(subject_optimise=4)
    for bad in ({"subject_optimise": -1}, {"subject_lr": 0.0}, {"subject_clamp": float("inf")}, {"subject_decay": -1.0},
                {"subject_contexts": -1}, {"subject_contexts": 1.5}, {"subject_stop": "never"}):
        with pytest.raises(ValueError, match="EditConfig"):
            EditConfig(**bad)


def test_subject_optimise_spreads_delta_over_every_lower_module_of_any_shape():
    """Modules of two shapes (MLP down_proj and attention o_proj, both writing the residual
    stream) below the split share one ``delta``: each gets ``delta / n`` with ``n`` counted over
    both shapes, as the plain reference does; upper modules of another output width (up_proj)
    are left to their target rows; a module below the split that does not write the residual
    stream is refused before anything changes."""
    from ultraedit.subject_values import subject_deltas

    model = tiny_model("llama")
    ref_model = copy.deepcopy(model)
    lower = [f"model.layers.{i}.{kind}" for i in (0, 1) for kind in ("mlp.down_proj", "self_attn.o_proj")]
    names = lower + [f"model.layers.{i}.{kind}" for i in (2, 3) for kind in ("mlp.down_proj", "self_attn.o_proj", "mlp.up_proj")]
    batches = with_subjects(random_turn(7, requests=12, batch_size=4), 7, low=1)
    deltas = torch.cat([d[b["subject_index"] >= 0]
                        for d, b in zip(subject_deltas(model, 2, batches, steps=4, lr=0.3, decay=0.5, clamp=0.5), batches)])
    config = EditConfig(modules=names, lr=1e-3, subject_depth=0.5, subject_optimise=4, subject_lr=0.3, subject_clamp=0.5)
    UltraEditor(model, config).edit_tokens(batches)
    reference_turn(ref_model, names, batches, {}, lr=1e-3, subject_only=lower, subject_values=deltas)
    for n in names:
        torch.testing.assert_close(model.get_submodule(n).weight, ref_model.get_submodule(n).weight, rtol=1e-4, atol=1e-6)
    untouched = tiny_model("llama")
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    with pytest.raises(EditError, match="model.layers.0.mlp.up_proj.*residual stream"):
        UltraEditor(untouched, EditConfig(modules=["model.layers.0.mlp.up_proj"] + names, lr=1e-3, subject_depth=0.5,
                                          subject_optimise=4))
    assert all(torch.equal(v, before[k]) for k, v in untouched.state_dict().items())


def test_edit_with_subject_kl_builds_each_rows_essence_prompt():
    """``subject_kl`` in :meth:`UltraEditor.edit`: each minibatch row gets ``"{subject} is a"`` with
    its subject's last token marked (-1 without a subject), and the KL term changes the turn."""
    from ultraedit.batching import minibatches, subject_position
    from ultraedit.subject_values import essence_batches

    model, tok = _text_model()
    batches, order = minibatches(tok, SUBJECT_REQUESTS, 2, subjects=True)
    subjects = [[SUBJECT_REQUESTS[i].extra.get("subject") for i in order[b * 2 : b * 2 + 2]] for b in range(len(batches))]
    essence = essence_batches(tok, subjects)
    for rows, batch in zip(subjects, essence):
        for row, subject in enumerate(rows):
            length = int(batch["attention_mask"][row].sum())
            ids = batch["input_ids"][row, :length].tolist()
            if subject is None:
                assert int(batch["subject_index"][row]) == -1
                continue
            assert ids == list(tok(f"{subject} is a")["input_ids"])
            assert int(batch["subject_index"][row]) == subject_position(tok, f"{subject} is a", subject) >= 0
            assert (batch["labels"][row] != -100).nonzero().flatten().tolist() == [length - 1]
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(4)]
    options = dict(modules=names, lr=1e-3, subject_keys=1.0, subject_depth=0.5, subject_optimise=3, subject_lr=0.5)
    with_kl, without = _text_model()[0], _text_model()[0]
    UltraEditor(with_kl, EditConfig(**options, subject_kl=5.0), tokenizer=tok).edit(SUBJECT_REQUESTS)
    UltraEditor(without, EditConfig(**options), tokenizer=tok).edit(SUBJECT_REQUESTS)
    assert not torch.allclose(with_kl.get_submodule(names[0]).weight, without.get_submodule(names[0]).weight)
    torch.testing.assert_close(with_kl.get_submodule(names[3]).weight, without.get_submodule(names[3]).weight)


def test_edit_with_subject_contexts_searches_behind_the_generic_sentences():
    """``subject_contexts`` in :meth:`UltraEditor.edit`: each row's copies are its request behind
    the sentences :func:`ultraedit.neighbours.with_prefixes` draws, subject located in each, owned
    by the row; the search then gives other subject values (the upper modules' first step is the
    same), and the turn's rows are the prompts as given."""
    from ultraedit.batching import minibatches, subject_of, subject_position
    from ultraedit.neighbours import with_prefixes
    from ultraedit.subject_values import context_batches

    model, tok = _text_model()
    batches, order = minibatches(tok, SUBJECT_REQUESTS, 2, subjects=True)
    rows = [[SUBJECT_REQUESTS[i] for i in order[b * 2 : b * 2 + 2]] for b in range(len(batches))]
    for requests, batch in zip(rows, context_batches(tok, rows, 3)):
        assert batch["input_ids"].shape[0] == 3 * len(requests)
        for owner in range(len(requests)):
            copies, _ = with_prefixes([requests[owner]], 3)
            expected = sorted(c.prompt for c in copies[1:])
            mine = (batch["owner"] == owner).nonzero().flatten().tolist()
            prompts = []
            for row in mine:
                length = int(batch["attention_mask"][row].sum())
                ids = batch["input_ids"][row, :length].tolist()
                prompt = next(c.prompt for c in copies[1:] if tok(c.prompt)["input_ids"] == ids[: len(tok(c.prompt)["input_ids"])])
                prompts.append(prompt)
                subject = subject_of(requests[owner])
                assert int(batch["subject_index"][row]) == (subject_position(tok, prompt, subject) if subject else -1)
            assert sorted(prompts) == expected
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(4)]
    options = dict(modules=names, lr=1e-3, subject_keys=1.0, subject_depth=0.5, subject_optimise=3, subject_lr=0.5)
    with_contexts, without = _text_model()[0], _text_model()[0]
    report = UltraEditor(with_contexts, EditConfig(**options, subject_contexts=2), tokenizer=tok).edit(SUBJECT_REQUESTS)
    UltraEditor(without, EditConfig(**options), tokenizer=tok).edit(SUBJECT_REQUESTS)
    assert report.requests == len(SUBJECT_REQUESTS) and len(report.order) == len(SUBJECT_REQUESTS)
    assert not torch.allclose(with_contexts.get_submodule(names[0]).weight, without.get_submodule(names[0]).weight)
    torch.testing.assert_close(with_contexts.get_submodule(names[3]).weight, without.get_submodule(names[3]).weight)
