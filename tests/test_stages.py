"""Each stage beyond the paper (ultraedit/stages) against its plain version (reference_stages.py),
and the pieces the stages share."""

import copy
import math

import pytest
import torch
from reference import reference_turn
from reference_stages import reference_refined_turn, reference_stage_turn, reference_subject_delta
from tiny import ARCHS, random_turn, tiny_model, tiny_text_model

from ultraedit import EditConfig, EditError, EditRequest, UltraEditor
from ultraedit.core.capture import capture
from ultraedit.core.presets import resolve_modules
from ultraedit.core.solver import Preserved, ridge_solve
from ultraedit.stages import Stage
from ultraedit.stages.neighbours import neighbour_grams, neighbour_pairs
from ultraedit.core.batching import subject_of
from ultraedit.stages.subject import subject_deltas

REFINE = {"steps": 3, "confidence": 0.0}
SUBJECT_ONLY = {"depth": 0.5, "search": None}  # the split alone: subject rows from the batches' subject_index


def stage(editor, name):
    return next(s for s in editor.stages if s.name == name)


def relative_error(model, ref_model, base, name):
    ours = model.get_submodule(name).weight.detach() - base[name]
    ref = ref_model.get_submodule(name).weight.detach() - base[name]
    return float((ours - ref).norm() / ref.norm())


SUBJECT_REQUESTS = [
    EditRequest("The capital of France is", "Rome", extra={"subject": "France"}),
    EditRequest("The capital of Spain is", "Oslo", extra={"subject": "Spain"}),
    EditRequest("Paris is located in the country of", "Peru", extra={"subject": "Paris"}),
    EditRequest("Danielle Darrieux speaks", "Dutch", extra={"subject": "Danielle Darrieux"}),
    EditRequest("No subject here is", "given"),
]


# --------------------------------------------------------------------------- configuration
def test_the_default_configuration_is_the_authors_method_and_builds_no_stage():
    config = EditConfig()
    assert config.stages() == [] and config.lr_scale == "none" and config.module_lr((576, 1536)) == config.lr
    assert UltraEditor(tiny_model("llama"), config).stages == []


def test_width_lr_scale_keeps_the_row_norm_of_v_at_the_reference_shape():
    config = EditConfig(lr=1e-6, lr_scale="width")
    assert config.module_lr((4096, 14336)) == pytest.approx(1e-6)
    assert config.module_lr((576, 1536)) == pytest.approx(1e-6 * 4096 * math.sqrt(14336) / (576 * math.sqrt(1536)))


@pytest.mark.parametrize("bad,message", [
    ({"lr_scale": "auto"}, "lr_scale"), ({"refine": {"steps": 0}}, "refine.steps"),
    ({"refine": {"confidence": 1.0}}, "refine.confidence"), ({"generic": {"weight": -1.0}}, "generic.weight"),
    ({"generic": {"weight": 0.0, "pull_back": 0.0}}, "generic needs weight or pull_back"),
    ({"generic": {"text": "wikipedia"}}, "generic.text"), ({"memory": {"weight": float("nan")}}, "memory.weight"),
    ({"neighbours": {"count": -1}}, "neighbours.count"), ({"neighbours": {"weight": 0.0}}, "neighbours.weight"),
    ({"subject": {"weight": -1.0}}, "subject.weight"), ({"subject": {"depth": 1.5}}, "subject.depth"),
    ({"subject": {"depth": 0.0}}, "subject.search needs subject.depth"),
    ({"subject": {"search": {"steps": -1}}}, "subject.search.steps"), ({"subject": {"search": {"lr": 0.0}}}, "search.lr"),
    ({"subject": {"search": {"clamp": float("inf")}}}, "search.clamp"), ({"outliers": {"ratio": 0}}, "outliers.ratio"),
    ({"paraphrases": {"count": 0}}, "paraphrases.count"), ({"runtime": {"solver": "lu"}}, "runtime.solver"),
    ({"subject": {"search": {"stop": "argmax"}}}, "unknown EditConfig.subject.search fields"),
])
def test_bad_values_are_refused_naming_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        EditConfig(**bad)


