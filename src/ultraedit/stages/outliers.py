"""Key outliers (``EditConfig.outliers``): rows with massive keys are kept, not edited.

A row whose key norm exceeds ``ratio`` times the median key norm of the turn's rows (per module)
gets value 0: it stays in the ridge, preserved. Such keys are massive activations at attention-sink
tokens (the first token, some bare-space tokens: about 10x the usual norm in SmolLM2's middle
layers); ``V`` grows with ``||K_hat||^2``, and a shift fitted to them moves every sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Rows, Stage, Turn, positive


@dataclass
class OutliersConfig:
    """``ratio``: a row whose key is longer than this multiple of its module's median is left alone."""

    ratio: float = 4.0

    def __post_init__(self) -> None:
        positive("outliers", "ratio", self.ratio)


class OutliersStage(Stage):
    name = "outliers"

    def values(self, turn: Turn, rows: Rows, values: torch.Tensor) -> torch.Tensor:
        norms = torch.linalg.vector_norm(rows.keys, dim=-1)  # over every row of the step, edited or not
        outliers = norms > self.config.ratio * norms.median(dim=-1, keepdim=True).values
        return values.masked_fill(rows.edited(outliers)[..., None].to(values.device), 0.0)
