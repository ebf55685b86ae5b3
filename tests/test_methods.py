"""Baselines (ultraedit.methods) against plain computations of their published updates.

Each reference below is written from the method's formula alone: one request at a time, full
model forwards with hooks, float64 solves with explicit inverses, no code shared with the package.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from tests.tiny import VOCAB, tiny_model
from ultraedit.core.batching import collate
from ultraedit.methods.alphaedit import AlphaEditMethod, AlphaEditParams
from ultraedit.methods.common import Encoded, MethodError
from ultraedit.methods.ft import FTMethod, FTParams
from ultraedit.methods.grace import Codebook, GraceMethod, GraceParams
from ultraedit.methods.memit import MEMITMethod, MEMITParams, compute_targets
from ultraedit.methods.wise import SideMemory, WiseMethod, WiseParams, ties_merge

DOWN = "model.layers.{}.mlp.down_proj"


def encoded(seed: int, n: int = 6) -> Encoded:
    """Random requests: prompts of 3-7 tokens, targets of 1-3, a random key position in the prompt."""
    gen = torch.Generator().manual_seed(seed)
    examples, lookup, last, targets = [], [], [], []
    for _ in range(n):
        p, t = int(torch.randint(3, 8, (1,), generator=gen)), int(torch.randint(1, 4, (1,), generator=gen))
        prompt = torch.randint(3, VOCAB, (p,), generator=gen).tolist()
        target = torch.randint(3, VOCAB, (t,), generator=gen).tolist()
        examples.append((prompt + target[:-1], [-100] * (p - 1) + target))
        lookup.append(int(torch.randint(0, p, (1,), generator=gen)))
        last.append(p - 1)
        targets.append(tuple(target))
    b = collate(examples, 0)
    return Encoded(b["input_ids"], b["attention_mask"], b["labels"], torch.tensor(lookup), torch.tensor(last), targets)


def rows(batch: Encoded):
    """Each request unpadded: (input_ids (1, L), labels (L,), lookup, prompt_last)."""
    for i in range(batch.input_ids.shape[0]):
        n = int(batch.attention_mask[i].sum())
        yield batch.input_ids[i : i + 1, :n], batch.labels[i, :n], int(batch.lookup[i]), int(batch.prompt_last[i])


def target_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    mask = labels != -100
    return F.cross_entropy(logits[mask].float(), labels[mask])


def random_moment(d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(4 * d, d, generator=gen) * torch.linspace(0.05, 2.0, d)
    return keys.T @ keys / keys.shape[0]


def freeze(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------- MEMIT / AlphaEdit
def ref_targets(model, batch, layer, steps, lr, wd, clamp, stop_loss=5e-2):
    """MEMIT's target values, one request at a time as the published loop (stop once the loss is
    below ``stop_loss``; the last iteration takes no step), delta added to layer ``layer``'s output."""
    freeze(model)
    out = []
    for ids, labels, pos, _ in rows(batch):
        with torch.no_grad():
            h0 = model(ids, output_hidden_states=True).hidden_states[layer + 1][0, pos]
        delta = torch.zeros_like(h0, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=lr)

        def add(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            h = h.clone()
            h[0, pos] = h[0, pos] + delta
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handle = model.model.layers[layer].register_forward_hook(add)
        for it in range(steps):
            loss = target_loss(model(ids).logits[0], labels) + wd * delta.norm() / h0.norm() ** 2
            if loss < stop_loss or it == steps - 1:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                if delta.norm() > clamp * h0.norm():
                    delta.mul_(clamp * h0.norm() / delta.norm())
        handle.remove()
        out.append((h0 + delta).detach())
    return torch.stack(out)


def keys_and_hidden(model, batch, name, layer):
    """(keys at each request's key position, decoder layer ``layer``'s output there), plain forwards."""
    keys, hidden = [], []
    for ids, _, pos, _ in rows(batch):
        seen = {}
        handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.update(k=a[0][0, pos]))
        with torch.no_grad():
            hidden.append(model(ids, output_hidden_states=True).hidden_states[layer + 1][0, pos])
        handle.remove()
        keys.append(seen["k"])
    return torch.stack(keys).double(), torch.stack(hidden).double()