# --------------------------------------------------------------------------- the ridge with preserved terms
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


class FixedRidge(Stage):
    """A stage through the ridge hook alone: a fixed ``(d_in, d_in)`` term per module."""

    name = "fixed"

    def ridge(self, turn, group):
        return torch.stack([self.config[n] for n in group])


@pytest.mark.parametrize("solver", ["dual", "primal"])
def test_refine_steps_with_a_ridge_term_match_a_plain_implementation(solver):
    """Every refinement step solves against the turn's ridge terms, the right rows kept as well."""
    model = tiny_model("llama")
    ref_model = copy.deepcopy(model)
    names = resolve_modules(model)
    gen = torch.Generator().manual_seed(3)
    grams = {}
    for n in names:
        rows = torch.randn(20, model.get_submodule(n).weight.shape[1], generator=gen)
        grams[n] = 5.0 * rows.T @ rows
    editor = UltraEditor(model, EditConfig(modules=names, lr=0.3, refine=REFINE, runtime={"solver": solver}))
    editor.stages.append(FixedRidge(grams))
    base = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    batches = random_turn(210)
    assert editor.edit_tokens(batches).steps > 1
    reference_refined_turn(ref_model, names, batches, {}, steps=3, lr=0.3, preserve=grams)
    for n in names:
        assert relative_error(model, ref_model, base, n) <= 1e-3, n


# --------------------------------------------------------------------------- generic-text keys
@pytest.mark.parametrize("arch,steps,factored", [("llama", 1, True), ("gpt2", 1, True), ("llama", 3, True),
                                                  ("llama", 3, False)])
def test_the_pull_back_penalises_the_cumulative_shift_like_a_plain_solve(arch, steps, factored, monkeypatch):
    """``generic = {weight: alpha, pull_back: gamma}``: every solve is ``(K^T K + lambda I + (alpha +
    gamma) E0) dW = K^T V - gamma E0 D``, ``D`` the module's shift since the unedited model (earlier
    turns and this turn's earlier steps), against a plain primal solve; without the pull-back the same
    turns differ. ``factored=False``: the preserved system cannot be factored (the primal fallback)."""
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
    refine = {"steps": steps, "confidence": 0.0}
    editors = []
    for pull_back, target in ((gamma, model), (0.0, plain)):
        editor = UltraEditor(target, EditConfig(modules=names, lr=0.3, refine=refine,
                                                generic={"weight": alpha, "text": "package", "pull_back": pull_back}))
        stage(editor, "generic").moments = moments  # E0 without a tokenizer
        editors.append(editor)
    normalizers = {}
    for turn in range(2):
        batches = random_turn(400 + turn)
        reports = [editor.edit_tokens(batches) for editor in editors]
        assert reports[0].steps == steps or (steps > 1 and reports[0].steps > 1)
        grams = {n: (alpha + gamma) * moments[n] for n in names}
        base_term = ({n: gamma * moments[n] for n in names}, base)
        if steps == 1:
            reference_stage_turn(ref_model, names, batches, normalizers, lr=0.3, preserve=grams, base_term=base_term)
        else:
            reference_refined_turn(ref_model, names, batches, normalizers, steps=steps, lr=0.3, preserve=grams,
                                   base_term=base_term)
    for n in names:
        assert relative_error(model, ref_model, base, n) <= 1e-3, n
        assert not torch.allclose(plain.get_submodule(n).weight, model.get_submodule(n).weight, rtol=1e-4, atol=1e-6)


def test_generic_key_moments_match_a_plain_one_sequence_at_a_time_computation():
    from ultraedit.stages.common import key_moments
    from ultraedit.texts import package_text, text_batches

    model, tok = tiny_text_model()
    names = resolve_modules(model)
    modules = {n: model.get_submodule(n) for n in names}
    ours = key_moments(model, tok, modules)
    inputs = {}
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: inputs.__setitem__(n, args[0][0])) for n, m in modules.items()]
    sums = {n: 0 for n in names}
    count = 0
    with torch.no_grad():
        for batch in text_batches(tok, package_text("generic.txt"), batch_size=1):  # one unpadded sequence per forward
            model(input_ids=batch["input_ids"])
            count += batch["input_ids"].shape[1]
            for n in names:
                sums[n] = sums[n] + inputs[n].double().T @ inputs[n].double()
    for h in handles:
        h.remove()
    for n in names:
        torch.testing.assert_close(ours[n].double(), sums[n] / count, rtol=1e-4, atol=1e-6)


