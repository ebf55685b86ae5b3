"""The closed-form ridge solve of UltraEdit (method page, steps 4-6).

Given the raw keys ``K`` (n x d_in) and gradients ``G`` (n x d_out) of one edit module for a whole
turn, and the lifelong normalizer of its shape:

    z_hat = normalize([K, G]);  (K_hat, G_hat) = split(z_hat)
    V     = -lr * ||K_hat_row||^2 * G_hat                      (n x d_out)
    dW    = (K^T K + lambda I)^-1 K^T V                        (d_in x d_out, primal)
          = K^T (K K^T + lambda I)^-1 V                        (dual, cheaper when n < d_in)

With preserved keys (options beyond the paper) the system is ``(K^T K + A)^-1 K^T V`` with
``A = lambda I + P``; its dual form is the push-through identity

    dW    = Z (I + K Z)^-1 V,   Z = A^-1 K^T                   (n x n system; A factored once)

so that the refinement steps of a turn, which solve again with new rows against the same ``A``,
factor ``A`` once (:class:`Preserved`) and then only solve ``n``-sized systems.

Everything here runs in float32 (or float64), batched over a leading module dimension so that
modules of equal shape are solved in one call.
"""

from __future__ import annotations

from typing import Literal

import torch

from .normalizer import LifelongNormalizer

SolveMethod = Literal["auto", "dual", "primal"]


def target_values(
    keys: torch.Tensor, grads: torch.Tensor, normalizer: LifelongNormalizer, lr: float
) -> torch.Tensor:
    """Step 4-5: ``V = -lr * ||K_hat||^2 * G_hat`` for keys ``(..., n, d_in)`` and grads ``(..., n, d_out)``."""
    d_in = keys.shape[-1]
    z_hat = normalizer.normalize(torch.cat((keys, grads), dim=-1))
    k_hat, g_hat = z_hat[..., :d_in], z_hat[..., d_in:]
    return (-lr) * k_hat.square().sum(-1, keepdim=True) * g_hat


def _spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve ``a x = b`` for symmetric positive-definite ``a`` (batched); Cholesky, LU as fallback."""
    chol, info = torch.linalg.cholesky_ex(a)
    if bool((info == 0).all()):
        return torch.cholesky_solve(b, chol)
    return torch.linalg.solve(a, b)


class Preserved:
    """The turn-constant part ``A = lambda I + P`` of the ridge systems of modules of one shape:
    ``P`` (``(..., d_in, d_in)``, symmetric positive semi-definite) as given, ``A``'s Cholesky
    factor made on the first dual solve and kept for the turn's later solves."""

    def __init__(self, matrix: torch.Tensor, ridge: float) -> None:
        self.matrix, self.ridge = matrix, ridge
        self._factor: torch.Tensor | None = None
        self._factored = False

    def factor(self) -> torch.Tensor | None:
        """The lower Cholesky factor of ``A`` (``None`` when ``A`` is not numerically positive definite)."""
        if not self._factored:
            a = self.matrix.clone()
            a.diagonal(dim1=-2, dim2=-1).add_(self.ridge)
            chol, info = torch.linalg.cholesky_ex(a)
            self._factor, self._factored = (chol if bool((info == 0).all()) else None), True
        return self._factor


def _matmul_to(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype | None) -> torch.Tensor:
    """``a @ b`` (batched), each batch element converted to ``out_dtype`` as soon as it is computed,
    so that at most one element is ever held in the compute dtype (a Llama-3-8B turn's 12
    float32 ``dW`` are 2.8 GB; in bf16 they are 1.4 GB)."""
    if out_dtype is None or out_dtype == a.dtype or a.ndim == 2:
        product = a @ b
        return product if out_dtype is None else product.to(out_dtype)
    batch = a.shape[:-2]
    a, b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    out = torch.empty((a.shape[0], a.shape[-2], b.shape[-1]), dtype=out_dtype, device=a.device)
    for i in range(a.shape[0]):
        out[i] = a[i] @ b[i]
    return out.reshape(*batch, *out.shape[-2:])


def ridge_solve(
    keys: torch.Tensor,
    values: torch.Tensor,
    ridge: float,
    method: SolveMethod = "auto",
    out_dtype: torch.dtype | None = None,
    preserve: torch.Tensor | Preserved | None = None,
) -> torch.Tensor:
    """Step 6: ``dW = (K^T K + ridge I)^-1 K^T V`` (with ``preserve``: ``(K^T K + ridge I + P)^-1 K^T V``).

    Args:
        keys: ``(..., n, d_in)`` raw (un-normalized) keys.
        values: ``(..., n, d_out)`` target values ``V``.
        ridge: the ``lambda`` of the method (> 0 keeps the system positive definite).
        method: ``"dual"`` solves the ``n x n`` system, ``"primal"`` the ``d_in x d_in`` one,
            ``"auto"`` picks dual when ``n < d_in``. Both give the same ``dW`` up to rounding
            (with ``preserve``, dual is the push-through form of the module docstring).
        out_dtype: the dtype of the returned ``dW`` (default: that of ``keys``). The solve runs in
            the keys' dtype; a batched result is rounded one module at a time.
        preserve: ``(..., d_in, d_in)`` symmetric positive semi-definite ``P`` added to the
            system (keys whose outputs should stay put: ``P = sum k k^T`` over them, each
            weighted), or a :class:`Preserved` holding it (its factor is reused across calls). Not
            part of the authors' method.

    Returns:
        ``dW`` of shape ``(..., d_in, d_out)``.
    """
    n, d_in = keys.shape[-2], keys.shape[-1]
    if method == "auto":
        method = "dual" if n < d_in else "primal"
    if preserve is not None and not isinstance(preserve, Preserved):
        preserve = Preserved(preserve, ridge)
    if preserve is not None and preserve.ridge != ridge:
        raise ValueError(f"ridge {ridge} differs from the Preserved system's ({preserve.ridge})")
    kt = keys.transpose(-1, -2)
    if method == "dual" and preserve is not None:
        factor = preserve.factor()
        if factor is not None:
            z = torch.cholesky_solve(kt, factor.to(keys.dtype))  # A^-1 K^T, (..., d_in, n)
            inner = keys @ z
            inner = (inner + inner.transpose(-1, -2)) / 2  # I + K A^-1 K^T is symmetric
            inner.diagonal(dim1=-2, dim2=-1).add_(1.0)
            return _matmul_to(z, _spd_solve(inner, values), out_dtype)
        method = "primal"  # A too ill-conditioned to factor: the primal system
    if method == "dual":
        gram = keys @ kt
        gram.diagonal(dim1=-2, dim2=-1).add_(ridge)
        if d_in < values.shape[-1]:  # K^T (G^-1 V) = (G^-1 K)^T V: fewer right-hand sides to solve
            return _matmul_to(_spd_solve(gram, keys).transpose(-1, -2), values, out_dtype)
        return _matmul_to(kt, _spd_solve(gram, values), out_dtype)
    if method == "primal":
        gram = kt @ keys
        gram.diagonal(dim1=-2, dim2=-1).add_(ridge)
        if preserve is not None:
            gram = gram + preserve.matrix.to(gram.dtype)
        shift = _spd_solve(gram, kt @ values)
        return shift if out_dtype is None else shift.to(out_dtype)
    raise ValueError(f"solve method must be 'auto', 'dual' or 'primal', got {method!r}")