def ref_memit_turn(model, batch, layers, moments, p, alpha=None):
    """One MEMIT turn; with ``alpha=(projectors, past_keys, L2)`` AlphaEdit's projected update."""
    z = ref_targets(model, batch, layers[-1], p.v_num_grad_steps, p.v_lr, p.v_weight_decay, p.clamp_norm_factor,
                    p.v_early_stop_loss)
    for j, layer in enumerate(layers):
        name = DOWN.format(layer)
        k, h = keys_and_hidden(model, batch, name, layers[-1])
        r = (z.double() - h) / (len(layers) - j)
        if alpha is None:
            dw = r.T @ k @ torch.linalg.inv(p.mom2_update_weight * moments[name].double() + k.T @ k)
        else:
            proj, past, l2 = alpha[0][j], alpha[1][j], alpha[2]
            eye = torch.eye(k.shape[1], dtype=torch.float64)
            dw = (torch.linalg.inv(proj @ (k.T @ k + past) + l2 * eye) @ proj @ k.T @ r).T
        with torch.no_grad():
            model.get_submodule(name).weight += dw.float()
    if alpha is not None:
        for j, layer in enumerate(layers):
            k, _ = keys_and_hidden(model, batch, DOWN.format(layer), layers[-1])
            alpha[1][j] += k.T @ k


def memit_params(cls=MEMITParams, **kw):
    return cls(**{"layers": [1, 2], "v_num_grad_steps": 8, "v_lr": 0.1, "v_weight_decay": 0.5,
                  "clamp_norm_factor": 0.75, "mom2_update_weight": 2.0, **kw})


def test_memit_matches_plain_formula():
    model = tiny_model("llama", seed=1)
    base = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    moments = {DOWN.format(l): random_moment(64, l) for l in (1, 2)}
    p = memit_params()
    method = MEMITMethod(model, None, p, progress=False, moments=moments)
    batch = encoded(0)
    method.edit_encoded(batch)
    ref_memit_turn(ref, batch, [1, 2], moments, memit_params())
    for l in (1, 2):
        got = model.get_submodule(DOWN.format(l)).weight - base.get_submodule(DOWN.format(l)).weight
        want = ref.get_submodule(DOWN.format(l)).weight - base.get_submodule(DOWN.format(l)).weight
        assert want.norm() > 1e-3
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-5)


def test_memit_targets_stop_per_request_as_the_published_loop():
    """Each request stops on its own loss: at once, midway, or never, and leaves the batch then."""
    model = freeze(tiny_model("llama", seed=1))
    batch = encoded(0)
    opts = {"v_lr": 1.0, "v_weight_decay": 0.0, "clamp_norm_factor": 4.0}
    got, _ = compute_targets(model, batch, 2, memit_params(**opts, v_early_stop_loss=4.52))
    want = ref_targets(model, batch, 2, 8, 1.0, 0.0, 4.0, 4.52)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    never = ref_targets(model, batch, 2, 8, 1.0, 0.0, 4.0, -1.0)
    h0 = ref_targets(model, batch, 2, 1, 1.0, 0.0, 4.0, -1.0)
    at_once = (want == h0).all(1)
    not_stopped = (want == never).all(1)
    assert at_once.any() and not_stopped.any() and (~at_once & ~not_stopped).any()


def plain_projector(moment: torch.Tensor, threshold: float) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(moment.double())
    small = u[:, s < threshold]
    return small @ small.T


def test_alphaedit_matches_plain_formula_over_two_turns():
    model = tiny_model("llama", seed=2)
    base = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    moments = {DOWN.format(l): random_moment(64, 10 + l) for l in (1, 2)}
    threshold = float(torch.linalg.eigvalsh(moments[DOWN.format(1)]).median())
    p = memit_params(AlphaEditParams, nullspace_threshold=threshold, L2=0.5)
    method = AlphaEditMethod(model, None, p, progress=False, moments=moments)
    projectors = [plain_projector(moments[DOWN.format(l)], threshold) for l in (1, 2)]
    assert 0 < int(torch.linalg.matrix_rank(projectors[0])) < 64
    past = [torch.zeros(64, 64, dtype=torch.float64) for _ in (1, 2)]
    for seed in (3, 4):
        batch = encoded(seed)
        method.edit_encoded(batch)
        ref_memit_turn(ref, batch, [1, 2], moments, memit_params(), alpha=(projectors, past, 0.5))
    for l in (1, 2):
        name = DOWN.format(l)
        got = model.get_submodule(name).weight - base.get_submodule(name).weight
        want = ref.get_submodule(name).weight - base.get_submodule(name).weight
        assert want.norm() > 1e-4
        torch.testing.assert_close(got, want, rtol=5e-3, atol=5e-5)
        # the update lies in the null space: preserved keys (the moment's large directions) are untouched
        assert (got.double() @ (torch.eye(64, dtype=torch.float64) - projectors[l - 1])).norm() < 1e-4 * got.norm() + 1e-6


