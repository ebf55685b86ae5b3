"""An independent, deliberately plain implementation of the method page, for equivalence tests.

Written from ultraedit-method.md alone: full autograd WITH weight gradients, one forward/backward
per minibatch with the model's own full logits, per-row loops for the normalizer statistics in
float64, and the primal solve with torch.linalg.solve. It shares no code with the package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RefNormalizer:
    def __init__(self, dim: int, formula: str = "paper"):
        self.formula = formula
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.var = torch.zeros(dim, dtype=torch.float64)
        self.std = torch.zeros(dim, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        m = x.shape[0]
        n_new = self.n + m
        block_mean = sum(x[i] for i in range(m)) / m
        if m > 1:
            block_var = sum((x[i] - block_mean) ** 2 for i in range(m)) / (m - 1)
        else:
            block_var = torch.zeros_like(block_mean)
        delta = block_mean - self.mean
        self.mean = self.mean + m * delta / n_new
        factor = m if self.formula == "paper" else m - 1
        self.var = self.var + factor * block_var + self.n * m * delta**2 / n_new
        self.std = torch.sqrt(self.var / (n_new - 1 + torch.finfo(torch.float32).eps))
        self.n = n_new


def shape_of(module) -> tuple[int, int]:
    if isinstance(module, torch.nn.Linear):
        return (module.in_features, module.out_features)
    return (module.weight.shape[0], module.weight.shape[1])  # Conv1D


def key_positions(batch):
    """Where keys are taken: the target positions, plus each row's ``subject_index`` (when >= 0)."""
    mask = (batch["labels"] != -100).clone()
    for row, position in enumerate(batch.get("subject_index", torch.full((mask.shape[0],), -1)).tolist()):
        if position >= 0:
            mask[row, position] = True
    return mask


def reference_turn(model, names, batches, normalizers, lr=1e-6, ridge=1.0, formula="paper", preserve=None, keys_out=None,
                   outliers=0.0, subject_only=(), frozen=(), subject_values=None, base_term=None):
    """Apply one turn to ``model`` in place; ``normalizers`` (shape -> RefNormalizer) is updated.
    ``preserve`` (name -> d_in x d_in) is added to the ridge system; ``keys_out`` (a dict) receives
    each module's keys of the turn (float64). ``outliers`` > 0: rows whose key norm is above that
    multiple of the module's median (the lower middle value) get value 0. With ``subject_only``
    (module names), those modules give their target rows value 0 and the others their subject rows
    (batches with ``subject_index``). ``frozen`` (module names): every row of those modules gets
    value 0. ``subject_values`` (``(subject rows, d_out)``, in row order): the value of the subject
    rows in the ``subject_only`` modules, divided by how many of those there are. ``base_term``
    (``(Q, base)``: name -> ``d_in x d_in``, name -> the unedited weight): the right-hand side is
    ``K^T V - Q D`` with ``D`` the module's ``W - W_base`` before this turn, ``(d_in, d_out)``."""
    modules = {n: model.get_submodule(n) for n in names}
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    inputs, outputs = {}, {}

    def make_hook(name):
        def hook(mod, args, out):
            inputs[name] = args[0]
            out.retain_grad()
            outputs[name] = out

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    keys = {n: [] for n in names}
    grads = {n: [] for n in names}
    subject_row = []
    for batch in batches:
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask = batch["labels"] != -100
        loss = F.cross_entropy(logits[mask].float(), batch["labels"][mask])
        loss.backward()
        at = key_positions(batch)
        subject_row += (at & (batch["labels"] == -100))[at].tolist()
        for n in names:
            k = inputs[n][at].detach().double()
            g = outputs[n].grad[at].detach().double()
            shape = shape_of(modules[n])
            if shape not in normalizers:
                normalizers[shape] = RefNormalizer(sum(shape), formula)
            normalizers[shape].update(torch.cat([k, g], 1))
            keys[n].append(k)
            grads[n].append(g)
    for h in handles:
        h.remove()
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    shifts = {}
    for n in names:
        K = torch.cat(keys[n])
        G = torch.cat(grads[n])
        norm = normalizers[shape_of(modules[n])]
        z = (torch.cat([K, G], 1) - norm.mean) / (norm.std + torch.finfo(torch.float32).eps)
        K_hat, G_hat = z[:, : K.shape[1]], z[:, K.shape[1] :]
        V = -lr * (K_hat**2).sum(1, keepdim=True) * G_hat
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
        A = K.T @ K + ridge * torch.eye(K.shape[1], dtype=K.dtype)
        if preserve is not None:
            A = A + preserve[n].double()
        if keys_out is not None:
            keys_out[n] = K
        shifts[n] = torch.linalg.solve(A, _minus_base_term(K.T @ V, modules[n], n, base_term))
    with torch.no_grad():
        for n, m in modules.items():
            if isinstance(m, torch.nn.Linear):
                m.weight += shifts[n].T.to(m.weight.dtype)
            else:
                m.weight += shifts[n].to(m.weight.dtype)
    return shifts


