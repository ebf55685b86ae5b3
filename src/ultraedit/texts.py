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
    pad = pad_id_of(tokenizer)
    out = []
    for start in range(0, len(texts), batch_size):
        ids = [list(tokenizer(t)["input_ids"])[:max_tokens] for t in texts[start : start + batch_size]]
        width = max(map(len, ids))
        out.append({
            "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        })
    return out
