"""The cumulative weight shift ``W - W_base``: taken exactly (so that ``W_base + delta`` rebuilds ``W``
bit for bit), checked against the edit modules, and added back onto base weights."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .files import StateError, read_tensor

DELTA = "delta.safetensors"
EXACT = "exact.safetensors"


def wide_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def exact_delta(
    weight: torch.Tensor, base: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(delta, fix_index, fix_value)``: ``weight - base`` in ``dtype`` such that ``base + delta``
    (computed as :func:`add_delta` does) reproduces ``weight`` bit for bit.

    For bf16/fp16 weights a float32 difference is exact unless a weight moved across more than
    ~16 binary orders of magnitude. For float32 weights it can be one rounding off; a few
    ``nextafter`` steps fix most such elements. The rest (where the shift dwarfs the result, so no
    delta of this dtype can land exactly) are returned as flat indices and exact values (model
    dtype), verified by rebuilding the weight. A ``dtype`` narrower than float32
    (``delta_dtype="model"``) is returned as is, without fixes: approximate by choice.
    """
    wide = wide_dtype(dtype, weight.dtype)
    delta = (weight.to(wide) - base.to(wide)).to(dtype)
    if dtype not in (torch.float32, torch.float64):
        return delta, None, None
    target = weight.to(wide)
    for _ in range(4):
        rebuilt = (base.to(wide) + delta.to(wide)).to(weight.dtype).to(wide)
        bad = rebuilt != target
        if not bool(bad.any()):
            return delta, None, None
        direction = torch.where(rebuilt < target, math.inf, -math.inf).to(dtype)
        delta = torch.where(bad, torch.nextafter(delta, direction), delta)
    rebuilt = (base.to(wide) + delta.to(wide)).to(weight.dtype)
    index = (rebuilt != weight).reshape(-1).nonzero().squeeze(1)
    if index.numel() == 0:
        return delta, None, None
    return delta, index, weight.reshape(-1)[index].clone()


def delta_on_device(
    weight: torch.Tensor, base: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`_exact_delta` on the weight's device (a GPU is much faster at it; the transient
    float32 copies of one module then live there), falling back to the CPU when that device is
    out of memory. Results are on the CPU."""
    if weight.device.type != "cpu":
        try:
            out = exact_delta(weight, base.to(weight.device), dtype)
            return tuple(t.cpu() if t is not None else None for t in out)  # type: ignore[return-value]
        except torch.OutOfMemoryError:
            pass
    return exact_delta(weight.cpu(), base, dtype)


def check_delta(modules: Mapping[str, nn.Module], files: Mapping[str, Any], version: Path) -> None:
    """The delta file holds exactly the modules' shifts, each of its weight's shape (headers only)."""
    path = version / DELTA
    handle = files[DELTA]
    names = set(handle.keys())
    if names != set(modules):
        raise StateError(f"{path}: holds shifts for {sorted(names)}, expected {sorted(modules)}")
    for name, module in modules.items():
        shape = tuple(handle.get_slice(name).get_shape())
        if shape != tuple(module.weight.shape):
            raise StateError(f"{path}: shift of {name!r} has shape {shape}, weight {tuple(module.weight.shape)}")
    fixes = files.get(EXACT)
    if fixes is not None:
        unknown = sorted(k for k in fixes.keys() if k.rsplit("/", 1)[0] not in modules)
        if unknown:
            raise StateError(f"{version / EXACT}: fixes for unknown modules {unknown}")


def add_delta(
    modules: Mapping[str, nn.Module],
    base: Mapping[str, torch.Tensor] | None,
    files: Mapping[str, Any],
    version: Path,
    keep_deltas: frozenset[str] | set[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """``W = base + delta`` per module (``base`` None: the module's current weight), one at a time.
    All or nothing: on any error the modules already written are restored. Returns the deltas of
    ``keep_deltas`` in float32 on their weights' devices."""
    path = version / DELTA
    handle = files[DELTA]
    fixes = files.get(EXACT)
    fix_keys = set(fixes.keys()) if fixes is not None else set()
    written: list[tuple[torch.Tensor, torch.Tensor]] = []
    kept: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        try:
            for name, module in modules.items():
                weight = module.weight
                delta = read_tensor(handle, path, name, tuple(weight.shape))
                wide = wide_dtype(delta.dtype, weight.dtype)
                origin = base[name] if base is not None else weight
                new = (origin.to(device=weight.device, dtype=wide) + delta.to(device=weight.device, dtype=wide)).to(weight.dtype)
                if f"{name}/index" in fix_keys:
                    index = read_tensor(fixes, version / EXACT, f"{name}/index").to(weight.device)
                    value = read_tensor(fixes, version / EXACT, f"{name}/value", tuple(index.shape))
                    new.view(-1)[index] = value.to(device=weight.device, dtype=weight.dtype)
                if name in keep_deltas:
                    kept[name] = delta.to(device=weight.device, dtype=torch.float32)
                written.append((weight, weight.detach().to("cpu", copy=True)))
                weight.copy_(new)
        except BaseException:
            for weight, previous in reversed(written):
                weight.copy_(previous.to(weight.device))
            raise
    return kept
