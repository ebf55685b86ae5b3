"""The model's own rewordings of edit prompts (``EditConfig.paraphrases``).

UltraEdit writes an edit at the prompt's last token. On SmolLM2-135M about 40% of what those rows
write is tied to the prompt's wording (a rephrase receives 0.91 of the change at the subject's last
token but 0.59 at the answer position; docs/research-log.md), so the edit reaches its
rephrases less than it reaches its own prompt. Editing each fact through several wordings ties it
to the fact instead. The evaluation's rephrases cannot be used for that, so the model writes its
own, from a few-shot completion prompt (:data:`SHOTS`): for a request ``(prompt, target)``,

    SHOTS + "Sentence: {prompt}\\nSame meaning, other words:"

is continued ``samples`` times (temperature, nucleus sampling), and the first line of each
continuation is kept when :func:`usable` accepts it: it names the request's subject, differs from
the prompt, echoes nothing of the examples and is a question or an open phrase (no full stop).

Sampling is seeded per request (:func:`ultraedit.stages.common.request_seed`, one generator per
sample), so a request gets the same rewordings whatever turn it is in; the few-shot prompt is
run once and its KV cache shared by every row (each row's own text follows it, padded in the
middle, with explicit positions: what :func:`ultraedit.core.capture.capture` does for a common prefix).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..core.anatomy import cache_kwarg, context_length
from ..core.batching import EditError, EditRequest, pad_id_of, subject_of
from .base import Stage, positive
from .common import request_seed


@dataclass
class ParaphraseConfig:
    """``count``: most rewordings edited per request."""

    count: int = 2

    def __post_init__(self) -> None:
        positive("paraphrases", "count", self.count, integer=True)


class ParaphraseStage(Stage):
    """Each text request with a known subject is also edited through up to ``count`` rewordings of its
    prompt that the model writes itself at the start of the turn (sampled before anything changes)."""

    name = "paraphrases"

    def expand(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest]) -> list[list[str]]:
        try:
            return paraphrases(model, tokenizer, requests, self.config.count)
        except ValueError as err:
            raise EditError(str(err)) from None

#: The few-shot completion prompt; each example is a question or an open sentence and its rewording.
SHOTS = (
    "Sentence: What is the capital city of Peru?\nSame meaning, other words: Which city is Peru's capital?\n\n"
    "Sentence: The Eiffel Tower is located in the city of\nSame meaning, other words: The city where the Eiffel "
    "Tower stands is\n\n"
    "Sentence: Who wrote the novel Dracula?\nSame meaning, other words: Dracula was written by whom?\n\n"
    "Sentence: Michael Jordan plays the sport of\nSame meaning, other words: The sport Michael Jordan plays is\n\n"
)
#: Text of :data:`SHOTS` that a usable rewording never contains (it would be an echo of an example).
ECHOES = ("Peru", "Eiffel", "Dracula", "Michael Jordan", "Sentence", "Same meaning")

#: Sampling defaults (measured on SmolLM2-135M: 4 samples give about 1.8 usable rewordings per ZsRE request).
SAMPLES, TEMPERATURE, TOP_P, MAX_NEW_TOKENS = 4, 0.7, 0.9, 24


def ends_line(tokenizer: Any, token: int) -> bool:
    """Whether ``token``'s text contains a newline."""
    return "\n" in tokenizer.decode([token])


def query(prompt: str) -> str:
    """The text that follows :data:`SHOTS` for ``prompt``."""
    return f"Sentence: {prompt}\nSame meaning, other words:"


def usable(prompt: str, subject: str, sample: str) -> str | None:
    """The rewording in ``sample`` (its first line, stripped) when it can stand for ``prompt``, else ``None``."""
    line = sample.split("\n")[0].strip()
    if not line or subject not in line or any(echo in line for echo in ECHOES):
        return None
    if line.lower().rstrip("?:. ") == prompt.lower().rstrip("?:. "):
        return None  # the prompt again
    if line.endswith(".") or len(line) > 2 * len(prompt) + 20:
        return None  # a statement (it may carry an answer) or a ramble
    return line


def paraphrases(
    model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], per_request: int, *,
    samples: int = SAMPLES, temperature: float = TEMPERATURE, top_p: float = TOP_P,
    max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 16,
) -> list[list[str]]:
    """Per request, up to ``per_request`` distinct usable rewordings of its prompt (in sampling
    order), from ``samples`` continuations of the few-shot prompt. A request without a known
    subject (:func:`ultraedit.core.batching.subject_of`) gets none."""
    subjects = [subject_of(r) for r in requests]
    asked = [i for i, s in enumerate(subjects) if s is not None]
    out: list[list[str]] = [[] for _ in requests]
    if per_request <= 0 or not asked:
        return out
    shot_ids = _shot_ids(model, tokenizer)
    _check_room(model, tokenizer, [requests[i] for i in asked], shot_ids.shape[1], max_new_tokens)
    shots = _Prefix(model, shot_ids)
    for start in range(0, len(asked), batch_size):
        chunk = asked[start : start + batch_size]
        seeds = [request_seed(requests[i]) + k for i in chunk for k in range(samples)]
        texts = sample(model, tokenizer, shots, [query(requests[i].prompt) for i in chunk], seeds,
                       samples=samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        for row, i in enumerate(chunk):
            for text in texts[row * samples : (row + 1) * samples]:
                line = usable(requests[i].prompt, subjects[i], text)
                if line is not None and line not in out[i] and len(out[i]) < per_request:
                    out[i].append(line)
    return out


def _check_room(
    model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], shots: int, max_new_tokens: int
) -> None:
    """A ``ValueError`` naming the numbers when the model's context cannot hold :data:`SHOTS`
    (``shots`` tokens), the longest request's query and the continuation."""
    room = context_length(model)
    longest = max(len(tokenizer(query(r.prompt), add_special_tokens=False)["input_ids"]) for r in requests)
    if room is not None and shots + longest + max_new_tokens > room:
        raise ValueError(
            f"paraphrases: the few-shot prompt ({shots} tokens), the longest request's query ({longest}) and "
            f"{max_new_tokens} new tokens need {shots + longest + max_new_tokens} positions, but the model has "
            f"{room}; edit without paraphrases (EditConfig.paraphrases=None)")