def _minus_base_term(rhs, module, name, base_term):
    """``rhs - Q D`` for ``base_term = (Q, base)`` (``D = W - W_base`` of ``module`` now, ``(d_in, d_out)``); ``rhs`` when None."""
    if base_term is None:
        return rhs
    drift = (module.weight.detach() - base_term[1][name]).double()
    return rhs - base_term[0][name].double() @ (drift.T if isinstance(module, torch.nn.Linear) else drift)


def reference_capture(model, names, batches):
    """Plain per-minibatch capture: keys, output gradients (float64) at the key positions, and per
    key row whether every target token of its sequence is already the argmax."""
    modules = {n: model.get_submodule(n) for n in names}
    inputs, outputs = {}, {}

    def make_hook(name):
        def hook(mod, args, out):
            inputs[name] = args[0]
            out.retain_grad()
            outputs[name] = out

        return hook

    for p in model.parameters():
        p.requires_grad_(True)
    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    captured = []
    for batch in batches:
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask = batch["labels"] != -100
        F.cross_entropy(logits[mask].float(), batch["labels"][mask]).backward()
        right = [bool((logits[r][mask[r]].argmax(-1) == batch["labels"][r][mask[r]]).all()) for r in range(mask.shape[0])]
        at = key_positions(batch)
        row_of_token = [r for r in range(mask.shape[0]) for _ in range(int(at[r].sum()))]
        captured.append({
            "subject": (at & ~mask)[at],
            "keys": {n: inputs[n][at].detach().double() for n in names},
            "grads": {n: outputs[n].grad[at].detach().double() for n in names},
            "wrong": torch.tensor([not right[r] for r in row_of_token]),
        })
    for h in handles:
        h.remove()
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    return captured


