"""Preserved keys of generic text: what the edit should leave alone (``EditConfig.preserve``).

MEMIT (Meng et al., 2023) and AlphaEdit (Fang et al., 2025) protect a model's unrelated knowledge
by keeping ``dW`` small on the keys (module inputs) of ordinary text: MEMIT adds the keys'
second-moment matrix ``E0[k k^T]`` (estimated on Wikipedia) to the least-squares system,
AlphaEdit projects ``dW`` onto its null space. UltraEdit has neither. We take MEMIT's form, which
fits UltraEdit's ridge solve as one extra term and stays closed-form:

    dW = (K^T K + lambda I + alpha E0[k k^T])^-1 K^T V

``E0[k k^T]`` is estimated per edit module on a short generic English text that ships with the
package (``data/generic.txt``, written for this purpose; not the perplexity text
``data/heldout.txt``), over every token position.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Iterable

import torch
from torch import nn

from .batching import pad_id_of


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


def context_length(model: nn.Module) -> int | None:
    """The most positions the model was built for (``max_position_embeddings``), if it says."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


class _AllRecorded(Exception):
    """Raised by the last edit module's hook: the rest of the forward pass is not needed."""


@torch.no_grad()
def key_grams(
    model: nn.Module, modules: dict[str, nn.Module], batches: Iterable[dict[str, torch.Tensor]],
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], int]:
    """``(sums, count)``: per module, ``sum k k^T`` (``(d_in, d_in)``, in ``dtype``) of its input at
    the positions each batch's ``positions`` (bool, like ``input_ids``) marks, and how many there were.
    Batches carry ``input_ids``, ``attention_mask`` and ``positions``; nothing is back-propagated.
    Each forward pass stops once every module has seen its input (the layers above the highest
    edit module and the vocabulary projection are never run)."""
    device = model.get_input_embeddings().weight.device
    sums: dict[str, torch.Tensor] = {}
    count = 0
    mask: torch.Tensor | None = None
    seen: set[str] = set()

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            keys = args[0][mask.to(args[0].device)].to(dtype)
            sums[name] = sums.get(name, 0) + keys.T @ keys
            seen.add(name)
            if len(seen) == len(modules):
                raise _AllRecorded

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    training = model.training
    model.eval()
    try:
        for batch in batches:
            mask = batch["positions"].bool()
            count += int(mask.sum())
            seen.clear()
            try:
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                      use_cache=False)
            except _AllRecorded:
                pass
            if len(seen) != len(modules):
                missing = sorted(set(modules) - seen)
                raise RuntimeError(f"edit modules {missing} did not run in the forward pass")
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    return sums, count


def key_moments(
    model: nn.Module, tokenizer: Any, modules: dict[str, nn.Module], *, text: str = "generic.txt",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """``E0[k k^T]`` (``(d_in, d_in)``, in ``dtype``) of each module's input over every real token of ``text``."""
    batches = text_batches(tokenizer, package_text(text), max_tokens=context_length(model))
    sums, count = key_grams(model, modules, ({**b, "positions": b["attention_mask"]} for b in batches), dtype)
    return {n: sums[n] / count for n in modules}
