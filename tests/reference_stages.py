"""Plain versions of the stages beyond the paper (ultraedit/stages), for equivalence tests.

Built on reference.py's plain capture and values; each stage's term is written out as the stage's
docstring states it: preserved keys ``P`` in the system, the subject/target split of the rows, key
outliers, the optimised subject values, the pull-back ``- Q D`` on the right-hand side, refinement
steps, the subject search's loop, and the paraphrase sampler's continuation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reference import add_shift, reference_capture, reference_statistics, reference_values, shape_of


def minus_base_term(rhs, module, name, base_term):
    """``rhs - Q D`` for ``base_term = (Q, base)`` (``D = W - W_base`` of ``module`` now, ``(d_in, d_out)``); ``rhs`` when None."""
    if base_term is None:
        return rhs
    drift = (module.weight.detach() - base_term[1][name]).double()
    return rhs - base_term[0][name].double() @ (drift.T if isinstance(module, torch.nn.Linear) else drift)


def stage_values(V, K, n, subject_row, outliers=0.0, subject_only=(), frozen=(), subject_values=None):
    """The values after the stages: the subject search's values in the ``subject_only`` modules (divided
    by their count), rows with key norm over ``outliers`` x the median (the lower middle value) zeroed,
    the subject/target split, and every row of a ``frozen`` module zeroed."""
    V = V.clone()
    if subject_values is not None and n in subject_only:
        for j, i in enumerate(i for i, is_subject in enumerate(subject_row) if is_subject):
            V[i] = subject_values[j].double() / len(subject_only)
    if outliers > 0:
        norms = [float(row.norm()) for row in K]
        median = sorted(norms)[(len(norms) - 1) // 2]
        for i, value in enumerate(norms):
            if value > outliers * median:
                V[i] = 0.0
    if subject_only:
        for i, is_subject in enumerate(subject_row):
            if is_subject != (n in subject_only):
                V[i] = 0.0
    if n in frozen:
        V[:] = 0.0
    return V


def reference_stage_turn(model, names, batches, normalizers, lr=1e-6, ridge=1.0, formula="paper", preserve=None,
                         keys_out=None, outliers=0.0, subject_only=(), frozen=(), subject_values=None, base_term=None):
    """One turn with the stages' terms: ``preserve`` (name -> d_in x d_in) added to the system;
    ``keys_out`` (a dict) receives each module's keys (float64); the values as :func:`stage_values`
    makes them; ``base_term`` (``(Q, base)``): the right-hand side is ``K^T V - Q D``."""
    modules = {n: model.get_submodule(n) for n in names}
    captured = reference_capture(model, names, batches)
    subject_row = torch.cat([c["subject"] for c in captured]).tolist()
    shifts = {}
    for n, (K, G) in reference_statistics(captured, modules, normalizers, formula).items():
        V = reference_values(K, G, normalizers[shape_of(modules[n])], lr)
        V = stage_values(V, K, n, subject_row, outliers, subject_only, frozen, subject_values)
        A = K.T @ K + ridge * torch.eye(K.shape[1], dtype=K.dtype)
        if preserve is not None:
            A = A + preserve[n].double()
        if keys_out is not None:
            keys_out[n] = K
        shifts[n] = torch.linalg.solve(A, minus_base_term(K.T @ V, modules[n], n, base_term))
    for n, m in modules.items():
        add_shift(m, shifts[n])
    return shifts


def reference_refined_turn(model, names, batches, normalizers, steps, lr=1e-6, ridge=1.0, preserve=None,
                           subject_only=(), base_term=None):
    """A turn with refinement steps (EditConfig.refine), plainly: step 1 is reference_stage_turn; each
    later step re-captures, stops if every request is right, else solves
    (K_w^T K_w + K_r^T K_r + ridge I + P) dW = K_w^T V_w for the wrong rows w, the right rows r kept
    (normalizer statistics from step 1, not updated again), and applies dW. ``preserve`` (name -> P,
    d_in x d_in) is in every step's system, ``subject_only`` splits every step's rows, ``base_term``
    is in every step (``D`` then includes the turn's earlier steps)."""
    reference_stage_turn(model, names, batches, normalizers, lr=lr, ridge=ridge, preserve=preserve,
                         subject_only=subject_only, base_term=base_term)
    modules = {n: model.get_submodule(n) for n in names}
    for _ in range(1, steps):
        captured = reference_capture(model, names, batches)
        wrong = torch.cat([c["wrong"] for c in captured])
        subject = torch.cat([c["subject"] for c in captured])
        if not bool(wrong.any()):
            return
        for n in names:
            K = torch.cat([c["keys"][n] for c in captured])
            G = torch.cat([c["grads"][n] for c in captured])
            V = reference_values(K, G, normalizers[shape_of(modules[n])], lr)
            if subject_only:
                V[subject != (n in subject_only)] = 0.0
            V = V[wrong]
            A = K.T @ K + ridge * torch.eye(K.shape[1], dtype=K.dtype)  # all rows: wrong + kept
            if preserve is not None:
                A = A + preserve[n].to(A.dtype)
            add_shift(modules[n], torch.linalg.solve(A, minus_base_term(K[wrong].T @ V, modules[n], n, base_term)))


def reference_subject_delta(model, block, input_ids, labels, position, steps, lr, decay, clamp, stop_loss=0.05):
    """ROME/MEMIT's ``z`` for one unpadded sequence, plainly: ``delta`` added to ``block``'s output at
    ``position``; Adam on mean target NLL + decay ||delta||^2 / ||h||^2 (h: the unedited hidden state
    there), stopping once the NLL is at most ``stop_loss``, each step projected into ||delta|| <=
    clamp ||h||. Returns ``delta`` (``(hidden,)``)."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    with torch.no_grad():
        hidden = {}

        def keep(m, a, out):
            hidden["h"] = (out[0] if isinstance(out, tuple) else out)[0, position].clone()

        handle = block.register_forward_hook(keep)
        model(input_ids=input_ids[None])
        handle.remove()
    h_norm = float(hidden["h"].norm())
    delta = torch.zeros_like(hidden["h"], requires_grad=True)

    def add(m, a, out):
        h = out[0] if isinstance(out, tuple) else out
        shift = torch.zeros_like(h)
        shift[0, position] = delta
        return (h + shift,) + tuple(out[1:]) if isinstance(out, tuple) else h + shift

    optimiser = torch.optim.Adam([delta], lr=lr)
    handle = block.register_forward_hook(add)
    for _ in range(steps):
        logits = model(input_ids=input_ids[None]).logits[0]
        mask = labels != -100
        nll = F.cross_entropy(logits[mask].float(), labels[mask])
        if float(nll.detach()) <= stop_loss:
            break
        optimiser.zero_grad()
        (nll + decay * delta.square().sum() / h_norm**2).backward()
        optimiser.step()
        with torch.no_grad():
            if float(delta.norm()) > clamp * h_norm:
                delta.mul_(clamp * h_norm / float(delta.norm()))
    handle.remove()
    return delta.detach()


@torch.no_grad()
def reference_continuation(model, tokenizer, ids, seed, temperature, top_p, max_new_tokens):
    """One sampled continuation of the token list ``ids``: a full forward over the whole sequence
    at every step (no cache, no padding), nucleus sampling by a per-token loop, one uniform of a
    generator seeded ``seed % 2**63`` per step; stops after a token that is the end of text, the
    pad token or contains a newline. Returns the text (special tokens skipped)."""
    gen = torch.Generator().manual_seed(seed % 2**63)
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    ids, made = list(ids), []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        probs = torch.softmax(logits / temperature, -1).double().tolist()
        ranked = sorted(range(len(probs)), key=lambda t: -probs[t])
        kept, mass = [], 0.0
        for token in ranked:
            if mass >= top_p:
                break
            kept.append(token)
            mass += probs[token]
        u, running, token = float(torch.rand((), generator=gen)), 0.0, kept[-1]
        for candidate in kept:
            running += probs[candidate] / mass
            if running > u:
                token = candidate
                break
        ids.append(token)
        made.append(token)
        if token in stop or "\n" in tokenizer.decode([token]):
            break
    return tokenizer.decode(made, skip_special_tokens=True)
