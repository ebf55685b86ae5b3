"""FT-M: fine-tuning of one MLP output projection with the loss on the target tokens only.

Per turn: a fresh Adam optimizer over the one weight matrix; ``num_steps`` epochs over the turn's
minibatches (the bench's ``--batch-size``), each minibatch one Adam step on the mean cross-entropy
of its target tokens (prompt tokens carry no loss: EasyEdit's ``objective_optimization:
target_new``, which its survey calls FT-M). No norm constraint, no weight decay, no KL term.

Defaults are EasyEdit's FT configs for Llama (``hparams/FT/llama-7b.yaml``): layer 21 of 32
(``model.layers.{}.mlp.down_proj``), ``num_steps 25``, ``lr 5e-4``, ``weight_decay 0``,
``norm_constraint false``; the layer is moved proportionally to the model's depth.

Only that weight changes, so the hidden states entering its layer are fixed for the whole turn:
they are computed once and every step runs only that layer and the ones above it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..core.batching import EditRequest
from .common import Encoded, encode, frozen, one_layer_module, one_layer_params, tail_of, unfreeze


@dataclass
class FTParams:
    layer: int = -1  # -1: EasyEdit's layer 21 of 32, scaled to the model's depth
    num_steps: int = 25
    lr: float = 5e-4
    weight_decay: float = 0.0


class FTMethod:
    """FT-M behind the bench's ``EditMethod`` interface."""

    source = "EasyEdit hparams/FT/llama-7b.yaml (objective_optimization target_new = FT-M)"

    def __init__(self, model: nn.Module, tokenizer: Any, params: FTParams, batch_size: int = 10) -> None:
        self.model, self.tokenizer, self.params, self.batch_size = model, tokenizer, params, batch_size
        self.module_name, self.module = one_layer_module(model, params, published=21)

    @classmethod
    def from_bench(cls, model: nn.Module, tokenizer: Any, config: Any) -> FTMethod:
        params = one_layer_params(model, config, FTParams(), "ft", lr_field="lr")
        return cls(model, tokenizer, params, config.batch_size)

    def edit(self, requests: Sequence[EditRequest]) -> SimpleNamespace:
        return self.edit_encoded([encode(self.tokenizer, requests[i : i + self.batch_size])
                                  for i in range(0, len(requests), self.batch_size)])

    def edit_encoded(self, batches: Sequence[Encoded]) -> SimpleNamespace:
        """One turn from encoded minibatches (in this order, ``num_steps`` times)."""
        batches = [b.to(self.module.weight.device) for b in batches]
        saved = frozen(self.model)
        weight = self.module.weight
        weight.requires_grad_(True)
        try:
            with torch.no_grad():
                tails = [tail_of(self.model, b, self.params.layer) for b in batches]
            optimizer = torch.optim.Adam([weight], lr=self.params.lr, weight_decay=self.params.weight_decay)
            loss = torch.zeros(())
            for _ in range(self.params.num_steps):
                for tail in tails:
                    optimizer.zero_grad(set_to_none=True)
                    loss = tail.token_nll(tail.hidden).mean()
                    loss.backward()
                    optimizer.step()
        finally:
            weight.requires_grad_(False)
            unfreeze(saved)
        return SimpleNamespace(loss=float(loss.detach()))

    def describe(self) -> dict[str, Any]:
        return {**asdict(self.params), "batch_size": self.batch_size, "modules": [self.module_name],
                "source": self.source}