def test_generic_text_takes_e0_over_the_package_text_or_text_the_model_samples(tmp_path, monkeypatch):
    """``generic.text``: ``E0`` is the package text's or the model-generated text's
    (:func:`ultraedit.stages.statistics.second_moments`, tested against a plain computation in
    test_methods), taken on the model as given, before any edit; a turn without a tokenizer is refused."""
    from ultraedit.stages.common import key_moments
    from ultraedit.stages.statistics import second_moments

    monkeypatch.setenv("ULTRAEDIT_CACHE", str(tmp_path / "cache"))
    model, tok = tiny_text_model()
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(4)]
    modules = {n: model.get_submodule(n) for n in names}
    expected = {"package": key_moments(model, tok, modules), "generated": second_moments(model, tok, names, progress=False)[0]}
    after = {}
    for text in ("package", "generated"):
        config = EditConfig(modules=names, lr=1e-3, generic={"weight": 5.0, "text": text, "pull_back": 0.0})
        editor = UltraEditor(copy.deepcopy(model), config, tokenizer=tok)
        for n in names:
            torch.testing.assert_close(stage(editor, "generic").moments[n], expected[text][n])
        editor.edit_tokens(random_turn(3, vocab=60))
        after[text] = editor.model.get_submodule(names[0]).weight.detach().clone()
    assert not torch.allclose(after["package"], after["generated"])
    untouched = copy.deepcopy(model)
    with pytest.raises(EditError, match="generic needs the tokenizer"):
        UltraEditor(untouched, EditConfig(modules=names, generic={"text": "package"})).edit_tokens(random_turn(1, vocab=60))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in untouched.state_dict().items())


