"""One turn of UltraEdit, exactly as the method page states it (``ultraedit-method.md``, steps 1-7)::

    for each minibatch of the turn:                        # steps 1-3
        K_m, G_m = keys and output gradients at the target positions, for every edit module m
        normalizer[shape(m)].update([K_m, G_m])
    for every edit module m, with all rows of the turn:    # steps 4-7
        z_hat = normalize([K, G]);  V = -lr * ||K_hat||^2 * G_hat
        dW = (K^T K + lambda I)^-1 K^T V
        W += dW^T   (nn.Linear; GPT-2 Conv1D: W += dW)

:func:`faithful_turn` is that turn in one function; the editor (:class:`ultraedit.UltraEditor`) runs
the same building blocks, atomically, with the optional stages of :mod:`ultraedit.stages` around them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .capture import MinibatchCapture, capture
from .normalizer import LifelongNormalizer
from .solver import ridge_solve, target_values
from .weights import apply_shift, groups, module_shape


def new_normalizers(
    modules: dict[str, nn.Module], formula: str = "paper", dtype: torch.dtype = torch.float32
) -> dict[tuple[int, int], LifelongNormalizer]:
    """One empty :class:`LifelongNormalizer` per module shape ``(d_in, d_out)``, of width ``d_in + d_out``,
    on the device of the first module of that shape."""
    return {
        shape: LifelongNormalizer(sum(shape), formula=formula, dtype=dtype, device=modules[names[0]].weight.device)
        for shape, names in groups(modules).items()
    }


def update_normalizers(
    normalizers: dict[tuple[int, int], LifelongNormalizer], modules: dict[str, nn.Module],
    captures: Sequence[MinibatchCapture],
) -> None:
    """Step 3: fold ``[K, G]`` into each module shape's normalizer, one minibatch at a time, modules in order."""
    for mb in captures:
        for name, module in modules.items():
            normalizers[module_shape(module)].update(torch.cat((mb.keys[name], mb.grads[name]), -1))


def turn_rows(
    captures: Sequence[MinibatchCapture], group: Sequence[str], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K, G)`` of a turn for modules of one shape, stacked: ``(modules, rows, d_in)`` and ``(modules, rows, d_out)``."""
    keys = torch.stack([torch.cat([mb.keys[n] for mb in captures]).to(device, dtype) for n in group])
    grads = torch.stack([torch.cat([mb.grads[n] for mb in captures]).to(device, dtype) for n in group])
    return keys, grads


def faithful_turn(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Sequence[dict[str, torch.Tensor]],
    normalizers: dict[tuple[int, int], LifelongNormalizer],
    *,
    lr: float = 1e-6,
    ridge: float = 1.0,
    solver: str = "auto",
    forward_batch_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Apply one turn of the authors' method to ``model`` in place and return each module's ``dW``
    (``(d_in, d_out)``); ``normalizers`` (:func:`new_normalizers`, kept across turns) are updated."""
    captures = capture(model, modules, batches, forward_batch_size=forward_batch_size)  # steps 1-2
    update_normalizers(normalizers, modules, captures)  # step 3
    shifts: dict[str, torch.Tensor] = {}
    for shape, group in groups(modules).items():  # steps 4-6, modules of one shape together
        norm = normalizers[shape]
        keys, grads = turn_rows(captures, group, dtype, norm.device)
        values = target_values(keys, grads, norm, lr)
        shifts.update(zip(group, ridge_solve(keys, values, ridge, solver)))
    for name, module in modules.items():  # step 7
        apply_shift(module, shifts[name])
    return shifts
