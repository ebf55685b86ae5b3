"""What several stages share: derived requests (seeded by the request's text), the package's text
files, and sums of ``k k^T`` over marked positions."""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..core.anatomy import context_length
from ..core.batching import EditRequest, pad_id_of


def request_seed(request: EditRequest) -> int:
    """A seed from a request's text (so derived choices survive a resume)."""
    return int.from_bytes(hashlib.sha256(f"{request.prompt}\0{request.target}".encode()).digest()[:8], "big")


def with_copies(
    requests: Sequence[EditRequest], prompts: Sequence[Sequence[str]]
) -> tuple[list[EditRequest], list[int]]:
    """``(sequences, owners)``: ``requests`` followed by, for each request ``i``, a copy with each
    prompt of ``prompts[i]`` (same target, id and extra). ``owners[j]`` is the index in ``requests``
    of ``sequences[j]``."""
    sequences, owners = list(requests), list(range(len(requests)))
    for index, (request, others) in enumerate(zip(requests, prompts, strict=True)):
        for prompt in others:
            sequences.append(EditRequest(prompt, request.target, id=request.id, extra=request.extra))
            owners.append(index)
    return sequences, owners


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
