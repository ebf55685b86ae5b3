"""Lifelong normalization: running feature statistics kept across every turn, never reset.

One :class:`LifelongNormalizer` exists per distinct edit-module shape ``(d_in, d_out)``; it sees the
rows ``z = [k, g]`` (module input concatenated with the gradient of the loss w.r.t. the module
output, width ``d_in + d_out``) of every minibatch ever edited, in order.

Two update formulas are offered:

``"paper"`` (default) -- the authors' exact formula, so results match theirs::

    n'    = n + m
    delta = mean_rows(x) - mean
    mean += m * delta / n'
    var  += m * var_rows_unbiased(x) + n * m * delta**2 / n'
    std   = sqrt(var / (n' - 1 + eps))

``"welford"`` -- the textbook Chan/Welford merge, which adds ``(m - 1) * var_rows_unbiased(x)``
instead of ``m * ...`` so that ``var`` is the exact sum of squared deviations.

For a block of a single row the unbiased variance is undefined; both formulas then add nothing
for the within-block term (the authors' code would produce NaN there).
"""

from __future__ import annotations

from typing import Literal

import torch

Formula = Literal["paper", "welford"]
EPS = torch.finfo(torch.float32).eps


class LifelongNormalizer:
    """Running mean/std of ``dim``-wide feature rows.

    Attributes:
        n: number of rows seen so far (exact integer).
        mean, var, std: tensors of shape ``(dim,)`` in ``dtype``; ``var`` is the accumulator of
            the chosen formula (not a variance), ``std`` the derived standard deviation.
    """

    def __init__(
        self,
        dim: int,
        *,
        formula: Formula = "paper",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if formula not in ("paper", "welford"):
            raise ValueError(f"normalizer formula must be 'paper' or 'welford', got {formula!r}")
        self.dim = dim
        self.formula: Formula = formula
        self.n = 0
        self.mean = torch.zeros(dim, dtype=dtype, device=device)
        self.var = torch.zeros(dim, dtype=dtype, device=device)
        self.std = torch.zeros(dim, dtype=dtype, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.mean.dtype

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def update(self, x: torch.Tensor) -> None:
        """Fold a block of rows ``x`` of shape ``(m, dim)`` into the statistics, in place."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"normalizer of width {self.dim} got a block of shape {tuple(x.shape)}")
        m = x.shape[0]
        if m == 0:
            return
        x = x.to(device=self.device, dtype=self.dtype)  # rows of a module on another device than the normalizer
        n_new = self.n + m
        block_mean = x.mean(0)
        delta = block_mean - self.mean
        if m > 1:
            block_var = x.var(0, unbiased=True)
            within = block_var.mul_(m if self.formula == "paper" else m - 1)
        else:
            within = torch.zeros_like(self.var)
        self.mean.add_(delta, alpha=m / n_new)
        self.var.add_(within).add_(delta.square_(), alpha=self.n * m / n_new)
        torch.sqrt(self.var / (n_new - 1 + EPS), out=self.std)
        self.n = n_new

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / (std + eps)`` row-wise; ``x`` of shape ``(..., dim)``, returned in ``dtype``."""
        return (x.to(device=self.device, dtype=self.dtype) - self.mean) / (self.std + EPS)

    def clone(self) -> "LifelongNormalizer":
        other = LifelongNormalizer.__new__(LifelongNormalizer)
        other.dim, other.formula, other.n = self.dim, self.formula, self.n
        other.mean, other.var, other.std = self.mean.clone(), self.var.clone(), self.std.clone()
        return other

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that fully describe the statistics (``n`` as a 0-d int64 tensor)."""
        return {
            "n": torch.tensor(self.n, dtype=torch.int64),
            "mean": self.mean,
            "var": self.var,
            "std": self.std,
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key in ("mean", "var", "std"):
            if tuple(state[key].shape) != (self.dim,):
                raise ValueError(f"normalizer state {key!r} has shape {tuple(state[key].shape)}, expected ({self.dim},)")
        self.n = int(state["n"])
        self.mean = state["mean"].to(device=self.device, dtype=self.dtype).clone()
        self.var = state["var"].to(device=self.device, dtype=self.dtype).clone()
        self.std = state["std"].to(device=self.device, dtype=self.dtype).clone()

    def __repr__(self) -> str:
        return f"LifelongNormalizer(dim={self.dim}, formula={self.formula!r}, n={self.n}, dtype={self.dtype})"
