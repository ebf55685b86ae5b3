"""Durable files of a saved state: errors, fsync'd writes, safetensors written one tensor at a time."""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
}


class StateError(ValueError):
    """A saved state is missing, unreadable, or cannot be used as asked."""


class FingerprintError(StateError):
    """A saved state was made on a different base model than the one it is loaded onto."""


class StateWarning(UserWarning):
    """A save completed (its state is current) but a step after the switch failed; the next save
    retries it."""


# ---------------------------------------------------------------------------------------------
# Test hook: ULTRAEDIT_SAVE_PAUSE=<stage> makes a save announce the stage on stderr and sleep
# there (ULTRAEDIT_SAVE_PAUSE_SECONDS, default 60), so a test can kill the process mid-save.
SAVE_STAGES = ("delta", "rename", "current", "log", "cleanup")


def checkpoint(stage: str) -> None:
    if os.environ.get("ULTRAEDIT_SAVE_PAUSE") == stage:
        sys.stderr.write(f"ultraedit-save-paused {stage}\n")
        sys.stderr.flush()
        time.sleep(float(os.environ.get("ULTRAEDIT_SAVE_PAUSE_SECONDS", "60")))


def tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_safetensors(
    path: Path,
    entries: Sequence[tuple[str, torch.dtype, Sequence[int], Callable[[], torch.Tensor]]],
    metadata: Mapping[str, str],
    stage: str | None = None,
) -> int:
    """Write a safetensors file tensor by tensor (one tensor in memory at a time) and fsync it.

    ``entries`` are ``(name, dtype, shape, make)``; ``make()`` produces the tensor when its turn
    comes. Returns the file size in bytes.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, dtype, shape, _ in entries:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for i, (name, dtype, shape, make) in enumerate(entries):
            tensor = make()
            if tensor.dtype != dtype or list(tensor.shape) != list(shape):
                raise RuntimeError(f"{name}: produced {tensor.dtype} {list(tensor.shape)}, announced {dtype} {list(shape)}")
            f.write(tensor_bytes(tensor))
            if i == 0 and stage:
                f.flush()
                checkpoint(stage)
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(raw) + offset


def read_safetensors(path: Path) -> tuple[Any, dict[str, str]]:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise StateError(f"cannot read {path}: {err}") from None
    return handle, dict(handle.metadata() or {})


def read_tensor(handle: Any, path: Path, key: str, shape: Sequence[int] | None = None) -> torch.Tensor:
    """Tensor ``key`` of an open safetensors file; a missing key or another shape is a StateError."""
    try:
        tensor = handle.get_tensor(key)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise StateError(f"{path}: cannot read {key!r} ({err})") from None
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise StateError(f"{path}: {key!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    return tensor
