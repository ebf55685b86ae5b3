"""The edit modules' weights: their ``(d_in, d_out)`` shape, layout, and the one place a weight is written.

The method works in ``(d_in, d_out)``: ``dW = (K^T K + lambda I)^-1 K^T V``. ``nn.Linear`` stores its
weight as ``(d_out, d_in)`` (it receives ``dW^T``), GPT-2's ``Conv1D`` as ``(d_in, d_out)`` (it
receives ``dW``), method page step 7.
"""

from __future__ import annotations

import torch
from torch import nn

try:  # GPT-2 style layers store the weight as (d_in, d_out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()  # type: ignore[assignment,misc]


def module_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an ``nn.Linear`` or GPT-2 ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"cannot edit a {type(module).__name__}: only nn.Linear and Conv1D layers")


def in_out(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` between the module's weight layout and ``(d_in, d_out)``, either way: a transpose for
    ``nn.Linear`` (``(d_out, d_in)``), as is for GPT-2 ``Conv1D`` (which stores ``(d_in, d_out)``)."""
    return tensor if (Conv1D and isinstance(module, Conv1D)) else tensor.T


def write_weight(module: nn.Module, new: torch.Tensor) -> None:
    """Copy ``new`` (weight layout) into the module's weight: the one place a turn writes weights."""
    with torch.no_grad():
        module.weight.copy_(new)


def apply_shift(module: nn.Module, shift: torch.Tensor, alpha: float = 1.0) -> None:
    """Add ``alpha * dW`` (``(d_in, d_out)``) to the module's weight, in its dtype and on its device."""
    weight = module.weight
    delta = in_out(module, shift)
    with torch.no_grad():
        weight.add_(delta.to(device=weight.device, dtype=weight.dtype), alpha=alpha)


def groups(modules: dict[str, nn.Module]) -> dict[tuple[int, int], list[str]]:
    """The edit modules by ``(d_in, d_out)`` shape, in config order: modules of one shape share a
    normalizer and are solved together."""
    out: dict[tuple[int, int], list[str]] = {}
    for name, module in modules.items():
        out.setdefault(module_shape(module), []).append(name)
    return out