# --------------------------------------------------------------------------- FT-M
def test_ft_matches_plain_finetuning():
    model = tiny_model("llama", seed=5)
    ref = freeze(copy.deepcopy(model))
    batches = [encoded(6, 4), encoded(7, 3)]
    FTMethod(model, None, FTParams(layer=2, num_steps=3, lr=1e-2)).edit_encoded(batches)
    weight = ref.get_submodule(DOWN.format(2)).weight
    weight.requires_grad_(True)
    opt = torch.optim.Adam([weight], lr=1e-2)
    for _ in range(3):
        for b in batches:
            logits = ref(b.input_ids, attention_mask=b.attention_mask).logits
            loss = target_loss(logits, b.labels)  # mean over the minibatch's target tokens only
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.testing.assert_close(model.get_submodule(DOWN.format(2)).weight, weight.detach(), rtol=1e-4, atol=1e-6)
    for l in (0, 1, 3):  # nothing else moved
        torch.testing.assert_close(model.get_submodule(DOWN.format(l)).weight, ref.get_submodule(DOWN.format(l)).weight)


# --------------------------------------------------------------------------- GRACE
def plain_insert(book, key, label, eps):
    """GRACE's codebook rule on plain lists: book = [keys, radii, labels]."""
    keys, radii, labels = book
    if not keys:
        keys.append(key), radii.append(eps), labels.append(label)
        return 0
    dists = [float((k - key).norm()) for k in keys]
    i = min(range(len(dists)), key=dists.__getitem__)
    if dists[i] > eps + radii[i]:
        keys.append(key), radii.append(eps), labels.append(label)
        return len(keys) - 1
    if labels[i] != label:
        keys.append(key), radii.append(dists[i] / 2), labels.append(label)
        radii[i] = dists[i] / 2 - 1e-5
        return len(keys) - 1
    radii[i] = max(radii[i], dists[i])
    return i


def test_grace_codebook_rules_and_replacement():
    gen = torch.Generator().manual_seed(0)
    book, plain = Codebook(4, 3, torch.device("cpu")), [[], [], []]
    base = torch.randn(5, 4, generator=gen) * 3
    for step in range(40):  # keys near a few centres, labels that sometimes agree
        centre = int(torch.randint(0, 5, (1,), generator=gen))
        key = base[centre] + 0.7 * torch.randn(4, generator=gen)
        label = (centre, int(torch.randint(0, 2, (1,), generator=gen)))
        got = book.insert(key, label, 1.0, torch.full((3,), float(step)))
        assert got == plain_insert(plain, key, label, 1.0)
    torch.testing.assert_close(book.keys, torch.stack(plain[0]))
    torch.testing.assert_close(book.radii, torch.tensor(plain[1]))
    assert book.labels == plain[2]

    inputs, outputs = torch.randn(3, 6, 4, generator=gen) * 3, torch.randn(3, 6, 3, generator=gen)
    inputs[0, 2] = book.keys[4]  # an exact hit at position 2 of sequence 0
    values = torch.randn(len(book), 3, generator=gen)
    got = book.replace(inputs, outputs, values)
    for b in range(3):
        active = None
        for t in range(6):
            if active is None:
                d = (book.keys - inputs[b, t]).norm(dim=1)
                if d.min() <= book.radii[d.argmin()]:
                    active = int(d.argmin())
            want = outputs[b, t] if active is None else values[active]
            torch.testing.assert_close(got[b, t], want)
    assert torch.equal(got[0, 2], values[4]) and torch.equal(got[0, :2], outputs[0, :2])


