"""Optimised subject values (``EditConfig.subject_optimise``): ROME/MEMIT's ``z``, written in closed form.

For each request with a subject, the change ``delta`` of the residual stream at the subject's last
token, after the top layer that edits at the subject, that makes its target tokens likely:

    minimise over delta   mean over target tokens of -log p(target | prompt, h + delta)
                          + decay * ||delta||^2 / ||h||^2
    keeping               ||delta|| <= clamp * ||h||         (h: the unedited hidden state there)

by Adam on ``delta`` alone (no weight moves; a request's ``delta`` freezes once its loss is below
``STOP_LOSS``, as in the published loop). The lower edit modules then get ``delta / n`` as the value
of the subject row (n = how many of them there are: together they add ``delta`` to the residual
stream), and the ridge solve writes it as it writes every other value. The first-order value
``-lr ||K_hat||^2 G_hat`` is one small step of this same descent; a few Adam steps follow the model's
non-linearity to a change that actually carries the answer, which the subject's other wordings share.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .batching import IGNORE, SUBJECT_INDEX, collate, pad_id_of, subject_position
from .capture import TargetHead, _frozen

STOP_LOSS = 0.05  # a request whose mean target NLL is below this stops moving (MEMIT's early stop)


ESSENCE = "{} is a"  # ROME/MEMIT's essence prompt: what the subject is, kept by the KL term


def essence_batches(tokenizer: Any, subjects: Sequence[Sequence[str | None]]) -> list[dict[str, torch.Tensor]]:
    """Per minibatch (``subjects``: each row's subject or ``None``), the rows' essence prompts
    ``"{subject} is a"``: ``input_ids``/``attention_mask``, ``subject_index`` (the subject's last
    token, -1 for none) and ``labels`` marking the last prompt token (the distribution the KL keeps)."""
    pad = pad_id_of(tokenizer)
    out = []
    for rows in subjects:
        encoded, index = [], []
        for subject in rows:
            prompt = ESSENCE.format(subject or "")
            ids = list(tokenizer(prompt)["input_ids"])
            encoded.append((ids, [IGNORE] * (len(ids) - 1) + [0]))
            index.append(subject_position(tokenizer, prompt, subject) if subject else -1)
        out.append({**collate(encoded, pad), SUBJECT_INDEX: torch.tensor(index)})
    return out


def subject_deltas(
    model: nn.Module, layer: nn.Module, batches: Sequence[dict[str, torch.Tensor]],
    steps: int, lr: float, decay: float, clamp: float,
    essence: Sequence[dict[str, torch.Tensor]] | None = None, kl: float = 0.0,
) -> list[torch.Tensor]:
    """Per minibatch, ``(B, hidden)`` float32: each sequence's ``delta`` at its ``subject_index``
    after ``layer`` (a transformer block), zeros where it has none (-1). With ``essence``
    (:func:`essence_batches`, row for row) and ``kl`` > 0, each loss also has ``kl * KL(p0 || p)``
    of the next-token distribution after its essence prompt (``p0``: with ``delta`` = 0)."""
    with _frozen(model), TargetHead(model) as head:
        return [_batch_deltas(model, layer, head, batch, steps, lr, decay, clamp,
                              essence[i] if essence is not None and kl > 0 else None, kl)
                for i, batch in enumerate(batches)]


def _batch_deltas(model, layer, head, batch, steps, lr, decay, clamp, essence, kl) -> torch.Tensor:
    """Adam on the minibatch's deltas; each sequence's loss is its own (Adam is per coordinate, so each
    delta moves as if optimised alone)."""
    index = batch[SUBJECT_INDEX]
    rows = torch.nonzero(index >= 0).flatten()
    width = model.get_input_embeddings().weight.shape[1]
    delta = torch.zeros(index.shape[0], width, device=index.device, requires_grad=True)
    if rows.numel() == 0:
        return delta.detach()
    labels = batch["labels"]
    targets = labels != IGNORE
    owner = torch.nonzero(targets)[:, 0]
    counts = targets.sum(1).float()
    base: dict[str, torch.Tensor] = {}
    at = {"index": index}  # where the hook adds delta: the edit prompts', or the essence prompts' subjects

    def add_delta(module: nn.Module, args: tuple, output):
        hidden = output[0] if isinstance(output, tuple) else output
        device = hidden.device  # the block's device (a split model's may not be the input's)
        where = at["index"].to(device)
        if "norm" not in base:  # the unedited hidden state's norm, per sequence (1 where no subject)
            norm = torch.ones(index.shape[0], device=delta.device)
            found = hidden[rows.to(device), index[rows].to(device)].detach().float()
            norm[rows] = torch.linalg.vector_norm(found, dim=-1).to(delta.device)
            base["norm"] = norm
        some = torch.nonzero(where >= 0).flatten()
        change = delta[some.to(delta.device)].to(device, hidden.dtype)
        hidden = hidden.index_put((some, where[some]), change, accumulate=True)
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    def essence_kl() -> torch.Tensor:
        """Per row, KL(p0 || p) after the essence prompt (0 where it has none)."""
        at["index"], head.mask = essence[SUBJECT_INDEX], essence["labels"] != IGNORE
        try:
            logits = model(input_ids=essence["input_ids"], attention_mask=essence["attention_mask"]).logits
        finally:
            at["index"] = index
        logits = logits[head.mask] if logits.ndim == 3 else logits
        logp = F.log_softmax(logits.float(), -1)
        if "p0" not in base:
            base["p0"] = logp.detach()
        divergence = (base["p0"].exp() * (base["p0"] - logp)).sum(-1).to(delta.device)
        return torch.where(essence[SUBJECT_INDEX].to(delta.device) >= 0, divergence, 0.0)

    optimiser = torch.optim.Adam([delta], lr=lr)
    moving = index >= 0
    handle = layer.register_forward_hook(add_delta)
    try:
        for _ in range(steps):
            head.mask = targets
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits = logits[targets] if logits.ndim == 3 else logits
            nll = F.cross_entropy(logits.float(), labels[targets].to(logits.device), reduction="none").to(counts.device)
            loss = torch.zeros_like(counts).index_add(0, owner, nll) / counts
            moving &= loss.detach() > STOP_LOSS
            if not bool(moving.any()):
                break
            penalty = decay * delta.square().sum(-1) / base["norm"].square()
            if essence is not None:
                penalty = penalty + kl * essence_kl()
            optimiser.zero_grad()
            ((loss + penalty) * moving).sum().backward()
            kept = delta.detach()[~moving].clone()
            optimiser.step()
            with torch.no_grad():  # a stopped delta stays put (Adam's momentum would move it on)
                delta[~moving] = kept
                # project back into the ball ||delta|| <= clamp ||h||
                limit = clamp * base["norm"]
                length = torch.linalg.vector_norm(delta, dim=-1)
                delta.mul_(torch.where(length > limit, limit / length.clamp(min=1e-12), 1.0)[:, None])
    finally:
        handle.remove()
        head.mask = None
    return delta.detach()
