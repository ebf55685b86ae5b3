"""Optimised subject values (``EditConfig.subject_optimise``): ROME/MEMIT's ``z``, written in closed form.

For each request with a subject, the change ``delta`` of the residual stream at the subject's last
token, after the top layer that edits at the subject, that makes its target tokens likely:

    minimise over delta   mean over target tokens of -log p(target | prompt, h + delta)
                          + decay * ||delta||^2 / ||h||^2
    keeping               ||delta|| <= clamp * ||h||         (h: the unedited hidden state there)

by Adam on ``delta`` alone (no weight moves; a request's ``delta`` freezes once its loss is below
``STOP_LOSS``, as in the published loop; only the layers above that layer run in the search). The
lower edit modules then get ``delta / n`` as the value of the subject row (n = how many of them
there are: together they add ``delta`` to the residual stream), and the ridge solve writes it as
it writes every other value. The first-order value ``-lr ||K_hat||^2 G_hat`` is one small step of
this same descent; a few Adam steps follow the model's non-linearity to a change that actually carries the answer, which the subject's other wordings share.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .batching import IGNORE, SUBJECT_INDEX, collate, minibatches, pad_id_of, subject_position
from .capture import _frozen
from .neighbours import with_prefixes
from .tail import Tail

STOP_LOSS = 0.05  # a request whose mean target NLL is below this stops moving (MEMIT's early stop)
STOP_RULES = ("loss", "argmax")  # EditConfig.subject_stop: NLL < STOP_LOSS, or every target token the argmax


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
    contexts: Sequence[dict[str, torch.Tensor]] | None = None, stop: str = "loss",
) -> list[torch.Tensor]:
    """Per minibatch, ``(B, hidden)`` float32: each sequence's ``delta`` at its ``subject_index``
    in the input of decoder layer ``start`` (the output of the layer below it), zeros where it has
    none (-1). Only the layers from ``start`` on run in the search (:class:`~ultraedit.tail.Tail`).
    With ``essence`` (:func:`essence_batches`, row for row) and ``kl`` > 0, each loss also has
    ``kl * KL(p0 || p)`` of the next-token distribution after its essence prompt (``p0``: with
    ``delta`` = 0). With ``contexts`` (:func:`context_batches`, one per minibatch) each loss is
    the mean over the sequence and its context copies, ``delta`` added in each. ``stop``: a
    sequence stops moving once its loss is under ``STOP_LOSS`` (``"loss"``) or once every target
    token of it and its copies is the argmax (``"argmax"``)."""
    with _frozen(model):
        return [_batch_deltas(model, start, batch, steps, lr, decay, clamp,
                              essence[i] if essence is not None and kl > 0 else None, kl,
                              contexts[i] if contexts is not None else None, stop)
                for i, batch in enumerate(batches)]


def context_batches(tokenizer: Any, requests: Sequence[Sequence[Any]], per_request: int) -> list[dict[str, torch.Tensor]]:
    """Per minibatch (``requests``: its rows' :class:`~ultraedit.batching.EditRequest`), one batch of
    the rows' context copies (:func:`ultraedit.neighbours.with_prefixes`: each prompt behind
    ``per_request`` generic sentences) with ``subject_index`` and ``owner`` (the minibatch row each
    copy belongs to)."""
    out = []
    for rows in requests:
        sequences, owners = with_prefixes(rows, per_request)
        copies, owned = sequences[len(rows):], owners[len(rows):]
        (batch,), order = minibatches(tokenizer, copies, len(copies), subjects=True)
        out.append({**batch, "owner": torch.tensor([owned[i] for i in order])})
    return out


class _Shifted:
    """A batch's :class:`~ultraedit.tail.Tail` and where its subject rows' ``delta`` goes."""

    def __init__(self, model: nn.Module, start: int, batch: dict[str, torch.Tensor]) -> None:
        self.tail = Tail(model, start, batch["input_ids"], batch["attention_mask"], batch["labels"])
        index = batch[SUBJECT_INDEX]
        self.owner = batch.get("owner", torch.arange(index.shape[0], device=index.device))  # whose delta
        self.rows = torch.nonzero(index >= 0).flatten()
        device = self.tail.hidden.device
        self.where = (self.rows.to(device), index[self.rows].to(device))

    def hidden(self, delta: torch.Tensor) -> torch.Tensor:
        """Layer ``start``'s input with each row's owner's ``delta`` (``(owners, hidden)``) added at its subject."""
        change = delta[self.owner[self.rows].to(delta.device)].to(self.tail.hidden.device, self.tail.hidden.dtype)
        return self.tail.hidden.index_put(self.where, change, accumulate=True)

    def losses(self, delta: torch.Tensor, owners: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per owner: the sum of its rows' mean target NLLs, and how many of its rows have a target
        token that is not the argmax."""
        logits = self.tail.target_logits(self.hidden(delta))
        labels = self.tail.labels.to(logits.device)
        nll = self.tail.per_row(F.cross_entropy(logits, labels, reduction="none")).to(delta.device)
        wrong = self.tail.per_row((logits.argmax(-1) != labels).float(), "sum").to(delta.device)
        owner = self.owner.to(delta.device)
        return (torch.zeros(owners, device=delta.device).index_add(0, owner, nll),
                torch.zeros(owners, device=delta.device).index_add(0, owner, (wrong > 0).float()))


def _batch_deltas(model, start, batch, steps, lr, decay, clamp, essence, kl, contexts, stop) -> torch.Tensor:
    """Adam on the minibatch's deltas; each sequence's loss is its own (Adam is per coordinate, so each
    delta moves as if optimised alone)."""
    index = batch[SUBJECT_INDEX]
    width = model.get_input_embeddings().weight.shape[1]
    delta = torch.zeros(index.shape[0], width, device=index.device, requires_grad=True)
    if not bool((index >= 0).any()):
        return delta.detach()
    edit = _Shifted(model, start, batch)
    shifted = [edit] + ([_Shifted(model, start, contexts)] if contexts is not None else [])
    copies = sum(torch.bincount(s.owner.cpu(), minlength=index.shape[0]) for s in shifted).to(delta.device)
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
        parts = [s.losses(delta, index.shape[0]) for s in shifted]
        loss = sum(nll for nll, _ in parts) / copies
        unfinished = sum(wrong for _, wrong in parts) > 0 if stop == "argmax" else loss.detach() > STOP_LOSS
        moving &= unfinished
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