class _Prefix:
    """A prompt's token ids and its KV cache (batch 1), computed once."""

    def __init__(self, model: nn.Module, ids: torch.Tensor) -> None:
        self.ids = ids
        with torch.no_grad():
            self.cache = cache_kwarg(model, model(input_ids=ids, use_cache=True))


def _shot_ids(model: nn.Module, tokenizer: Any) -> torch.Tensor:
    """:data:`SHOTS` tokenized (with the tokenizer's BOS, if it adds one), ``(1, L)`` on the model's input device."""
    return tokenizer(SHOTS, return_tensors="pt")["input_ids"].to(model.get_input_embeddings().weight.device)


def _shots_cache(model: nn.Module, tokenizer: Any) -> _Prefix:
    return _Prefix(model, _shot_ids(model, tokenizer))


def _expanded(prefix: _Prefix, rows: int) -> dict[str, Any]:
    """A copy of the prefix's cache for ``rows`` rows."""
    cache = copy.deepcopy(prefix.cache)
    next(iter(cache.values())).batch_repeat_interleave(rows)
    return cache


def draw(probs: torch.Tensor, top_p: float, uniforms: torch.Tensor) -> torch.Tensor:
    """Nucleus sampling by inversion, row by row of ``probs`` ``(R, vocab)``: the smallest set of
    most probable tokens whose mass reaches ``top_p`` (at least one), renormalised, and the token
    where its cumulative mass passes the row's ``uniforms`` entry (in [0, 1)). Returns ``(R,)`` ids."""
    ordered, index = torch.sort(probs.double(), dim=-1, descending=True)
    mass = torch.cumsum(ordered, -1)
    kept = ((mass - ordered) < top_p).sum(-1, keepdim=True)  # tokens before which the mass is under top_p
    mass = mass / mass.gather(-1, kept - 1)
    picked = torch.minimum((mass <= uniforms.double()[:, None]).sum(-1, keepdim=True), kept - 1)
    return index.gather(-1, picked).squeeze(-1)


@torch.no_grad()
def sample(
    model: nn.Module, tokenizer: Any, prefix: _Prefix, queries: Sequence[str], seeds: Sequence[int], *,
    samples: int, temperature: float, top_p: float, max_new_tokens: int,
) -> list[str]:
    """``samples`` continuations of ``prefix`` + each query (query-major: ``seeds[q * samples + k]``
    seeds sample ``k`` of query ``q``), each until its first newline, the end of text or
    ``max_new_tokens``; decoded without special tokens."""
    device = prefix.ids.device
    encoded = [tokenizer(q, add_special_tokens=False)["input_ids"] for q in queries]
    width, base = max(len(e) for e in encoded), prefix.ids.shape[1]
    ids = torch.tensor([[0] * (width - len(e)) + e for e in encoded], device=device)
    mask = torch.tensor([[1] * base + [0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
    lengths = torch.tensor([base + len(e) for e in encoded], device=device)
    positions = (lengths[:, None] - width + torch.arange(width, device=device)).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **_expanded(prefix, len(queries)))
    cache = cache_kwarg(model, out)
    next(iter(cache.values())).batch_repeat_interleave(samples)
    logits = out.logits[:, -1].repeat_interleave(samples, 0)
    mask, lengths = mask.repeat_interleave(samples, 0), lengths.repeat_interleave(samples, 0)
    generators = [torch.Generator().manual_seed(s % 2**63) for s in seeds]
    stop = {tokenizer.eos_token_id, pad_id_of(tokenizer)} - {None}
    rows = len(seeds)
    made: list[list[int]] = [[] for _ in range(rows)]
    live = [True] * rows
    for step in range(max_new_tokens):
        probs = torch.softmax(logits.float() / temperature, -1).cpu()
        uniforms = torch.stack([torch.rand((), generator=g) for g in generators])
        chosen = draw(probs, top_p, uniforms).tolist()
        for r, token in enumerate(chosen):
            if live[r]:
                made[r].append(token)
                live[r] = token not in stop and not ends_line(tokenizer, token)
        if not any(live) or step == max_new_tokens - 1:
            break
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), 1)
        out = model(input_ids=torch.tensor(chosen, device=device)[:, None], attention_mask=mask,
                    position_ids=(lengths + step)[:, None], use_cache=True, **cache)
        cache = cache_kwarg(model, out)
        logits = out.logits[:, -1]
    return [tokenizer.decode(m, skip_special_tokens=True) for m in made]
