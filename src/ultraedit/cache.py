"""Where ultraedit keeps what it fetches or builds once: built-in models and key statistics."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn


def cache_dir() -> Path:
    """``$ULTRAEDIT_CACHE``, else ``~/.cache/ultraedit``."""
    return Path(os.environ.get("ULTRAEDIT_CACHE") or Path.home() / ".cache" / "ultraedit")


def model_hash(model: nn.Module) -> str:
    """SHA-256 over every parameter's name, dtype, shape and bytes (the model as it is now)."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def cached_json(path: Path, build: Any) -> Any:
    """The JSON at ``path``, or ``build()``'s result written there (atomically) and returned."""
    if path.is_file():
        return json.loads(path.read_text())
    value = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value) + "\n")
    os.replace(tmp, path)
    return value
