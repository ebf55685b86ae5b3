"""What several stages share: derived requests (seeded by the request's text) and sums of ``k k^T``
over marked positions."""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..core.anatomy import context_length
from ..core.batching import EditRequest
from ..texts import package_text, text_batches


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


@torch.no_grad()
def module_scales(model: nn.Module, tokenizer: Any, modules: dict[str, nn.Module]) -> dict[str, tuple[float, float]]:
    """Per module, over the tokens of the package's generic text: the median norm of its output (the
    size of what it typically writes) and the median of ``||k||^2 / d_in`` of its input (its keys'
    typical mean square entry). Medians: a few attention-sink tokens carry activations a hundred times
    larger."""
    outs: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    keys: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    mask: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            real = mask["now"].to(output.device)
            outs[name].append(torch.linalg.vector_norm(output.float(), dim=-1)[real].cpu())
            keys[name].append(args[0].float().square().mean(-1)[real].cpu())
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    device = model.get_input_embeddings().weight.device
    try:
        for batch in text_batches(tokenizer, package_text("generic.txt"), max_tokens=context_length(model)):
            mask["now"] = batch["attention_mask"].bool()
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: (float(torch.cat(outs[n]).median()), float(torch.cat(keys[n]).median())) for n in modules}