# --------------------------------------------------------------------------- the key memory
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_key_memory_matches_a_plain_sum_of_earlier_turns_keys(arch):
    """With ``memory={weight: beta}``, turn t solves ``(K^T K + lambda I + beta sum_{s<t} K_s^T K_s)^-1
    K^T V``, with each K_s as captured in its own turn (before that turn's shift)."""
    model = tiny_model(arch)
    ref_model = copy.deepcopy(model)
    names = resolve_modules(model)
    beta, lr = 2.0, 1e-3
    editor = UltraEditor(model, EditConfig(modules=names, lr=lr, memory={"weight": beta}))
    ref_norms, memory = {}, None
    for turn in range(3):
        batches = random_turn(300 + turn)
        editor.edit_tokens(batches)
        keys = {}
        preserve = None if memory is None else {n: beta * memory[n] for n in names}
        reference_stage_turn(ref_model, names, batches, ref_norms, lr=lr, preserve=preserve, keys_out=keys)
        memory = {n: keys[n].T @ keys[n] + (0 if memory is None else memory[n]) for n in names}
        for n in names:
            torch.testing.assert_close(stage(editor, "memory").memory[n].double(), memory[n], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(model.get_submodule(n).weight, ref_model.get_submodule(n).weight, rtol=1e-4, atol=1e-6)


def test_key_memory_holds_earlier_edits_in_place():
    """The memory keeps a turn from moving the outputs at earlier turns' keys: with a large beta,
    turn 2 changes the edit modules' outputs at turn 1's keys far less than without a memory."""
    moved = {}
    for beta in (None, 1e4):
        model = tiny_model("llama")
        names = resolve_modules(model)
        memory = None if beta is None else {"weight": beta}
        editor = UltraEditor(model, EditConfig(modules=names, lr=1e-2, memory=memory))
        first = random_turn(400)
        editor.edit_tokens(first)
        keys = {n: torch.cat([mb.keys[n] for mb in capture(model, editor.modules, first)]) for n in names}
        with torch.no_grad():
            before = {n: model.get_submodule(n)(keys[n]) for n in names}
        editor.edit_tokens(random_turn(401))
        with torch.no_grad():
            moved[beta] = sum(float((model.get_submodule(n)(keys[n]) - before[n]).norm()) for n in names)
    assert moved[1e4] < 0.05 * moved[None]


# --------------------------------------------------------------------------- refinement
@pytest.mark.parametrize("lr", [1e-3, 0.3])  # 0.3: some requests are right after step 1, some not
def test_refine_steps_match_a_plain_implementation(lr):
    model = tiny_model("llama")
    ref_model = copy.deepcopy(model)
    names = resolve_modules(model)
    base = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    editor = UltraEditor(model, EditConfig(modules=names, lr=lr, refine=REFINE))
    ref_norms, steps = {}, []
    for turn in range(2):
        batches = random_turn(200 + turn)
        steps.append(editor.edit_tokens(batches).steps)
        reference_refined_turn(ref_model, names, batches, ref_norms, steps=3, lr=lr)
    for n in names:
        assert relative_error(model, ref_model, base, n) <= 1e-3, n
    assert all(1 <= s <= 3 for s in steps)


def test_refine_steps_stop_when_every_request_is_right():
    model = tiny_model("llama")
    names = resolve_modules(model)
    batches = random_turn(5, requests=4, batch_size=2)
    editor = UltraEditor(model, EditConfig(modules=names, lr=1.0, refine={"steps": 20, "confidence": 0.0}))
    report = editor.edit_tokens(batches)
    assert 1 < report.steps < 20  # refined, then stopped early: all right
    assert all(bool(mb.hits.all()) for mb in capture(model, editor.modules, batches))


def test_one_refine_step_is_the_faithful_turn():
    model = tiny_model("qwen2")
    ref_model = copy.deepcopy(model)
    names = resolve_modules(model)
    batches = random_turn(9)
    UltraEditor(model, EditConfig(modules=names, lr=1e-3, refine={"steps": 1})).edit_tokens(batches)
    reference_turn(ref_model, names, batches, {}, lr=1e-3)
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
    from ultraedit.core.capture import MinibatchCapture
    from ultraedit.stages.refine import unsolved_rows

    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, -100], [-100, 8, 9, 4]])  # 2 + 1 + 3 targets
    hits = torch.tensor([True, True, True, True, False, True])
    probs = torch.tensor([0.95, 0.60, 0.99, 0.97, 0.40, 0.99])
    mb = MinibatchCapture(keys={}, grads={}, rows=6, loss=0.0, hits=hits, probs=probs)
    rows = lambda c: unsolved_rows([{"labels": labels}], [mb], c).tolist()  # noqa: E731
    assert rows(0.0) == [False, False, False, True, True, True]  # argmax only: the third misses one
    assert rows(0.9) == [True, True, False, True, True, True]  # the first has a token at 0.60
    assert rows(0.5) == rows(0.0)


def test_refinement_with_confidence_keeps_editing_unsure_requests():
    steps = {}
    for confidence in (0.0, 0.5):
        model = tiny_model("llama")
        names = resolve_modules(model)
        batches = random_turn(5, requests=4, batch_size=2)
        editor = UltraEditor(model, EditConfig(modules=names, lr=1.0, refine={"steps": 6, "confidence": confidence}))
        steps[confidence] = editor.edit_tokens(batches).steps
    # the tiny random model's targets are right after 2 steps but far from probability 0.5
    assert steps == {0.0: 2, 0.5: 6}


