"""AlphaEdit (Fang et al. 2025, arXiv 2410.02355): MEMIT's update projected onto the null space
of the preserved knowledge's keys, in its sequential form.

Target values and their spreading over layers are MEMIT's (:mod:`.memit`). Per edit layer:

* ``P = U0 U0^T`` where ``U0`` are the eigenvectors of the key second moment ``C = E[k k^T]``
  on generic text (:mod:`ultraedit.stages.statistics`) whose eigenvalues are below ``nullspace_threshold``
  (computed once, on the unedited model);
* ``Kp`` accumulates ``K^T K`` of every earlier turn's keys at that layer (sequential editing;
  the keys read from the model after their turn was applied, as the authors' loop does);
* ``W += (P K^T R)^T`` solved from ``(P (K^T K + Kp) + L2 I) X = P K^T R``, i.e.
  ``dW^T = (P (K^T K + Kp) + L2 I)^-1 P K^T R``.

Defaults: the authors' ``hparams/AlphaEdit/Llama3-8B.json``: layers 4-8 of 32 (scaled to depth),
``v_num_grad_steps 25``, ``v_lr 1e-1``, ``v_weight_decay 0.5``, ``clamp_norm_factor 0.75``,
``nullspace_threshold 2e-2``, ``L2 10``; same deviations as our MEMIT (``describe()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .common import Encoded, module_io_at
from .memit import MEMITMethod, MEMITParams


@dataclass
class AlphaEditParams(MEMITParams):
    nullspace_threshold: float = 2e-2
    L2: float = 10.0


def null_space_projector(moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """Projector onto the eigenvectors of ``moment`` with eigenvalue < ``threshold``."""
    values, vectors = torch.linalg.eigh(moment.double())
    small = vectors[:, values < threshold]
    return (small @ small.T).float()


class AlphaEditMethod(MEMITMethod):
    name = "alphaedit"
    source = "AlphaEdit repository hparams/AlphaEdit/Llama3-8B.json (layers scaled to depth)"

    @classmethod
    def params_class(cls) -> type:
        return AlphaEditParams

    def setup(self) -> None:
        self.projectors = [null_space_projector(c, self.params.nullspace_threshold) for c in self.moments]
        self.past_keys = [torch.zeros_like(c) for c in self.moments]

    def solve(self, j: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        p, kk = self.projectors[j], keys.T @ keys
        eye = torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
        return torch.linalg.solve(p @ (kk + self.past_keys[j]) + self.params.L2 * eye, p @ keys.T @ resid).T

    def after_turn(self, batch: Encoded) -> None:
        """Add this turn's keys, read from the edited model as the authors' evaluation loop does."""
        io = module_io_at(self.model, batch, self.names, batch.lookup)
        for j, name in enumerate(self.names):
            self.past_keys[j] += io[name].T @ io[name]

    def describe(self) -> dict[str, Any]:
        ranks = [int(torch.linalg.matrix_rank(p, hermitian=True)) for p in self.projectors]
        return {**super().describe(), "null_space_dims": ranks}
