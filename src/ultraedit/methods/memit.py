"""MEMIT (Meng et al. 2023, arXiv 2210.07229): closed-form edit of several MLP output projections.

One turn (all its requests as one MEMIT batch):

1. Target values. For each request i, ``h_i`` is the output of the last edit layer R at its key
   position (the last subject token, else the last prompt token). A residual ``delta_i`` added
   there is optimised with Adam (``v_lr``, ``v_num_grad_steps``) on the mean cross-entropy of the
   target tokens plus ``v_weight_decay * ||delta_i|| / ||h_i||^2``, clamped after every step to
   ``||delta_i|| <= clamp_norm_factor * ||h_i||``; a request stops as soon as its own loss is
   below ``v_early_stop_loss`` (5e-2), and the last iteration takes no step, as in the published
   per-request loop. ``z_i = h_i + delta_i``.
2. Spread over the edit layers, lowest first: for layer l (the j-th of L), with the keys ``K``
   (n x d_in, the module's inputs at the key positions) and ``h_i`` recomputed on the model as
   edited so far,  ``R = (Z - H) / (L - j)``  and
   ``W_l += R^T K (mom2_update_weight * C_l + K^T K)^-1``
   where ``C_l = E[k k^T]`` over generic text (:mod:`ultraedit.stages.statistics`).

Defaults: the authors' Llama3-8B config (AlphaEdit repository, ``hparams/MEMIT/Llama3-8B.json``):
layers 4-8 of 32 (moved proportionally to the model's depth), ``v_num_grad_steps 25``,
``v_lr 1e-1``, ``v_weight_decay 0.5``, ``clamp_norm_factor 0.75``, ``mom2_update_weight 15000``.

Deviations, for a CPU budget, stated in ``describe()``: the target values are optimised on the
edit prompt alone (the published code also averages over 10 generated context prefixes and adds a
KL term, ``kl_factor 0.0625``, on "{subject} is a" prompts), and all requests of a turn are
optimised together in one batch (their losses are independent: the sum of per-request losses
gives each delta its own gradient; Adam's update is per element; a finished request's delta is
frozen and its sequences are dropped from the batch, so each request sees exactly its own loop).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..core.batching import EditRequest
from ..core.anatomy import num_layers
from .common import (
    Encoded,
    MethodError,
    add_update,
    apply_options,
    encode,
    frozen,
    layer_of,
    mlp_out_name,
    module_io_at,
    scaled_layers,
    tail_of,
    unfreeze,
)
from ..stages.statistics import second_moments


@dataclass
class MEMITParams:
    layers: list[int] = field(default_factory=list)  # empty: layers 4-8 of 32, scaled to the model
    v_num_grad_steps: int = 25
    v_lr: float = 1e-1
    v_weight_decay: float = 0.5
    v_early_stop_loss: float = 5e-2
    clamp_norm_factor: float = 0.75
    mom2_update_weight: float = 15000.0
    stats_file: str = ""  # text file for the key statistics; empty: text the model generates
    stats_sequences: int = 64
    stats_length: int = 256
    stats_seed: int = 0


SOURCE = "AlphaEdit repository hparams/MEMIT/Llama3-8B.json (layers scaled to depth)"
DEVIATIONS = ("target values optimised on the edit prompt only (no context prefixes, no KL term); "
              "a turn's requests optimised jointly; key statistics from self-generated text, not Wikipedia")


def compute_targets(model: nn.Module, batch: Encoded, layer: int, p: MEMITParams) -> tuple[torch.Tensor, float]:
    """``(z, mean final loss)``: the optimised output values of decoder layer ``layer`` at each
    request's key position, ``(n, hidden)`` float32 (step 1 above).

    As the published per-request loop: a request stops once its loss is below
    ``v_early_stop_loss`` (its delta is then frozen and its sequences leave the batch), and the
    last of the ``v_num_grad_steps`` iterations only measures the loss."""
    saved = frozen(model)
    try:
        tail = tail_of(model, batch, layer + 1)
        n = tail.hidden.shape[0]
        h0 = tail.hidden[torch.arange(n, device=tail.hidden.device), batch.lookup].float()
        h0_norm = h0.norm(dim=1)
        delta = torch.zeros_like(h0, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=p.v_lr)
        final = torch.zeros(n)
        active = torch.arange(n, device=h0.device)
        for step in range(p.v_num_grad_steps):
            part = tail if len(active) == n else tail.subset(active)
            at = (torch.arange(len(active), device=h0.device), batch.lookup[active])
            hidden = part.hidden.index_put(at, delta[active].to(part.hidden.dtype), accumulate=True)
            nll = part.per_row(part.token_nll(hidden))
            per_request = nll + p.v_weight_decay * delta[active].norm(dim=1) / h0_norm[active] ** 2
            final[active.cpu()] = per_request.detach().float().cpu()
            going = per_request.detach() >= p.v_early_stop_loss
            if step == p.v_num_grad_steps - 1 or not bool(going.any()):
                break
            optimizer.zero_grad(set_to_none=True)
            per_request[going].sum().backward()
            stopped = torch.ones(n, dtype=torch.bool, device=h0.device)
            stopped[active[going]] = False
            kept = delta.detach()[stopped].clone()
            optimizer.step()
            with torch.no_grad():
                delta[stopped] = kept  # Adam's momentum must not move a finished request
                scale = (p.clamp_norm_factor * h0_norm / delta.norm(dim=1).clamp(min=1e-12)).clamp(max=1.0)
                delta.mul_(scale[:, None])
            active = active[going]
    finally:
        unfreeze(saved)
    return (h0 + delta).detach(), float(final.mean())


class MEMITMethod:
    """MEMIT behind the bench's ``EditMethod`` interface (sequential: one MEMIT batch per turn)."""

    name = "memit"
    source = SOURCE

    def __init__(self, model: nn.Module, tokenizer: Any, params: MEMITParams, progress: bool = True,
                 moments: dict[str, torch.Tensor] | None = None) -> None:
        """``moments`` (module name -> ``E[k k^T]``) replaces the statistics :mod:`ultraedit.stages.statistics` builds."""
        self.model, self.tokenizer, self.params = model, tokenizer, params
        if not params.layers:
            params.layers = scaled_layers([4, 5, 6, 7, 8], 32, num_layers(model))
        params.layers = sorted(params.layers)
        self.names = [mlp_out_name(model, layer) for layer in params.layers]
        self.modules = [model.get_submodule(n) for n in self.names]
        if moments is None:
            moments, self.stats_info = second_moments(
                model, tokenizer, self.names, text_file=params.stats_file or None, sequences=params.stats_sequences,
                length=params.stats_length, seed=params.stats_seed, progress=progress)
        else:
            self.stats_info = {"source": "given"}
        self.moments = [moments[n].float().to(self.modules[0].weight.device) for n in self.names]
        self.setup()

    def setup(self) -> None:
        """Method-specific state built from the statistics (AlphaEdit's projections)."""

    @classmethod
    def params_class(cls) -> type:
        return MEMITParams

    @classmethod
    def from_bench(cls, model: nn.Module, tokenizer: Any, config: Any) -> MEMITMethod:
        params = apply_options(cls.params_class()(), getattr(config, "method_options", None), cls.name)
        if config.lr is not None:
            raise MethodError(f"{cls.name} has no --lr; set --method-option v_lr=... for the target values")
        if config.preset is not None:
            raise MethodError(f"{cls.name}: pass --modules (MLP output projections) instead of --preset")
        if config.modules:
            params.layers = [layer_of(model, m) for m in config.modules]
        return cls(model, tokenizer, params, progress=config.progress)

    def edit(self, requests: Sequence[EditRequest]) -> SimpleNamespace:
        return self.edit_encoded(encode(self.tokenizer, requests))

    def edit_encoded(self, batch: Encoded) -> SimpleNamespace:
        """One turn from an encoded batch (all its requests together)."""
        batch = batch.to(self.modules[0].weight.device)
        last = self.params.layers[-1]
        z, loss = compute_targets(self.model, batch, last, self.params)
        for j, (name, module) in enumerate(zip(self.names, self.modules)):
            io = module_io_at(self.model, batch, [name], batch.lookup, hidden_after=last)
            keys, resid = io[name], (z - io["hidden"]) / (len(self.names) - j)
            add_update(module, self.solve(j, keys, resid))
        self.after_turn(batch)
        return SimpleNamespace(loss=loss)

    def after_turn(self, batch: Encoded) -> None:
        """Method-specific bookkeeping once a turn is applied (AlphaEdit's key accumulation)."""

    def solve(self, j: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """MEMIT's update of the j-th edit layer, ``(d_out, d_in)``."""
        a = self.params.mom2_update_weight * self.moments[j] + keys.T @ keys
        return torch.linalg.solve(a, keys.T @ resid).T

    def describe(self) -> dict[str, Any]:
        return {**asdict(self.params), "modules": list(self.names), "source": self.source,
                "deviations": DEVIATIONS, "key_statistics": self.stats_info}
