"""The key memory (``EditConfig.memory``): every earlier turn's keys in the ridge.

Per edit module the editor keeps ``M = sum over past turns of K^T K`` (``d_in x d_in``, constant in
the number of edits; saved with the state, undone by a revert) and solves

    dW = (K^T K + lambda I + ... + beta M)^-1 K^T V

so a turn moves the outputs at earlier edits' keys as little as it can (MEMIT's and AlphaEdit's
sequential term). A turn's keys join ``M`` when the turn is committed, as captured before its shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.weights import module_shape
from .base import Stage, Turn, positive


@dataclass
class MemoryConfig:
    """``weight``: ``beta`` of the earlier turns' keys in the ridge."""

    weight: float = 1.0

    def __post_init__(self) -> None:
        positive("memory", "weight", self.weight)


class MemoryStage(Stage):
    name = "memory"

    def __init__(self, config: MemoryConfig) -> None:
        super().__init__(config)
        self.memory: dict[str, torch.Tensor] = {}  # empty until the first turn (= zero)

    def ridge(self, turn: Turn, group: list[str]) -> torch.Tensor | None:
        if not self.memory:
            return None
        return self.config.weight * torch.stack([self.memory[n] for n in group])

    def after(self, turn: Turn) -> dict[str, torch.Tensor]:
        """The memory with this turn's keys (as captured before the turn's shift) added."""
        out = {}
        for name, module in turn.modules.items():
            keys = torch.cat([mb.keys[name] for mb in turn.captures]).to(module.weight.device, turn.dtype)
            gram = keys.T @ keys
            out[name] = gram + self.memory[name] if name in self.memory else gram
        return out

    def state_shapes(self, modules: dict[str, nn.Module]) -> dict[str, tuple[int, ...]]:
        return {n: (module_shape(m)[0],) * 2 for n, m in modules.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.memory)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.memory = dict(state)
