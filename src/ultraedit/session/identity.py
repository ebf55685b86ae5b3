"""The base model a state was made on: its fingerprint (architecture, module names, shapes, dtypes
and the SHA-256 of the original weights), and the checks that refuse another model."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .files import FingerprintError, dtype_name, tensor_bytes

APPLIED = "_ultraedit_applied"  # set on a model that carries a saved state's delta (load, apply_delta)


def model_info(model: nn.Module) -> dict[str, Any]:
    """``model_type`` and class name: the architecture part of a fingerprint."""
    config = getattr(model, "config", None)
    return {"model_type": getattr(config, "model_type", None), "architecture": type(model).__name__}


def fingerprint_of(info: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The fingerprint of weights ``weights`` (name -> tensor) of a model described by ``info``
    (:func:`model_info`)."""
    digest = hashlib.sha256()
    modules = {}
    for name, w in weights.items():
        modules[name] = {"shape": list(w.shape), "dtype": dtype_name(w.dtype)}
        digest.update(f"{name}|{dtype_name(w.dtype)}|{list(w.shape)}|".encode())
        digest.update(tensor_bytes(w))
    return {**info, "modules": modules, "weights_sha256": digest.hexdigest()}


def fingerprint(model: nn.Module, modules: Sequence[str]) -> dict[str, Any]:
    """Fingerprint of ``model`` as seen through the edit ``modules`` (their CURRENT weights).

    Returns:
        ``{"model_type", "architecture", "modules": {name: {"shape", "dtype"}}, "weights_sha256"}``
        where the hash is SHA-256 over each module's name, dtype, shape and raw weight bytes.
    """
    available = dict(model.named_modules())
    missing = [n for n in modules if n not in available]
    if missing:
        raise FingerprintError(f"{type(model).__name__} has no module(s) {missing}")
    return fingerprint_of(model_info(model), {n: available[n].weight for n in modules})


def structure_diffs(expected: Mapping[str, Any], model: nn.Module) -> list[str]:
    """Differences in architecture, module names, shapes and dtypes (no hashing)."""
    diffs = []
    config = getattr(model, "config", None)
    actual_arch = {"model_type": getattr(config, "model_type", None), "architecture": type(model).__name__}
    for key, value in actual_arch.items():
        if expected.get(key) != value:
            diffs.append(f"{key}: state has {expected.get(key)!r}, model is {value!r}")
    available = dict(model.named_modules())
    for name, spec in expected["modules"].items():
        module = available.get(name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            diffs.append(f"module {name!r}: missing from the model")
            continue
        if list(weight.shape) != list(spec["shape"]):
            diffs.append(f"module {name!r}: shape {list(weight.shape)}, state has {spec['shape']}")
        if dtype_name(weight.dtype) != spec["dtype"]:
            diffs.append(
                f"module {name!r}: dtype {dtype_name(weight.dtype)}, state has {spec['dtype']} "
                f"(load the model with dtype={spec['dtype']})"
            )
    return diffs


def refuse(directory: Path, diffs: list[str]) -> None:
    if diffs:
        lines = "\n  - ".join(diffs)
        raise FingerprintError(f"the state in {directory} was made on a different base model:\n  - {lines}")


def hash_diff(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    if expected["weights_sha256"] != actual["weights_sha256"]:
        return [
            "the original weights of the edit modules differ (sha256 "
            f"{expected['weights_sha256'][:16]}... in the state, {actual['weights_sha256'][:16]}... in the model): "
            "another checkpoint, or a model that was already edited"
        ]
    return []


def refuse_applied(model: nn.Module) -> None:
    """A model that already carries a state's delta cannot take one again (it would add twice)."""
    applied = getattr(model, APPLIED, None)
    if applied is not None:
        raise FingerprintError(
            f"the model was already edited: it carries the delta of {applied['state']} ({applied['turns']} turns), "
            "applied to it before; apply or load a state on a freshly loaded base model (twice would double the edit)"
        )


def mark_applied(model: nn.Module, directory: Path, meta: Mapping[str, Any]) -> None:
    setattr(model, APPLIED, {"state": str(directory), "turns": meta["turns"], "session_id": meta.get("session_id")})
