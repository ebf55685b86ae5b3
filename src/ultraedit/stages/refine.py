"""Refinement steps (``EditConfig.refine``): more closed-form steps within a turn, for the requests
not yet right.

After the first step the turn's shift is applied (temporarily), keys and gradients are captured
again, and a request counts as done when every target token is the argmax and, with
``confidence`` > 0, has at least that probability. The requests not yet done are solved again;
the done ones' rows stay in the ridge with value 0 (preserved), so the next step does not undo
them. The turn stops early when every request is done; its shift is the sum of its steps'.
A margin on the edit prompt (``confidence``) carries further to its paraphrases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..core.batching import IGNORE
from ..core.capture import MinibatchCapture, key_mask
from .base import positive

Shifts = dict[str, torch.Tensor]


@dataclass
class RefineConfig:
    """``steps``: most closed-form steps per turn (1 = the authors' single step); ``confidence``: the
    target-token probability a request must reach besides the argmax (0 = the argmax alone)."""

    steps: int = 5
    confidence: float = 0.8

    def __post_init__(self) -> None:
        positive("refine", "steps", self.steps, integer=True)
        if not (isinstance(self.confidence, (int, float)) and 0.0 <= self.confidence < 1.0):
            raise ValueError(f"EditConfig.refine.confidence must be in [0, 1), got {self.confidence!r}")


def unsolved_rows(
    batches: Sequence[dict[str, torch.Tensor]], captures: Sequence[MinibatchCapture], confidence: float = 0.0
) -> torch.Tensor:
    """A bool per captured row of the turn (target token or subject position): does its request still
    miss a target token (not the argmax, or with ``confidence`` > 0, below that probability)?"""
    out = []
    for batch, mb in zip(batches, captures):
        counts = (batch["labels"] != IGNORE).sum(1).tolist()
        done = mb.hits if confidence <= 0 else mb.hits & (mb.probs.to(mb.hits.device) >= confidence)
        missed = torch.stack([~h.all() for h in done.split(counts)])
        out.append(missed.repeat_interleave(key_mask(batch).sum(1).to(missed.device)))
    return torch.cat(out)


def refine(
    config: RefineConfig,
    batches: Sequence[dict[str, torch.Tensor]],
    first: Shifts,
    solve: Callable[[list[MinibatchCapture], torch.Tensor, int], Shifts],
    recapture: Callable[[], list[MinibatchCapture]],
    trial: Callable[[Shifts], None],
) -> tuple[Shifts, int]:
    """The steps after the ``first``: ``trial(total)`` puts the unedited weights plus the shift so far
    in place, ``recapture()`` captures the turn again, ``solve(captures, rows, step)`` solves for the
    rows whose requests are not yet done. Returns the summed shift and the number of steps taken.
    The caller restores the weights afterwards."""
    total, steps = first, 1
    while steps < config.steps:
        trial(total)
        captures = recapture()
        wrong = unsolved_rows(batches, captures, config.confidence)
        if not bool(wrong.any()):
            break
        step = solve(captures, wrong, steps)
        total = {n: total[n] + step[n] for n in total}
        steps += 1
    return total, steps