# --------------------------------------------------------------------------- neighbours
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
    from ultraedit.core.batching import tokenize_pair

    model, tok = tiny_text_model()
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
    """``neighbours={count: k, weight: w}``: the turn is the faithful turn with ``w N^T N`` (the
    neighbour prompts' target-position keys on the model before the turn) added to the ridge."""
    from ultraedit.core.batching import minibatches

    model, tok = tiny_text_model()
    ref_model = copy.deepcopy(model)
    names = resolve_modules(model)
    weight, lr = 3.0, 1e-3
    config = EditConfig(modules=names, lr=lr, neighbours={"count": 2, "weight": weight})
    UltraEditor(model, config, tokenizer=tok).edit(SUBJECT_REQUESTS)
    grams = neighbour_grams(ref_model, tok, {n: ref_model.get_submodule(n) for n in names}, neighbour_pairs(SUBJECT_REQUESTS, 2))
    batches, _ = minibatches(tok, SUBJECT_REQUESTS, 10)
    reference_stage_turn(ref_model, names, batches, {}, lr=lr, preserve={n: weight * grams[n] for n in names})
    for n in names:
        torch.testing.assert_close(model.get_submodule(n).weight, ref_model.get_submodule(n).weight, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- subject rows
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
def test_subject_rows_match_a_plain_capture_at_the_subject_and_target_positions(arch):
    """With ``subject_index`` in the batches, each sequence adds the row (key at its subject position,
    output gradient there) to the turn; the prefix/tail split and passes that mix minibatches must
    give what a plain full forward per minibatch gives."""
    from test_editor import edit_modules

    model = tiny_model(arch)
    ref_model = copy.deepcopy(model)
    names = edit_modules(model, arch)
    base = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    editor = UltraEditor(model, EditConfig(modules=names, lr=1e-3, runtime={"forward_batch_size": 7}))
    ref_norms = {}
    for turn in range(2):
        batches = with_subjects(random_turn(300 + turn), turn, low=turn)  # turn 1: split; turn 0: mostly not
        report = editor.edit_tokens(batches)
        extra = sum(int((b["subject_index"] >= 0).sum()) for b in batches)
        assert report.rows[names[0]] == sum(int((b["labels"] != -100).sum()) for b in batches) + extra
        reference_turn(ref_model, names, batches, ref_norms, lr=1e-3)
    for n in names:
        assert relative_error(model, ref_model, base, n) <= 1e-4, n


def test_subject_rows_with_refine_steps_match_a_plain_implementation():
    model = tiny_model("llama")
    ref_model = copy.deepcopy(model)
    names = resolve_modules(model)
    base = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    batches = with_subjects(random_turn(210), 5)
    report = UltraEditor(model, EditConfig(modules=names, lr=0.3, refine=REFINE)).edit_tokens(batches)
    reference_refined_turn(ref_model, names, batches, {}, steps=3, lr=0.3)
    assert report.steps > 1
    for n in names:
        assert relative_error(model, ref_model, base, n) <= 1e-3, n


def test_subject_position_is_the_last_token_of_the_subject():
    from tiny import text_tokenizer

    from ultraedit.core.batching import SUBJECT_INDEX, minibatches, subject_position

    tok = text_tokenizer()
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


def test_the_subject_stage_adds_one_row_per_request_with_a_subject():
    model, tok = tiny_text_model()
    plain = UltraEditor(copy.deepcopy(model), EditConfig(lr=1e-3), tokenizer=tok).edit(SUBJECT_REQUESTS)
    config = EditConfig(lr=1e-3, subject={"weight": 1.0, "depth": 0.0, "search": None})
    subject = UltraEditor(model, config, tokenizer=tok).edit(SUBJECT_REQUESTS)
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
    """``outliers={ratio: r}``: rows whose key is longer than r x the module's median are rows of the
    ridge with value 0 (tiny random models have no massive activations: r = 1.15 marks some of the
    down_proj inputs, which no norm precedes)."""
    model = tiny_model("llama")
    ref_model = copy.deepcopy(model)
    names = [f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)]
    batches = random_turn(12)
    keys = torch.cat([mb.keys[names[0]] for mb in capture(model, {names[0]: model.get_submodule(names[0])}, batches)])
    norms = keys.norm(dim=1)
    outlying = int((norms > 1.15 * norms.median()).sum())
    assert 0 < outlying < len(norms) // 2
    UltraEditor(model, EditConfig(modules=names, lr=1e-3, outliers={"ratio": 1.15})).edit_tokens(batches)
    reference_stage_turn(ref_model, names, batches, {}, lr=1e-3, outliers=1.15)
    for n in names:
        torch.testing.assert_close(model.get_submodule(n).weight, ref_model.get_submodule(n).weight, rtol=1e-4, atol=1e-6)
    plain = tiny_model("llama")
    UltraEditor(plain, EditConfig(modules=names, lr=1e-3)).edit_tokens(batches)
    assert not torch.allclose(plain.get_submodule(names[0]).weight, model.get_submodule(names[0]).weight, rtol=1e-4, atol=1e-6)