def test_grace_value_training_matches_plain_adam():
    model = tiny_model("llama", seed=8)
    ref = freeze(copy.deepcopy(model))
    batch = encoded(9, 1)
    params = GraceParams(layer=2, eps=1e-5, n_iter=5, edit_lr=0.1)  # tiny activations: a tight radius
    method = GraceMethod(model, None, params, seed=3)
    method.edit_encoded(batch)
    (ids, labels, _, last), = rows(batch)
    value = torch.rand(32, generator=torch.Generator().manual_seed(3)).requires_grad_(True)  # "cold"

    def replace(module, args, output):
        out = output.clone()
        out[0, last:] = value  # the key is this prompt's own: a hit at the last prompt token
        return out

    handle = ref.get_submodule(DOWN.format(2)).register_forward_hook(replace)
    opt = torch.optim.Adam([value], lr=0.1)
    for _ in range(5):
        loss = target_loss(ref(ids).logits[0], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    handle.remove()
    torch.testing.assert_close(method.codebook.values[0], value.detach(), rtol=1e-4, atol=1e-5)
    # the adaptor is live on the model: the edit's logits equal the reference's
    with torch.no_grad():
        handle = ref.get_submodule(DOWN.format(2)).register_forward_hook(replace)
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)
        handle.remove()
        other = torch.tensor([[5, 6, 7, 8]])  # far from the key: untouched
        torch.testing.assert_close(model(other).logits, ref(other).logits)