def reference_refined_turn(model, names, batches, normalizers, steps, lr=1e-6, ridge=1.0, preserve=None,
                           subject_only=(), lower_only_steps=0, base_term=None):
    """A turn with refinement steps (EditConfig.refine_steps), plainly: step 1 is reference_turn;
    each later step re-captures, stops if every request is right, else solves
    (K_w^T K_w + K_r^T K_r + ridge I + P) dW = K_w^T V_w for the wrong rows w, the right rows r kept
    (normalizer statistics from step 1, not updated again), and applies dW. ``preserve`` (name ->
    P, d_in x d_in; zero when not given) is in every step's system. ``subject_only`` as in
    reference_turn, every step; in the first ``lower_only_steps`` steps the other modules edit nothing.
    ``base_term`` as in reference_turn, in every step (``D`` then includes the turn's earlier steps)."""
    upper = [n for n in names if n not in subject_only]
    reference_turn(model, names, batches, normalizers, lr=lr, ridge=ridge, preserve=preserve, subject_only=subject_only,
                   frozen=upper if lower_only_steps >= 1 else (), base_term=base_term)
    modules = {n: model.get_submodule(n) for n in names}
    for step in range(1, steps):
        captured = reference_capture(model, names, batches)
        wrong = torch.cat([c["wrong"] for c in captured])
        subject = torch.cat([c["subject"] for c in captured])
        if not bool(wrong.any()):
            return
        for n in names:
            K = torch.cat([c["keys"][n] for c in captured])
            G = torch.cat([c["grads"][n] for c in captured])
            norm = normalizers[shape_of(modules[n])]
            z = (torch.cat([K, G], 1) - norm.mean) / (norm.std + torch.finfo(torch.float32).eps)
            K_hat, G_hat = z[:, : K.shape[1]], z[:, K.shape[1] :]
            V = -lr * (K_hat**2).sum(1, keepdim=True) * G_hat
            if subject_only:
                V[subject != (n in subject_only)] = 0.0
                if step < lower_only_steps and n not in subject_only:
                    V[:] = 0.0
            V = V[wrong]
            A = K.T @ K + ridge * torch.eye(K.shape[1], dtype=K.dtype)  # all rows: wrong + kept
            if preserve is not None:
                A = A + preserve[n].to(A.dtype)
            # D: everything this module moved since the base, this turn's earlier steps included
            shift = torch.linalg.solve(A, _minus_base_term(K[wrong].T @ V, modules[n], n, base_term))
            with torch.no_grad():
                m = modules[n]
                m.weight += (shift.T if isinstance(m, torch.nn.Linear) else shift).to(m.weight.dtype)


def reference_subject_delta(model, block, input_ids, labels, position, steps, lr, decay, clamp, stop_loss=0.05,
                            essence=None, kl=0.0, contexts=(), stop="loss"):
    """ROME/MEMIT's ``z`` for one unpadded sequence, plainly: ``delta`` added to ``block``'s output at
    ``position``; Adam on mean target NLL + decay ||delta||^2 / ||h||^2 (h: the unedited hidden state
    there), stopping once the NLL is at most ``stop_loss``, each step projected into ||delta|| <=
    clamp ||h||. ``essence`` (``(ids, position)``) and ``kl``: the loss also has kl * KL(p0 || p) of
    the next token after ``ids`` with ``delta`` at its ``position`` (p0: without). ``contexts``: more
    ``(ids, labels, position)`` sequences (position -1: no delta there); the NLL is then the mean of
    every sequence's mean target NLL. ``stop="argmax"``: stop once every target token of every
    sequence is the argmax instead. Returns ``delta`` (``(hidden,)``)."""
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

    at = {"position": position}

    def add(m, a, out):
        h = out[0] if isinstance(out, tuple) else out
        shift = torch.zeros_like(h)
        if at["position"] >= 0:
            shift[0, at["position"]] = delta
        return (h + shift,) + tuple(out[1:]) if isinstance(out, tuple) else h + shift

    def essence_logp():
        at["position"] = essence[1]
        logp = torch.log_softmax(model(input_ids=essence[0][None]).logits[0, -1].float(), -1)
        at["position"] = position
        return logp

    optimiser = torch.optim.Adam([delta], lr=lr)
    handle = block.register_forward_hook(add)
    if essence is not None:
        with torch.no_grad():
            p0 = essence_logp()
    sequences = [(input_ids, labels, position)] + list(contexts)
    for _ in range(steps):
        nlls, wrong = [], False
        for ids, labs, where in sequences:
            at["position"] = where
            logits = model(input_ids=ids[None]).logits[0]
            mask = labs != -100
            nlls.append(F.cross_entropy(logits[mask].float(), labs[mask]))
            wrong = wrong or bool((logits[mask].argmax(-1) != labs[mask]).any())
        at["position"] = position
        nll = torch.stack(nlls).mean()
        if (not wrong) if stop == "argmax" else float(nll.detach()) <= stop_loss:
            break
        optimiser.zero_grad()
        loss = nll + decay * delta.square().sum() / h_norm**2
        if essence is not None:
            loss = loss + kl * (p0.exp() * (p0 - essence_logp())).sum()
        loss.backward()
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
