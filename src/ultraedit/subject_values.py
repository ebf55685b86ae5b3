"""Optimised subject values (``EditConfig.subject_optimise``): ROME/MEMIT's ``z``, written in closed form.

For each request with a subject, the change ``delta`` of the residual stream at the subject's last
token, after the top layer that edits at the subject, that makes its target tokens likely:

    minimise over delta   mean over target tokens of -log p(target | prompt, h + delta)
                          + decay * ||delta||^2 / ||h||^2
    keeping               ||delta|| <= clamp * ||h||         (h: the unedited hidden state there)

by Adam on ``delta`` alone (no weight moves; a request's ``delta`` freezes once its loss is below
``STOP_LOSS``, as in the published loop; only the layers above that layer run in the search). The
lower edit modules then get ``delta / n`` as the value of the subject row (n = how many of them
there are: together they add ``delta`` to the residual stream), and the ridge solve writes it as it writes every other value. The first-order value
``-lr ||K_hat||^2 G_hat`` is one small step of this same descent; a few Adam steps follow the model's
non-linearity to a change that actually carries the answer, which the subject's other wordings share.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .batching import IGNORE, SUBJECT_INDEX, collate, pad_id_of, subject_position
from .capture import _frozen
from .tail import Tail

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
    model: nn.Module, start: int, batches: Sequence[dict[str, torch.Tensor]],
    steps: int, lr: float, decay: float, clamp: float,
    essence: Sequence[dict[str, torch.Tensor]] | None = None, kl: float = 0.0,
) -> list[torch.Tensor]:
    """Per minibatch, ``(B, hidden)`` float32: each sequence's ``delta`` at its ``subject_index``
    in the input of decoder layer ``start`` (the output of the layer below it), zeros where it has
    none (-1). Only the layers from ``start`` on run in the search (:class:`~ultraedit.tail.Tail`).
    With ``essence`` (:func:`essence_batches`, row for row) and ``kl`` > 0, each loss also has
    ``kl * KL(p0 || p)`` of the next-token distribution after its essence prompt (``p0``: with
    ``delta`` = 0)."""
    with _frozen(model):
        return [_batch_deltas(model, start, batch, steps, lr, decay, clamp,
                              essence[i] if essence is not None and kl > 0 else None, kl)
                for i, batch in enumerate(batches)]


class _Shifted:
    """A batch's :class:`~ultraedit.tail.Tail` and where its subject rows' ``delta`` goes."""

    def __init__(self, model: nn.Module, start: int, batch: dict[str, torch.Tensor]) -> None:
        self.tail = Tail(model, start, batch["input_ids"], batch["attention_mask"], batch["labels"])
        index = batch[SUBJECT_INDEX]
        self.rows = torch.nonzero(index >= 0).flatten()
        device = self.tail.hidden.device
        self.where = (self.rows.to(device), index[self.rows].to(device))

    def hidden(self, delta: torch.Tensor) -> torch.Tensor:
        """Layer ``start``'s input with ``delta`` (``(B, hidden)``) added at the subject rows."""
        change = delta[self.rows.to(delta.device)].to(self.tail.hidden.device, self.tail.hidden.dtype)
        return self.tail.hidden.index_put(self.where, change, accumulate=True)


def _batch_deltas(model, start, batch, steps, lr, decay, clamp, essence, kl) -> torch.Tensor:
    """Adam on the minibatch's deltas; each sequence's loss is its own (Adam is per coordinate, so each
    delta moves as if optimised alone)."""
    index = batch[SUBJECT_INDEX]
    width = model.get_input_embeddings().weight.shape[1]
    delta = torch.zeros(index.shape[0], width, device=index.device, requires_grad=True)
    if not bool((index >= 0).any()):
        return delta.detach()
    edit = _Shifted(model, start, batch)
    norm = torch.ones(index.shape[0], device=delta.device)  # ||h|| unedited, per sequence (1: no subject)
    norm[edit.rows] = torch.linalg.vector_norm(edit.tail.hidden[edit.where].float(), dim=-1).to(delta.device)
    if essence is not None:
        sense = _Shifted(model, start, essence)
        with torch.no_grad():
            p0 = F.log_softmax(sense.tail.target_logits(sense.tail.hidden), -1)
        has_subject = essence[SUBJECT_INDEX].to(delta.device) >= 0

    optimiser = torch.optim.Adam([delta], lr=lr)
    moving = index >= 0
    for _ in range(steps):
        loss = edit.tail.per_row(edit.tail.token_nll(edit.hidden(delta))).to(delta.device)
        moving &= loss.detach() > STOP_LOSS
        if not bool(moving.any()):
            break
        penalty = decay * delta.square().sum(-1) / norm.square()
        if essence is not None:  # one label per essence row: its next-token distribution
            logp = F.log_softmax(sense.tail.target_logits(sense.hidden(delta)), -1)
            divergence = (p0.exp() * (p0 - logp)).sum(-1).to(delta.device)
            penalty = penalty + kl * torch.where(has_subject, divergence, 0.0)
        optimiser.zero_grad()
        ((loss + penalty) * moving).sum().backward()
        kept = delta.detach()[~moving].clone()
        optimiser.step()
        with torch.no_grad():  # a stopped delta stays put (Adam's momentum would move it on)
            delta[~moving] = kept
            # project back into the ball ||delta|| <= clamp ||h||
            limit = clamp * norm
            length = torch.linalg.vector_norm(delta, dim=-1)
            delta.mul_(torch.where(length > limit, limit / length.clamp(min=1e-12), 1.0)[:, None])
    return delta.detach()
