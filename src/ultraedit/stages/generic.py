"""Generic-text keys (``EditConfig.generic``): what an edit should leave alone, and a pull-back of drift.

MEMIT (Meng et al., 2023) and AlphaEdit (Fang et al., 2025) protect a model's unrelated knowledge by
keeping ``dW`` small on the keys (module inputs) of ordinary text: MEMIT adds the keys' second
moment ``E0[k k^T]`` (estimated on Wikipedia) to its least-squares system. UltraEdit has no such
term. This stage adds MEMIT's, which fits the ridge solve as one extra term and stays closed-form:

    dW = (K^T K + lambda I + (alpha + gamma) E0)^-1 (K^T V - gamma E0 D)

* ``weight`` (``alpha``) penalises each turn's own shift on generic text, ``alpha ||dW||^2_E0``;
* ``pull_back`` (``gamma``) penalises the cumulative shift since the unedited model,
  ``gamma ||D + dW||^2_E0`` (``D = W - W_base``: earlier turns and this turn's earlier refinement
  steps), so each turn pulls back some of what earlier turns drifted on generic text instead of
  letting the drifts add up.

``E0`` is taken per edit module over ``text``: ``"package"`` (``data/generic.txt``, a short
English text shipped for this purpose, about 1,600 tokens) or ``"generated"`` (16,384 tokens the
model samples from its BOS token, seeded and cached per model: :mod:`.statistics`, MEMIT's
statistics where no Wikipedia is at hand). It is computed once, on the unedited model, when the
editor is built.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.batching import EditError
from ..core.weights import in_out
from .base import Stage, Turn, positive
from .common import key_moments

TEXTS = ("package", "generated")


@dataclass
class GenericConfig:
    """``weight``: ``alpha`` of ``E0`` in the ridge; ``pull_back``: ``gamma`` of the cumulative shift's
    cost on generic text; ``text``: ``"package"`` or ``"generated"`` (where ``E0`` is taken)."""

    weight: float = 300.0
    text: str = "generated"
    pull_back: float = 20.0

    def __post_init__(self) -> None:
        positive("generic", "weight", self.weight, zero=True)
        positive("generic", "pull_back", self.pull_back, zero=True)
        if self.weight + self.pull_back <= 0:
            raise ValueError("EditConfig.generic needs weight or pull_back > 0 (or generic=None)")
        if self.text not in TEXTS:
            raise ValueError(f"EditConfig.generic.text must be one of {TEXTS}, got {self.text!r}")


class GenericStage(Stage):
    """Adds ``(alpha + gamma) E0`` to the ridge and, with ``pull_back``, offsets the solve by the
    pull-back of the drift so far (``u = -A^-1 gamma E0 D``; ``A`` the ridge with every stage's term)."""

    name = "generic"

    def __init__(self, config: GenericConfig) -> None:
        super().__init__(config)
        self.moments: dict[str, torch.Tensor] | None = None

    def setup(self, model: nn.Module, tokenizer: Any, modules: dict[str, nn.Module], dtype: torch.dtype) -> None:
        """``E0`` on the model as given: the unedited model (a resumed session builds its editor before
        the saved shift is applied), so a resumed session solves with the same moments. Without a
        tokenizer (an editor that only reverts or saves) there are none, and a turn is refused."""
        if tokenizer is None:
            return
        if self.config.text == "package":
            self.moments = key_moments(model, tokenizer, modules, dtype=dtype)
            return
        from .statistics import second_moments

        generated, _ = second_moments(model, tokenizer, list(modules), progress=sys.stderr.isatty())  # cached
        self.moments = {n: m.to(modules[n].weight.device, dtype) for n, m in generated.items()}

    def ready(self) -> None:
        if self.moments is None:
            raise EditError("EditConfig.generic needs the tokenizer: UltraEditor(model, config, tokenizer=...)")

    def ridge(self, turn: Turn, group: list[str]) -> torch.Tensor:
        weight = self.config.weight + self.config.pull_back
        return weight * torch.stack([self.moments[n] for n in group])

    def offset(self, turn: Turn, group: list[str], terms: Any) -> torch.Tensor | None:
        """``u`` per module of ``group`` (``(modules, d_in, d_out)``), ``None`` while nothing has moved.
        One module at a time, so that only one ``D`` and one product are held besides the result."""
        if self.config.pull_back <= 0:
            return None
        factor = terms.factor()
        pulls, moved = [], False
        for i, name in enumerate(group):
            module = turn.modules[name]
            base = turn.base(name).to(module.weight.device, torch.float32)
            drift = in_out(module, module.weight.detach().float() - base)
            if not bool(drift.any()):
                pulls.append(torch.zeros_like(drift, dtype=turn.dtype))
                continue
            moved = True
            moment = self.moments[name].to(turn.dtype)
            rhs = -self.config.pull_back * (moment @ drift.to(moment.device, turn.dtype))
            if factor is not None:
                pulls.append(torch.cholesky_solve(rhs, factor[i].to(rhs.device, turn.dtype)))
            else:
                system = terms.matrix[i].to(rhs.device, turn.dtype).clone()
                system.diagonal().add_(terms.ridge)
                pulls.append(torch.linalg.solve(system, rhs))
        return torch.stack(pulls) if moved else None