def test_outliers_over_refinement_steps_are_judged_over_every_row_of_the_step():
    """The median a row is judged against is over all of the step's rows, the right ones included:
    a refined turn with outliers equals its plain version row for row (refinement's later steps
    carry no outlier rows on this model at r = 3, so the first step decides)."""
    model = tiny_model("llama")
    ref_model = copy.deepcopy(model)
    names = [f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)]
    base = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    batches = random_turn(12)
    UltraEditor(model, EditConfig(modules=names, lr=1e-3, outliers={"ratio": 3.0})).edit_tokens(batches)
    reference_stage_turn(ref_model, names, batches, {}, lr=1e-3, outliers=3.0)
    for n in names:
        assert relative_error(model, ref_model, base, n) <= 1e-4, n


def test_subject_depth_splits_the_rows_between_lower_and_upper_modules():
    """``subject.depth=0.5`` on a 4-layer model: layer 1 edits only the subject rows, layers 2-3 only
    the target rows; each module keeps the rows it does not edit in its ridge (value 0)."""
    model = tiny_model("llama")
    ref_model = copy.deepcopy(model)
    names = [f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)]
    batches = with_subjects(random_turn(21), 3, low=1)
    UltraEditor(model, EditConfig(modules=names, lr=1e-3, subject=SUBJECT_ONLY)).edit_tokens(batches)
    reference_stage_turn(ref_model, names, batches, {}, lr=1e-3, subject_only=names[:1])
    for n in names:
        torch.testing.assert_close(model.get_submodule(n).weight, ref_model.get_submodule(n).weight, rtol=1e-4, atol=1e-6)
    both = tiny_model("llama")
    UltraEditor(both, EditConfig(modules=names, lr=1e-3)).edit_tokens(batches)
    for n in names:
        assert not torch.allclose(both.get_submodule(n).weight, model.get_submodule(n).weight, rtol=1e-4, atol=1e-6)


def test_subject_depth_with_refine_steps_splits_every_step():
    model = tiny_model("llama")
    ref_model = copy.deepcopy(model)
    names = [f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)]
    base = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    batches = with_subjects(random_turn(210), 3, low=1)
    report = UltraEditor(model, EditConfig(modules=names, lr=0.3, refine=REFINE, subject=SUBJECT_ONLY)).edit_tokens(batches)
    reference_refined_turn(ref_model, names, batches, {}, steps=3, lr=0.3, subject_only=names[:1])
    assert report.steps > 1
    for n in names:
        assert relative_error(model, ref_model, base, n) <= 1e-3, n


def _subject_rows_deltas(model, block, batches, **options):
    """The reference ``delta`` of every sequence with a subject, one unpadded sequence at a time, in row order."""
    out = []
    for batch in batches:
        for row, position in enumerate(batch["subject_index"].tolist()):
            if position >= 0:
                length = int(batch["attention_mask"][row].sum())
                out.append(reference_subject_delta(model, block, batch["input_ids"][row, :length],
                                                   batch["labels"][row, :length], position, **options))
    return torch.stack(out)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_subject_deltas_match_a_plain_loop_per_sequence(arch):
    """``subject_deltas`` optimises a minibatch's deltas together (padded, logits at the targets only);
    each must be what the published loop gives for its sequence alone: Adam on its own loss, its own
    early stop, its own norm ball."""
    model = tiny_model(arch)
    batches = with_subjects(random_turn(5, requests=12, batch_size=4), 5)
    block = model.get_submodule("model.layers.1" if arch == "llama" else "transformer.h.1")
    options = dict(steps=6, lr=0.5, decay=0.5, clamp=0.75)
    found = subject_deltas(model, 2, batches, **options)
    ours = torch.cat([d[b["subject_index"] >= 0] for d, b in zip(found, batches)])
    assert all(p.requires_grad for p in model.parameters())  # the model's flags are restored
    reference = _subject_rows_deltas(model, block, batches, **options)
    assert float(reference.norm(dim=-1).min()) > 0
    torch.testing.assert_close(ours, reference, rtol=1e-3, atol=1e-4)
    assert all(float(d[b["subject_index"] < 0].abs().max()) == 0
               for d, b in zip(found, batches) if bool((b["subject_index"] < 0).any()))