# --------------------------------------------------------------------------- WISE
def wise_batch(seed: int) -> Encoded:
    """Three template rows of one request (prompts of different lengths, the same target), then an
    unrelated row without labels: WISE's training batch for one edit."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(3, VOCAB, (2,), generator=gen).tolist()
    examples = []
    for p in (4, 6, 3):
        prompt = torch.randint(3, VOCAB, (p,), generator=gen).tolist()
        examples.append((prompt + target[:-1], [-100] * (p - 1) + target))
    loc = torch.randint(3, VOCAB, (5,), generator=gen).tolist()
    examples.append((loc, [-100] * 5))
    b = collate(examples, 0)
    n = len(examples)
    return Encoded(b["input_ids"], b["attention_mask"], b["labels"], torch.zeros(n, dtype=torch.long),
                   torch.zeros(n, dtype=torch.long), [])


def plain_distance(out0, out):
    """Mean over tokens of ||silu(out) - silu(out0)|| for one unpadded sequence ``(T, d)``."""
    return (F.silu(out) - F.silu(out0)).norm(dim=-1).mean()


def ref_wise_edit(model, batch, layer, mask, p):
    """One WISE edit, plain: each row run alone through the whole model with down_proj's output
    replaced by ``x W^T``; SGD with the gradient masked, clamped to ``W0 +- norm_constraint``."""
    module = model.get_submodule(DOWN.format(layer))
    base = module.weight.detach().clone()
    weight = base.clone().requires_grad_(True)
    seen = {}

    def replace(mod, args, out):
        seen["out0"], seen["new"] = out[0], F.linear(args[0], weight)[0]
        return F.linear(args[0], weight)

    handle = module.register_forward_hook(replace)
    opt = torch.optim.SGD([weight], lr=p.edit_lr, weight_decay=p.weight_decay)
    a_min = None
    for it in range(p.n_iter):
        ft, d = [], []
        for ids, labels, _, _ in rows(batch):
            logits = model(ids).logits[0]
            if (labels != -100).any():
                ft.append(target_loss(logits, labels))
            d.append(plain_distance(seen["out0"], seen["new"]))
        d_in, d_out = torch.stack(d[:-1]), d[-1]
        hinge = lambda x: x[x > 0].mean() if (x > 0).any() else x.new_zeros(())  # noqa: E731
        loss = (torch.stack(ft).mean() + hinge(d_out - d_in + p.gamma) + hinge(d_out.view(1) - p.alpha)
                + hinge(p.beta - d_in))
        if it == p.n_iter - 1:
            a_min = float(d_in.detach().mean())
        opt.zero_grad()
        loss.backward()
        weight.grad *= mask
        opt.step()
        with torch.no_grad():
            weight.copy_(weight.clamp(min=base - p.norm_constraint, max=base + p.norm_constraint))
    handle.remove()
    return weight.detach(), a_min


def test_wise_edit_matches_plain_training():
    model = tiny_model("llama", seed=11)
    ref = freeze(copy.deepcopy(model))
    params = WiseParams(layer=2, n_iter=4, edit_lr=0.5, mask_ratio=0.5, norm_constraint=0.05)
    method = WiseMethod(model, None, params, seed=2, prefixes=[])
    batch = wise_batch(3)
    method.edit_encoded(batch)
    want, a_min = ref_wise_edit(ref, batch, 2, method.memory.mask, params)
    got = method.memory.current
    assert (got - method.memory.base).abs().max() > 1e-3  # it moved, inside the clamp
    assert (got - method.memory.base).abs().max() <= 0.05 + 1e-6
    assert 0.3 < float(method.memory.mask.mean()) < 0.7
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert method.memory.current_min == pytest.approx(a_min, rel=1e-4)
    torch.testing.assert_close(model.get_submodule(DOWN.format(2)).weight, ref.get_submodule(DOWN.format(2)).weight)


def test_wise_routes_each_sequence_by_its_activation_distance():
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(3, 4, generator=gen)
    memory = SideMemory(base)
    memory.current = base + 0.5 * torch.randn(3, 4, generator=gen)
    memory.current_min = 1.0
    memory.shards = [(base + torch.randn(3, 4, generator=gen), 2.0), (base + 2 * torch.randn(3, 4, generator=gen), 13.0)]
    x = torch.randn(6, 5, 4, generator=gen) * torch.linspace(0.1, 2.0, 6)[:, None, None]
    mask = torch.ones(6, 5)
    mask[1, 3:] = 0
    out0 = F.linear(x, base)
    got = memory.route(x, out0, F.silu, mask, ratio=0.5)
    chosen = set()
    for b in range(6):
        n = int(mask[b].sum())
        outs = [F.linear(x[b, :n], w) for w in (memory.current, *(w for w, _ in memory.shards))]
        best = plain_distance(out0[b, :n], outs[0])
        pick = 0 if best >= 0.5 * memory.current_min else None
        for i, (_, a) in enumerate(memory.shards, start=1):
            d = plain_distance(out0[b, :n], outs[i])
            if d > best and d > 0.5 * a:
                pick, best = i, d
        chosen.add(pick)
        torch.testing.assert_close(got[b, :n], out0[b, :n] if pick is None else outs[pick], rtol=1e-5, atol=1e-6)
    assert chosen == {None, 0, 1, 2}  # main memory, the side memory and each shard all occur


def test_ties_merge_matches_the_plain_rule():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(2, 5, generator=gen)
    weights = [base + torch.randn(2, 5, generator=gen) for _ in range(3)]
    got = ties_merge(base, weights, density=0.6)
    deltas = []
    for w in weights:
        d = (w - base).flatten()
        keep = sorted(range(10), key=lambda i: -abs(float(d[i])))[:6]
        deltas.append([float(d[i]) / 3 if i in keep else 0.0 for i in range(10)])
    for i in range(10):
        column = [d[i] for d in deltas]
        sign = 1.0 if sum(column) >= 0 else -1.0
        agree = [v for v in column if v != 0 and (v > 0) == (sign > 0)]
        want = float(base.flatten()[i]) + (sum(agree) / (len(agree) / 3) if agree else 0.0)
        assert float(got.flatten()[i]) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_wise_saves_shards_and_merges_on_schedule():
    model = tiny_model("llama", seed=12)
    params = WiseParams(layer=2, n_iter=2, edit_lr=0.5, save_freq=2, merge_freq=4)
    method = WiseMethod(model, None, params, seed=0, prefixes=[])
    memory, saved = method.memory, []
    save = memory.save
    memory.save = lambda: (saved.append((memory.current.clone(), memory.current_min)), save())[1]
    masks = []
    for i in range(5):
        method.edit_encoded(wise_batch(20 + i))
        masks.append(memory.mask)
        if i == 1:
            assert len(memory.shards) == 1 and torch.equal(memory.current, memory.base)
    assert [len(saved), len(memory.shards)] == [2, 1]  # shards of edits 1-2 and 3-4 merged at edit 4
    merged, a_min = memory.shards[0]
    torch.testing.assert_close(merged, ties_merge(memory.base, [w for w, _ in saved], params.densities))
    assert a_min == min(a for _, a in saved)
    assert not torch.equal(memory.current, memory.base)  # edit 5 in a fresh side memory
    assert masks[0] is masks[1] and masks[1] is not masks[2]  # one gradient mask per shard
    with pytest.raises(ValueError, match="multiple of save_freq"):
        WiseMethod(model, None, WiseParams(layer=2, save_freq=3, merge_freq=4), prefixes=[])


# --------------------------------------------------------------------------- key statistics
def test_second_moments_from_a_file_match_plain_and_are_cached(tmp_path, monkeypatch):
    from ultraedit.stages.statistics import second_moments
    from ultraedit.testbed import load_testbed

    monkeypatch.setenv("ULTRAEDIT_CACHE", str(tmp_path / "cache"))
    model, tok = load_testbed()
    text = tmp_path / "text.txt"
    text.write_text("The capital of Norland is Vell. Ada Brix plays the harp and lives in Oska. " * 6)
    name = "model.layers.1.mlp.down_proj"
    got, info = second_moments(model, tok, [name], text_file=str(text), length=16, batch=3, progress=False)
    assert info["cached"] is False
    ids = tok(text.read_text(), add_special_tokens=False)["input_ids"]
    rows_ = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: rows_.append(a[0][0]))
    with torch.no_grad():
        for i in range(0, len(ids), 16):
            model(torch.tensor([ids[i : i + 16]]))
    handle.remove()
    keys = torch.cat(rows_).double()
    torch.testing.assert_close(got[name], (keys.T @ keys / len(keys)).float(), rtol=1e-5, atol=1e-6)
    assert info["tokens"] == len(ids)
    again, info2 = second_moments(model, tok, [name], text_file=str(text), length=16, progress=False)
    assert info2["cached"] is True and torch.equal(again[name], got[name])
    gen1, _ = second_moments(model, tok, [name], sequences=2, length=8, seed=1, progress=False)
    assert gen1[name].shape == (384, 384) and torch.isfinite(gen1[name]).all()


# --------------------------------------------------------------------------- in the bench
@pytest.mark.parametrize("method", ["ft", "memit", "alphaedit", "grace", "wise"])
def test_bench_runs_each_baseline(method, tmp_path, monkeypatch):
    from ultraedit.bench import BenchConfig, run

    monkeypatch.setenv("ULTRAEDIT_CACHE", str(tmp_path / "cache"))
    options = {"ft": {"num_steps": "2"}, "grace": {"n_iter": "3"}, "wise": {"n_iter": "2", "templates": "2"}}.get(
        method, {"stats_sequences": "2", "stats_length": "16", "v_num_grad_steps": "3"})
    config = BenchConfig(model="testbed", dataset="testbed", out=str(tmp_path / "out"), turns=2, turn_size=5,
                         batch_size=5, method=method, progress=False, method_options=options)
    results = run(config)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["method"]["name"] == method and saved["method"]["modules"]
    assert 0 <= results["efficacy"] <= 1 and results["edits_per_second"] > 0
    assert len(saved["turn_log"]) == 2


def test_bench_rejects_unknown_option(tmp_path):
    from ultraedit.bench import BenchConfig, run

    config = BenchConfig(model="testbed", dataset="testbed", out=str(tmp_path), turns=1, turn_size=5,
                         method="ft", progress=False, method_options={"nope": "1"})
    with pytest.raises(MethodError, match="ft has no option 'nope'"):
        run(config)


# --------------------------------------------------------------------------- ultraedit compare
def test_compare_writes_one_table_and_plot(tmp_path, capsys):
    from ultraedit.bench import BenchConfig, run
    from ultraedit.cli import main

    dirs = []
    for method, options in (("ultraedit", None), ("grace", {"n_iter": "2"})):
        out = tmp_path / method
        run(BenchConfig(model="testbed", dataset="testbed", out=str(out), turns=1, turn_size=5, batch_size=5,
                        method=method, progress=False, method_options=options))
        dirs.append(str(out))
    assert main(["compare", *dirs, "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| ultraedit | testbed | testbed | 5 (5) |" in table and "| grace | testbed |" in table
    grace = next(line for line in table.splitlines() if line.startswith("| grace |")).split(" | ")
    results = json.loads((tmp_path / "grace" / "results.json").read_text())
    ppl = results["perplexity"]
    assert grace[7] == f"{100 * results['metrics']['retention']:.1f}"  # the retention column
    said = results["generation"]["plain"]  # what the model says, plain context: ES, GS, loc.
    assert grace[9:12] == [f"{100 * said[k]:.1f}" for k in ("efficacy", "generalization", "locality_unchanged")]
    assert grace[12] == f"{100 * (ppl['after'] / ppl['before'] - 1):+.1f}%"
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 1000
    assert main(["compare", str(tmp_path / "cmp")]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_ultraedit_refuses_method_options(tmp_path):
    from ultraedit.bench import BenchConfig, BenchError, run

    config = BenchConfig(model="testbed", dataset="testbed", out=str(tmp_path), turns=1, turn_size=5,
                         progress=False, method_options={"v_lr": "1"})
    with pytest.raises(BenchError, match="ultraedit takes no --method-option"):
        run(config)
