"""Subject-swapped neighbours (``EditConfig.neighbours``): keys the edit of one subject should leave alone.

UltraEdit's keys are the edit modules' inputs at the target positions, e.g. at ``" is"`` of
"The capital of Uganda is". Much of such a key says "a capital comes next", and only part of it
says "of Uganda"; a shift fitted to it therefore also moves "The capital of Bolivia is" (measured
on SmolLM2-135M: most locality losses of the demo are neighbours of this kind). ROME and MEMIT
avoid this by editing at the subject's last token; here we keep UltraEdit's keys and add, for
each request whose subject is known, the same prompt and target with the subject replaced by
other subjects of the turn, as preserved keys of the ridge:

    dW = (K^T K + lambda I + alpha E0 + beta M + gamma N^T N)^-1 K^T V

``N`` holds the target-position keys of the neighbour prompts (taken on the model before the
turn), so the shift is pushed toward what distinguishes the subject rather than the template.
A neighbour is never a prompt edited in the same turn. The choice is deterministic (seeded by the
request's text), so a resumed session computes what an uninterrupted one does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..core.batching import IGNORE, EditRequest, collate, pad_id_of, subject_of, tokenize_pair
from .base import Stage, Turn, positive
from .common import key_grams, request_seed


@dataclass
class NeighboursConfig:
    """``count``: subject-swapped prompts per request; ``weight``: their keys' weight in the ridge."""

    count: int = 8
    weight: float = 1.0

    def __post_init__(self) -> None:
        positive("neighbours", "count", self.count, integer=True)
        positive("neighbours", "weight", self.weight)


def neighbour_pairs(requests: Sequence[EditRequest], per_request: int) -> list[tuple[str, str]]:
    """``(prompt, target)`` pairs: each request's prompt with its subject replaced by up to
    ``per_request`` other subjects of the turn (drawn with a seed from the request's text), and
    the request's target. Prompts equal to an edit prompt of the turn are left out."""
    own = [subject_of(r) for r in requests]
    subjects = sorted({s for s in own if s is not None})
    edited = {r.prompt for r in requests}
    pairs = []
    for request, subject in zip(requests, own):
        if subject is None:
            continue
        others = [s for s in subjects if s != subject and s not in subject and subject not in s]
        random.Random(request_seed(request)).shuffle(others)
        chosen = 0
        for other in others:
            if chosen == per_request:
                break
            prompt = request.prompt.replace(subject, other, 1)
            if prompt not in edited:
                pairs.append((prompt, request.target))
                chosen += 1
    return pairs


def neighbour_grams(
    model: nn.Module, tokenizer: Any, modules: dict[str, nn.Module], pairs: Sequence[tuple[str, str]],
    *, dtype: torch.dtype = torch.float32, batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """``N^T N`` (``(d_in, d_in)``, in ``dtype``) per module: the sum of ``k k^T`` over the
    target positions of ``pairs`` (teacher-forced, as edit requests are)."""
    encoded = sorted((tokenize_pair(tokenizer, p, t) for p, t in pairs), key=lambda pair: len(pair[0]))  # less padding
    pad = pad_id_of(tokenizer)
    batches = (collate(encoded[i : i + batch_size], pad) for i in range(0, len(encoded), batch_size))
    sums, _ = key_grams(model, modules, ({**b, "positions": b["labels"] != IGNORE} for b in batches), dtype)
    return sums


class NeighboursStage(Stage):
    """Per text turn, ``weight * N^T N`` of each request's neighbour prompts joins the ridge."""

    name = "neighbours"

    def begin(self, turn: Turn) -> None:
        pairs = neighbour_pairs(turn.requests, self.config.count) if turn.requests else []
        if pairs:
            grams = neighbour_grams(turn.model, turn.tokenizer, turn.modules, pairs, dtype=turn.dtype)
            turn.scratch[self.name] = {
                n: self.config.weight * g.to(turn.modules[n].weight.device) for n, g in grams.items()}

    def ridge(self, turn: Turn, group: list[str]) -> torch.Tensor | None:
        grams = turn.scratch.get(self.name)
        return torch.stack([grams[n] for n in group]) if grams else None
