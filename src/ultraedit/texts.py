"""Texts that ship with the package (``ultraedit/data``): generic English for preserved keys, the
held-out text for perplexity, known facts for the damage guard; and batching them for a model."""

from __future__ import annotations

from importlib import resources
from typing import Any

import torch

from .core.batching import pad_id_of


def package_text(name: str) -> list[str]:
    """Non-empty lines of a text file shipped in ``ultraedit/data``."""
    text = resources.files("ultraedit").joinpath("data", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def text_batches(
    tokenizer: Any, lines: list[str], *, lines_per_sequence: int = 4, batch_size: int = 16, max_tokens: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """Right-padded ``input_ids``/``attention_mask`` batches, ``lines_per_sequence`` lines joined per
    sequence, each cut to ``max_tokens`` (the model's context) when given."""
    texts = [" ".join(lines[i : i + lines_per_sequence]) for i in range(0, len(lines), lines_per_sequence)]
    rows = [list(tokenizer(t)["input_ids"])[:max_tokens] for t in texts]
    return right_padded(rows, pad_id_of(tokenizer), batch_size)


def right_padded(rows: list[list[int]], pad: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """``rows`` of token ids in batches of ``batch_size``, each right-padded to its longest row with
    ``pad``: ``input_ids`` and ``attention_mask``."""
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(map(len, chunk))
        out.append({
            "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in chunk]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk]),
        })
    return out
