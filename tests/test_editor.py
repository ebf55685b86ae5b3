import copy

import pytest
import torch

import ultraedit
from ultraedit import EditConfig, EditError, UltraEditor
from ultraedit.core.presets import resolve_modules

from reference import reference_turn
from tiny import ARCHS, random_turn, tiny_model

LR = 1e-3  # larger than the authors' 1e-6 so that shifts feed back into later turns visibly

EXTRA_MODULES = {"phi3": ["model.layers.2.mlp.gate_up_proj", "model.layers.3.mlp.down_proj"]}


def edit_modules(model, arch):
    return EXTRA_MODULES.get(arch) or resolve_modules(model)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_reference_after_five_turns(arch):
    model = tiny_model(arch)
    ref_model = copy.deepcopy(model)
    names = edit_modules(model, arch)
    base = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    editor = UltraEditor(model, EditConfig(modules=names, lr=LR))
    ref_norms = {}
    for turn in range(5):
        batches = random_turn(100 + turn)
        editor.edit_tokens(batches)
        reference_turn(ref_model, names, batches, ref_norms, lr=LR)
    for n in names:
        ours = model.get_submodule(n).weight.detach() - base[n]
        ref = ref_model.get_submodule(n).weight.detach() - base[n]
        rel = float((ours - ref).norm() / ref.norm())
        assert ref.norm() > 0
        assert rel <= 1e-4, f"{arch} {n}: relative error {rel:.2e}"
    for shape, norm in editor.normalizers.items():
        ref = ref_norms[shape]
        assert norm.n == ref.n
        torch.testing.assert_close(norm.mean.double(), ref.mean, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(norm.std.double(), ref.std, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_faithful_turn_is_the_editors_turn_and_the_reference(arch):
    """``core.turn.faithful_turn``, the method in one function, is the editor's turn with
    ``EditConfig()``'s method (the same weights, bit for bit, and the same statistics) and the plain
    reference's, over three turns."""
    from ultraedit import faithful_turn
    from ultraedit.core.turn import new_normalizers

    model = tiny_model(arch)
    plain, ref_model = copy.deepcopy(model), copy.deepcopy(model)
    names = edit_modules(model, arch)
    base = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    editor = UltraEditor(model, EditConfig(modules=names, lr=LR, runtime={"forward_batch_size": None}))
    modules = {n: plain.get_submodule(n) for n in names}
    normalizers, ref_norms = new_normalizers(modules), {}
    for turn in range(3):
        batches = random_turn(50 + turn)
        editor.edit_tokens(batches)
        shifts = faithful_turn(plain, modules, batches, normalizers, lr=LR)
        reference_turn(ref_model, names, batches, ref_norms, lr=LR)
        assert set(shifts) == set(names)
    for n in names:
        assert torch.equal(plain.get_submodule(n).weight, model.get_submodule(n).weight), n
        ours = plain.get_submodule(n).weight.detach() - base[n]
        ref = ref_model.get_submodule(n).weight.detach() - base[n]
        assert float((ours - ref).norm() / ref.norm()) <= 1e-4, n
    for shape, norm in editor.normalizers.items():
        assert torch.equal(norm.mean, normalizers[shape].mean) and norm.n == normalizers[shape].n


BF16_TOLERANCE = 0.06  # relative to the float32 run's change; measured 0.010-0.041 over the 7 families


def cumulative_change(model, names, seeds, lr, **editor_kw):
    """The edit modules' total weight change (float32, flattened) after one turn per seed."""
    editor = UltraEditor(model, EditConfig(modules=names, lr=lr), **editor_kw)
    base = {n: editor.modules[n].weight.detach().float().clone() for n in names}
    for seed in seeds:
        report = editor.edit_tokens(random_turn(seed))
        assert all(torch.isfinite(torch.tensor(v)) for v in report.shift_norms.values())
    for n in names:
        assert editor.modules[n].weight.dtype == model.dtype and torch.isfinite(editor.modules[n].weight).all()
    assert all(norm.dtype == torch.float32 for norm in editor.normalizers.values())
    return torch.cat([(editor.modules[n].weight.detach().float() - base[n]).flatten() for n in names])


def relative_error(change, reference):
    return float((change - reference).norm() / reference.norm())


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_edit_matches_the_float32_edit(arch):
    names = edit_modules(tiny_model(arch), arch)
    reference = cumulative_change(tiny_model(arch), names, [0, 1], LR)
    change = cumulative_change(tiny_model(arch, dtype=torch.bfloat16), names, [0, 1], LR)
    assert relative_error(change, reference) <= BF16_TOLERANCE


def test_small_bf16_shifts_accumulate_instead_of_vanishing():
    """lr 3e-6: each turn's shift is ~ one bf16 rounding step of the weights. Rounded into the
    weights turn by turn (the old behaviour) the edit drifts from the float32 one (cosine ~0.71);
    kept in a float32 delta and written as round(W_base + delta) it follows it (~0.95)."""
    names = resolve_modules(tiny_model("llama"))
    seeds = range(20)
    reference = cumulative_change(tiny_model("llama"), names, seeds, 3e-6)
    kept = cumulative_change(tiny_model("llama", dtype=torch.bfloat16), names, seeds, 3e-6)
    rounded = cumulative_change(tiny_model("llama", dtype=torch.bfloat16), names, seeds, 3e-6, delta_accumulation="weights")

    def cosine(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    assert cosine(kept, reference) >= 0.93
    assert cosine(rounded, reference) <= 0.85


def test_a_turn_mostly_lost_to_rounding_is_reported_and_warned():
    import warnings

    model = tiny_model("llama", dtype=torch.bfloat16)
    editor = UltraEditor(model, EditConfig(lr=5e-7), delta_accumulation="weights")
    with pytest.warns(ultraedit.editor.LostShiftWarning, match=r"turn 1: most of the weight shift was lost to bfloat16"):
        report = editor.edit_tokens(random_turn(0))
    assert set(report.applied_norms) == set(report.shift_norms) == set(editor.modules)
    assert min(report.applied_fractions.values()) < 0.5
    kept = UltraEditor(tiny_model("llama", dtype=torch.bfloat16), EditConfig(lr=5e-7))  # default: nothing is lost
    with warnings.catch_warnings():
        warnings.simplefilter("error", ultraedit.editor.LostShiftWarning)
        report = kept.edit_tokens(random_turn(0))
    for name, module in kept.modules.items():  # the float32 delta holds the whole intended shift
        assert float(kept.session.delta[name].norm()) == pytest.approx(report.shift_norms[name], rel=1e-6)


def test_merged_forward_equals_one_forward_per_minibatch():
    model = tiny_model("llama")
    other = copy.deepcopy(model)
    names = resolve_modules(model)
    merged = UltraEditor(model, EditConfig(modules=names, lr=LR, runtime={"forward_batch_size": None}))
    single = UltraEditor(other, EditConfig(modules=names, lr=LR, runtime={"forward_batch_size": 10}))
    for turn in range(3):
        batches = random_turn(turn, requests=30)
        merged.edit_tokens(batches)
        single.edit_tokens(batches)
    for n in names:
        torch.testing.assert_close(model.get_submodule(n).weight, other.get_submodule(n).weight, rtol=1e-5, atol=1e-7)


def test_no_hooks_grads_or_requires_grad_left_behind():
    model = tiny_model("llama")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    editor = UltraEditor(model, EditConfig(lr=LR))
    editor.edit_tokens(random_turn(0))
    assert model.training
    for name, p in model.named_parameters():
        assert p.grad is None, name
        assert p.requires_grad == flags[name]
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks


def test_requires_grad_false_during_capture():
    model = tiny_model("llama")
    seen = []
    handle = model.model.layers[0].register_forward_hook(
        lambda m, a, o: seen.append(any(p.requires_grad for p in model.parameters()))
    )
    UltraEditor(model, EditConfig(lr=LR)).edit_tokens(random_turn(0))
    handle.remove()
    assert seen and not any(seen)


def test_edit_raises_target_probability():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the capital of france is paris lyon berlin germany city who".split()
    vocab = {"[PAD]": 0, "[BOS]": 1, "[UNK]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    model = tiny_model("llama", hidden=64)
    request = ultraedit.EditRequest("the capital of france is", "lyon")
    before = ultraedit.score_pairs(model, tokenizer, [(request.prompt, request.target)])["logprob"][0]
    editor = UltraEditor(model, EditConfig(lr=1e-2), tokenizer=tokenizer)
    report = editor.edit([request])
    after = ultraedit.score_pairs(model, tokenizer, [(request.prompt, request.target)])["logprob"][0]
    assert report.requests == 1 and after > before + 0.1, (before, after)
    assert editor.turns == 1 and editor.edits == 1


# ---------------------------------------------------------------- errors leave the model untouched

def test_unknown_module_is_a_clear_error():
    model = tiny_model("llama")
    with pytest.raises(EditError, match="model.layers.9.mlp.up_proj.*does not exist"):
        UltraEditor(model, EditConfig(modules=["model.layers.9.mlp.up_proj"]))
    with pytest.raises(EditError, match="only nn.Linear"):
        UltraEditor(model, EditConfig(modules=["model.layers.1.mlp"]))


def test_empty_target_names_the_request():
    model = tiny_model("llama")
    before = weights(model)
    editor = UltraEditor(model, EditConfig(lr=LR))
    batches = random_turn(0)
    batches[1]["labels"][3] = -100
    with pytest.raises(EditError, match="minibatch 1, row 3: empty target"):
        editor.edit_tokens(batches)
    assert_untouched(model, before)
    assert editor.turns == 0 and all(n.n == 0 for n in editor.normalizers.values())


def test_mismatched_batch_keys():
    model = tiny_model("llama")
    before = weights(model)
    editor = UltraEditor(model, EditConfig(lr=LR))
    batches = random_turn(0)
    batches[1]["label"] = batches[1].pop("labels")
    with pytest.raises(EditError, match=r"minibatch 1: keys must be .*missing \['labels'\].*unexpected \['label'\]"):
        editor.edit_tokens(batches)
    batches = random_turn(0)
    batches[0]["attention_mask"] = batches[0]["attention_mask"][:, :-1]
    with pytest.raises(EditError, match="minibatch 0: 'attention_mask' has shape"):
        editor.edit_tokens(batches)
    assert_untouched(model, before)


def test_nan_gradients_leave_model_and_statistics_untouched():
    model = tiny_model("llama")
    editor = UltraEditor(model, EditConfig(lr=LR))
    editor.edit_tokens(random_turn(0))
    before = weights(model)
    stats = {s: n.clone() for s, n in editor.normalizers.items()}
    names = list(editor.modules)
    # Poison the top edited layer's output so the loss (and every gradient) becomes NaN.
    top = model.get_submodule(names[-1])
    handle = top.register_forward_hook(lambda m, a, o: o * float("nan"))
    with pytest.raises(EditError, match="non-finite .* at module"):
        editor.edit_tokens(random_turn(1))
    handle.remove()
    assert_untouched(model, before)
    assert editor.turns == 1
    for s, n in editor.normalizers.items():
        assert n.n == stats[s].n and torch.equal(n.mean, stats[s].mean) and torch.equal(n.var, stats[s].var)


def test_shifts_are_held_in_the_dtype_they_are_added_in_and_apply_exactly():
    from ultraedit.core.solver import ridge_solve

    # the solve kept in float32 and rounded (what commit did before) equals the rounded solve
    keys = torch.randn(3, 40, 32, dtype=torch.float64)
    values = torch.randn(3, 40, 88, dtype=torch.float64)
    full = ridge_solve(keys, values, 1.0)
    for dtype in (torch.bfloat16, torch.float32):
        torch.testing.assert_close(ridge_solve(keys, values, 1.0, out_dtype=dtype), full.to(dtype), rtol=0, atol=0)

    # delta_accumulation="weights": bf16 shifts, each added to the bf16 weight (W += round(dW))
    model = tiny_model("llama", dtype=torch.bfloat16)
    editor = UltraEditor(model, EditConfig(lr=LR), delta_accumulation="weights")
    pending = editor.prepare(random_turn(0))
    assert {s.dtype for s in pending.shifts.values()} == {torch.bfloat16}
    before = {n: m.weight.detach().clone() for n, m in editor.modules.items()}
    editor.commit(pending)
    for n, m in editor.modules.items():
        assert torch.equal(m.weight, before[n] + pending.shifts[n].T), n

    # default: float32 shifts summed into a float32 delta; the weight is round(W_base + delta)
    model = tiny_model("llama", dtype=torch.bfloat16)
    editor = UltraEditor(model, EditConfig(lr=LR))
    total = {}
    for seed in range(3):
        pending = editor.prepare(random_turn(seed))
        assert {s.dtype for s in pending.shifts.values()} == {torch.float32}
        editor.commit(pending)
        for n in editor.modules:
            total[n] = total.get(n, 0) + pending.shifts[n].T
    for n, m in editor.modules.items():
        assert torch.equal(editor.session.delta[n], total[n]), n
        assert torch.equal(m.weight, (editor.session.base[n].float() + editor.session.delta[n]).to(torch.bfloat16)), n


def test_shift_that_overflows_float16_is_refused():
    model = tiny_model("llama", dtype=torch.float16)
    before = weights(model)
    editor = UltraEditor(model, EditConfig(lr=1e12))  # finite in float32, inf in float16
    with pytest.raises(EditError, match="not finite in the weights' dtype"):
        editor.edit_tokens(random_turn(0))
    assert_untouched(model, before)
    assert editor.turns == 0


def test_text_request_with_empty_target():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "a": 1, "b": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]")
    model = tiny_model("llama")
    before = weights(model)
    editor = UltraEditor(model, EditConfig(lr=LR), tokenizer=tokenizer)
    reqs = [ultraedit.EditRequest("a b", "a"), ultraedit.EditRequest("a", "   ", id="r2")]
    with pytest.raises(EditError, match=r"request 1 \(id='r2'\).*tokenizes to no tokens"):
        editor.edit(reqs)
    assert_untouched(model, before)


def test_config_validation():
    with pytest.raises(ValueError, match="lr"):
        EditConfig(lr=0)
    with pytest.raises(ValueError, match="normalizer"):
        EditConfig(normalizer="chan")
    with pytest.raises(ValueError, match="ridge"):
        EditConfig(ridge=-1)
    assert EditConfig.from_dict(EditConfig(lr=2e-6).to_dict()).lr == 2e-6


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_tail_split_equals_full_pass(arch):
    from ultraedit.core.capture import capture

    model = tiny_model(arch)
    names = edit_modules(model, arch)
    modules = {n: model.get_submodule(n) for n in names}
    batches = random_turn(7, requests=20)
    split = capture(model, modules, batches, split_prefix=True)
    full = capture(model, modules, batches, split_prefix=False)
    for a, b in zip(split, full):
        assert a.rows == b.rows
        for n in names:
            torch.testing.assert_close(a.keys[n], b.keys[n], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.grads[n], b.grads[n], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_mlps_compute_real_tokens_only_and_change_nothing(arch):
    from ultraedit.core.capture import PackedMLPs

    model = tiny_model(arch)
    batch = random_turn(3, requests=6)[0]
    valid = batch["attention_mask"] != 0
    assert not bool(valid.all())  # the batch has padding to skip
    seen: list[tuple[int, ...]] = []
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with PackedMLPs(model) as packer:
            assert len(packer.mlps) == model.config.num_hidden_layers
            spy = [m.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape))) for m in packer.mlps]
            packer.valid = valid
            packed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            for handle in spy:
                handle.remove()
    assert set(seen) == {(int(valid.sum()), model.config.hidden_size)}
    torch.testing.assert_close(packed[valid], full[valid], rtol=1e-5, atol=1e-6)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in packer.mlps)  # nothing left behind


def test_split_falls_back_for_left_padding_and_empty_prefix():
    from ultraedit.core.capture import _split

    batch = random_turn(0, requests=3)[0]
    assert _split(batch) is not None
    left = {k: v.flip(1) for k, v in batch.items()}
    assert _split(left) is None
    batch["labels"][0, 0] = 5
    assert _split(batch) is None


def test_stale_pending_turn_is_refused():
    model = tiny_model("llama")
    editor = UltraEditor(model, EditConfig(lr=LR))
    first = editor.prepare(random_turn(0))
    second = editor.prepare(random_turn(1))
    editor.commit(first)
    before = weights(model)
    with pytest.raises(EditError, match="prepared as turn 1, but the editor is at turn 1"):
        editor.commit(second)
    assert_untouched(model, before)
    assert editor.turns == 1