def test_the_subject_search_writes_delta_over_n_at_the_subject_rows():
    """``subject.search``: in the modules below the split the subject rows' value is the optimised
    delta divided by how many such modules there are (together they add delta to the residual
    stream); everything else is the turn as before."""
    model = tiny_model("llama")
    ref_model, plain = copy.deepcopy(model), copy.deepcopy(model)
    names = [f"model.layers.{i}.mlp.down_proj" for i in (0, 1, 2, 3)]
    batches = with_subjects(random_turn(7, requests=12, batch_size=4), 7, low=1)
    search = dict(steps=4, lr=0.3, decay=0.5, clamp=0.5)
    deltas = torch.cat([d[b["subject_index"] >= 0] for d, b in zip(subject_deltas(model, 2, batches, **search), batches)])
    UltraEditor(model, EditConfig(modules=names, lr=1e-3, subject={"depth": 0.5, "search": search})).edit_tokens(batches)
    reference_stage_turn(ref_model, names, batches, {}, lr=1e-3, subject_only=names[:2], subject_values=deltas)
    UltraEditor(plain, EditConfig(modules=names, lr=1e-3, subject=SUBJECT_ONLY)).edit_tokens(batches)
    for n in names:
        torch.testing.assert_close(model.get_submodule(n).weight, ref_model.get_submodule(n).weight, rtol=1e-4, atol=1e-6)
    for n in names[:2]:
        assert not torch.allclose(plain.get_submodule(n).weight, model.get_submodule(n).weight, rtol=1e-4, atol=1e-6)


def test_the_subject_search_spreads_delta_over_every_lower_module_of_any_shape():
    """Modules of two shapes (MLP down_proj and attention o_proj, both writing the residual stream)
    below the split share one ``delta``: each gets ``delta / n`` with ``n`` counted over both shapes, as
    the plain reference does; upper modules of another output width (up_proj) are left to their target
    rows; a module below the split that does not write the residual stream is refused before
    anything changes."""
    model = tiny_model("llama")
    ref_model = copy.deepcopy(model)
    lower = [f"model.layers.{i}.{kind}" for i in (0, 1) for kind in ("mlp.down_proj", "self_attn.o_proj")]
    names = lower + [f"model.layers.{i}.{kind}" for i in (2, 3) for kind in ("mlp.down_proj", "self_attn.o_proj", "mlp.up_proj")]
    batches = with_subjects(random_turn(7, requests=12, batch_size=4), 7, low=1)
    search = dict(steps=4, lr=0.3, decay=0.5, clamp=0.5)
    deltas = torch.cat([d[b["subject_index"] >= 0] for d, b in zip(subject_deltas(model, 2, batches, **search), batches)])
    UltraEditor(model, EditConfig(modules=names, lr=1e-3, subject={"depth": 0.5, "search": search})).edit_tokens(batches)
    reference_stage_turn(ref_model, names, batches, {}, lr=1e-3, subject_only=lower, subject_values=deltas)
    for n in names:
        torch.testing.assert_close(model.get_submodule(n).weight, ref_model.get_submodule(n).weight, rtol=1e-4, atol=1e-6)
    untouched = tiny_model("llama")
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    with pytest.raises(EditError, match="model.layers.0.mlp.up_proj.*residual stream"):
        UltraEditor(untouched, EditConfig(modules=["model.layers.0.mlp.up_proj"] + names, lr=1e-3,
                                          subject={"depth": 0.5}))
    with pytest.raises(EditError, match="no edit module lies below subject.depth 0.5"):
        UltraEditor(untouched, EditConfig(modules=names[4:], lr=1e-3, subject={"depth": 0.5}))
    assert all(torch.equal(v, before[k]) for k, v in untouched.state_dict().items())
