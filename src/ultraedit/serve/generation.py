"""Token-by-token generation for the server: KV cache, temperature / top-p sampling with a
per-request seeded generator, stop strings, and text deltas safe to stream.

One request runs alone (no batching across requests), so an answer depends only on the prompt,
the sampling parameters and the weights it ran on: greedy answers are reproducible, and so are
sampled ones given ``seed``.
"""

from __future__ import annotations

import inspect
import secrets
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None
    max_tokens_given: bool = True  # False: a default, cut to what the model's context leaves


@dataclass
class Delta:
    """A piece of generated text; the last one has ``finish_reason`` ("stop" or "length")."""

    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0


def pick_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Greedy at temperature 0, else a sample from the top-p nucleus of ``softmax(logits / T)``."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < params.top_p  # always keeps the top token
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_ids(
    model: nn.Module, prompt_ids: Sequence[int], params: SamplingParams, stop_ids: set[int],
    cancelled: Callable[[], bool] = lambda: False,
) -> Iterator[int]:
    """Yield up to ``params.max_tokens`` new token ids (an end-of-sequence id is yielded, then stops)."""
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    generator = torch.Generator().manual_seed(seed)
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    cache: dict[str, Any] = {}
    # the KV cache keyword: "cache" in transformers >= 5.x, "past_key_values" before
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        for _ in range(params.max_tokens):
            if cancelled():
                return
            out = model(input_ids=ids, use_cache=True, **cache)
            cache = {key: out[key]}
            token = pick_token(out.logits[0, -1].to("cpu"), params, generator)
            yield token
            if token in stop_ids:
                return
            ids = torch.tensor([[token]], dtype=torch.long, device=device)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could still begin a stop string."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold


def stream_text(
    tokenizer: Any, ids: Iterator[int], stop_ids: set[int], stops: Sequence[str], max_tokens: int
) -> Iterator[Delta]:
    """Turn generated ids into text deltas: special tokens dropped, nothing emitted that a stop
    string could still cut, no half UTF-8 character (byte-level BPE), the stop string itself not
    included (as OpenAI does). The last delta carries ``finish_reason``."""
    tokens: list[int] = []
    emitted = 0
    for token in ids:
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s, max(0, emitted - len(s))) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            yield Delta(text[emitted:cut], "stop", len(tokens))
            return
        if token in stop_ids:
            yield Delta(text[emitted:], "stop", len(tokens))
            return
        ready = len(text) - _held_back(text, stops)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its next byte
            ready = min(ready, len(text) - 1)
        if ready > emitted:
            yield Delta(text[emitted:ready], None, len(tokens))
            emitted = ready
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    yield Delta(text[emitted:], "length" if len(tokens) >= max_tokens else "stop", len(tokens))


def stop_token_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """End-of-sequence ids of the tokenizer and the model's generation config."""
    ids: set[int] = set()
    candidates = [getattr(tokenizer, "eos_token_id", None)]
    gen_config = getattr(model, "generation_config", None)
    candidates.append(getattr(gen_config, "eos_token_id", None))
    for value in candidates:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids
