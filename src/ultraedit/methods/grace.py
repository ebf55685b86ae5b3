"""GRACE (Hartvigsen et al. 2023, arXiv 2211.11031): a discrete key-value codebook at one layer.

The adaptor wraps one MLP output projection; the weights never change. A codebook holds keys
(the module's input at an edit prompt's last token), values (a replacement for the module's
output) and a deferral radius per key. At a position whose input lies within the radius of its
nearest key, the module's output becomes that key's value; here the replacement then stays on for
every later position of the sequence (so the whole answer is generated from it, as when the key
matched at the end of a prompt), and positions before the first match are untouched.

Editing a request (in turn order): its key is the module input at its last prompt token. With no
key within ``eps + radius(nearest)`` a new key is added with radius ``eps``; if the nearest key is
that close but holds another answer, a new key is added and both radii become half their distance
(minus 1e-5 for the old one); if it holds the same answer, the old radius grows to the distance
("coverage"). Then every value used by the turn is trained with Adam (``edit_lr``, ``n_iter``
steps) on the cross-entropy of the target tokens; new values start "cold" (uniform [0, 1)).

Defaults: EasyEdit ``hparams/GRACE/llama-7B.yaml``: the last layer's ``mlp.down_proj`` (31 of
32, scaled to depth), ``eps 1.0``, ``n_iter 100``, ``edit_lr 1.0``, Euclidean distance,
``eps_expand coverage``, ``val_init cold``. A turn's requests are trained jointly (one loss, the
sum of per-request mean losses; Adam's update is per element, so each value moves as if alone,
except values shared by requests with the same answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..core.batching import EditRequest
from .common import Encoded, encode, frozen, module_io_at, one_layer_module, one_layer_params, tail_of, unfreeze


@dataclass
class GraceParams:
    layer: int = -1  # -1: EasyEdit's layer 31 of 32, scaled to the model's depth
    eps: float = 1.0
    n_iter: int = 100
    edit_lr: float = 1.0


class Codebook:
    """Keys ``(N, d_in)``, values ``(N, d_out)``, radii ``(N,)`` and each key's answer tokens."""

    def __init__(self, d_in: int, d_out: int, device: torch.device) -> None:
        self.keys = torch.zeros((0, d_in), device=device)
        self.values = torch.zeros((0, d_out), device=device)
        self.radii = torch.zeros((0,), device=device)
        self.labels: list[tuple[int, ...]] = []

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, key: torch.Tensor, label: tuple[int, ...], eps: float, value: torch.Tensor) -> int:
        self.keys = torch.cat([self.keys, key[None].float()])
        self.values = torch.cat([self.values, value[None].float()])
        self.radii = torch.cat([self.radii, torch.tensor([eps], device=self.radii.device)])
        self.labels.append(label)
        return len(self.labels) - 1

    def insert(self, key: torch.Tensor, label: tuple[int, ...], eps: float, new_value: torch.Tensor) -> int:
        """GRACE's codebook rule for one edit; returns the index of the key whose value it trains."""
        if len(self) == 0:
            return self.add(key, label, eps, new_value)
        dists = torch.linalg.vector_norm(self.keys - key[None].float(), dim=1)
        d, nearest = float(dists.min()), int(dists.argmin())
        if d > eps + float(self.radii[nearest]):
            return self.add(key, label, eps, new_value)
        if self.labels[nearest] != label:
            index = self.add(key, label, eps, new_value)
            self.radii[nearest] = d / 2 - 1e-5
            self.radii[index] = d / 2
            return index
        if d > float(self.radii[nearest]):
            self.radii[nearest] = d
        return nearest

    def replace(self, inputs: torch.Tensor, outputs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Module outputs with the codebook applied, ``(B, T, d_out)`` (see the module docstring)."""
        if len(self) == 0:
            return outputs
        x = inputs.detach().float()
        # nearest key by |x|^2 - 2 x.k + |k|^2 (one matmul), then its exact distance
        scores = (self.keys * self.keys).sum(1) - 2 * x @ self.keys.T   # (B, T, N)
        nearest = scores.argmin(dim=2)                                  # (B, T)
        nearest_dist = torch.linalg.vector_norm(x - self.keys[nearest], dim=-1)
        hit = nearest_dist <= self.radii[nearest]
        first = torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(hit[:, 0], -1, dtype=torch.long))
        rows = torch.arange(inputs.shape[0], device=inputs.device)
        chosen = nearest[rows, first.clamp(min=0)]                     # the key of the first hit
        positions = torch.arange(inputs.shape[1], device=inputs.device)
        active = (first[:, None] >= 0) & (positions[None] >= first[:, None])
        return torch.where(active[..., None], values[chosen][:, None].to(outputs.dtype), outputs)


class GraceMethod:
    """GRACE behind the bench's ``EditMethod`` interface."""

    source = "EasyEdit hparams/GRACE/llama-7B.yaml (layer scaled to depth)"

    def __init__(self, model: nn.Module, tokenizer: Any, params: GraceParams, seed: int = 0) -> None:
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.module_name, self.module = one_layer_module(model, params, published=31)
        w = self.module.weight
        d_out, d_in = (w.shape if isinstance(self.module, nn.Linear) else w.shape[::-1])
        self.codebook = Codebook(d_in, d_out, w.device)
        self.values: torch.Tensor = self.codebook.values  # trained in place of codebook.values
        self.generator = torch.Generator().manual_seed(seed)
        self.handle = self.module.register_forward_hook(self._hook)

    @classmethod
    def from_bench(cls, model: nn.Module, tokenizer: Any, config: Any) -> GraceMethod:
        params = one_layer_params(model, config, GraceParams(), "grace", lr_field="edit_lr")
        return cls(model, tokenizer, params, seed=config.seed)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.codebook.replace(args[0], output, self.values)

    def edit(self, requests: Sequence[EditRequest]) -> SimpleNamespace:
        return self.edit_encoded(encode(self.tokenizer, requests))

    def edit_encoded(self, batch: Encoded) -> SimpleNamespace:
        """One turn from an encoded batch: codebook updates in order, then joint value training."""
        batch = batch.to(self.module.weight.device)
        queries = module_io_at(self.model, batch, [self.module_name], batch.prompt_last)[self.module_name]
        for query, label in zip(queries, batch.target_tokens):
            cold = torch.rand(self.codebook.values.shape[1], generator=self.generator).to(query.device)
            self.codebook.insert(query, label, self.params.eps, cold)
        loss = self._train(batch)
        return SimpleNamespace(loss=loss, keys=len(self.codebook))

    def _train(self, batch: Encoded) -> float:
        saved = frozen(self.model)
        values = self.codebook.values.clone().requires_grad_(True)
        self.values = values
        try:
            tail = tail_of(self.model, batch, self.params.layer)
            optimizer = torch.optim.Adam([values], lr=self.params.edit_lr)
            loss = torch.zeros(())
            for _ in range(self.params.n_iter):
                optimizer.zero_grad(set_to_none=True)
                loss = tail.per_row(tail.token_nll(tail.hidden)).sum()
                loss.backward()
                optimizer.step()
        finally:
            self.codebook.values = values.detach()
            self.values = self.codebook.values
            unfreeze(saved)
        return float(loss.detach()) / max(1, batch.input_ids.shape[0])

    def describe(self) -> dict[str, Any]:
        return {**asdict(self.params), "modules": [self.module_name], "source": self.source,
                "distance": "euclidean", "eps_expand": "coverage", "val_init": "cold",
                "replacement": "from the first matching position to the end of the sequence"}
