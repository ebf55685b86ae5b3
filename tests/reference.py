"""An independent, deliberately plain implementation of the method page, for equivalence tests.

Written from ultraedit-method.md alone: full autograd WITH weight gradients, one forward/backward
per minibatch with the model's own full logits, per-row loops for the normalizer statistics in
float64, and the primal solve with torch.linalg.solve. It shares no code with the package.
(The stages beyond the paper have their plain versions in reference_stages.py, built on these.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = torch.finfo(torch.float32).eps


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
        self.std = torch.sqrt(self.var / (n_new - 1 + EPS))
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


def reference_capture(model, names, batches):
    """Plain per-minibatch capture: keys, output gradients (float64) at the key positions, whether
    each key row is a subject position, and per key row whether its sequence still misses a target
    token (not the argmax)."""
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
    model.eval()
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


def reference_values(K, G, norm, lr):
    """Steps 4-5: z_hat = (z - mean) / (std + eps), V = -lr * ||K_hat||^2 * G_hat."""
    z = (torch.cat([K, G], 1) - norm.mean) / (norm.std + EPS)
    K_hat, G_hat = z[:, : K.shape[1]], z[:, K.shape[1]:]
    return -lr * (K_hat**2).sum(1, keepdim=True) * G_hat


def add_shift(module, shift):
    """Step 7: W += dW^T (nn.Linear) or W += dW (Conv1D)."""
    with torch.no_grad():
        module.weight += (shift.T if isinstance(module, torch.nn.Linear) else shift).to(module.weight.dtype)


def reference_statistics(captured, modules, normalizers, formula="paper"):
    """Step 3 over a turn's capture, one minibatch at a time, modules in order (``normalizers``: shape
    -> RefNormalizer, filled as shapes appear); returns each module's ``(K, G)`` for the whole turn."""
    for c in captured:
        for n, m in modules.items():
            shape = shape_of(m)
            if shape not in normalizers:
                normalizers[shape] = RefNormalizer(sum(shape), formula)
            normalizers[shape].update(torch.cat([c["keys"][n], c["grads"][n]], 1))
    return {n: (torch.cat([c["keys"][n] for c in captured]), torch.cat([c["grads"][n] for c in captured]))
            for n in modules}


def reference_turn(model, names, batches, normalizers, lr=1e-6, ridge=1.0, formula="paper"):
    """Apply one turn of the method to ``model`` in place; ``normalizers`` (shape -> RefNormalizer) is
    updated; returns each module's dW (float64)."""
    modules = {n: model.get_submodule(n) for n in names}
    rows = reference_statistics(reference_capture(model, names, batches), modules, normalizers, formula)
    shifts = {}
    for n, (K, G) in rows.items():
        V = reference_values(K, G, normalizers[shape_of(modules[n])], lr)
        A = K.T @ K + ridge * torch.eye(K.shape[1], dtype=K.dtype)
        shifts[n] = torch.linalg.solve(A, K.T @ V)
    for n, m in modules.items():
        add_shift(m, shifts[n])
    return shifts


def reference_answer(model, tokenizer, ids, stops, max_new_tokens=50):
    """Greedy answer the plain way: one full forward per new token, no cache, no batch; stops at a stop
    token, or once the new text holds a sentence end (``.``/``!``/``?`` then white space) or a newline,
    and is cut there (what ``ultraedit.generation.generate_answers`` must agree with)."""
    import re

    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids + new]), use_cache=False).logits[0, -1].argmax())
            if token in stops:
                break
            new.append(token)
            if re.search(r"[.!?]\s|\n", tokenizer.decode(new, skip_special_tokens=True)):
                break
    text = tokenizer.decode(new, skip_special_tokens=True)
    for i, ch in enumerate(text):
        if ch == "\n":
            return text[:i].strip()
        if ch in ".!?" and i + 1 < len(text) and text[i + 1].isspace():
            return text[: i + 1].strip()
    return text.strip()
