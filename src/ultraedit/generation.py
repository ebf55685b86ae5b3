"""Judging edits by what the model says: greedy generation, the stop rule and answer matching.

Teacher forcing (:mod:`ultraedit.evaluation`) hands the model the answer's length and every
earlier token; a user reads what it generates. Here each prompt is rendered in a context
(:mod:`ultraedit.contexts`), continued greedily (batched, left-padded, with the KV cache) until
the first sentence end (``.``, ``!`` or ``?`` followed by a space), a newline, an end of sequence
or turn, or ``max_new_tokens`` (50) new tokens, and cut there. The answer then matches the target:

* ``exact``: the normalised generation equals the normalised target;
* ``first_span``: the normalised generation starts with the normalised target (a whole-word
  prefix: a small model often runs on past the answer);
* ``contains``: the normalised target occurs, as whole words, in the normalised generation.

Normalisation is the usual QA one (SQuAD's): lower case, punctuation and the articles a/an/the
removed, white space collapsed. The headline rule of a context (:data:`HEADLINE`) is
``first_span`` for ``plain`` and ``qa`` and ``contains`` for ``chat`` (a chat reply often opens
with a sentence around the answer). Locality by generation compares a locality prompt's
generation with the unedited model's: ``locality_unchanged`` is the share generated identically
(after normalisation), ``locality_kept`` the share of those the unedited model answered right
(by the headline rule) that are still right.
"""

from __future__ import annotations

import inspect
import re
import string
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .contexts import check_contexts, end_of_answer, prompt_ids
from .core.batching import EditRequest, pad_id_of

#: The match rule each context's headline ``efficacy``/``generalization`` use.
HEADLINE: dict[str, str] = {"plain": "first_span", "qa": "first_span", "chat": "contains"}
RULES: tuple[str, ...] = ("exact", "first_span", "contains")
MAX_NEW_TOKENS = 50

_SENTENCE_END = re.compile(r"[.!?](?=\s)|\n")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, white space collapsed (SQuAD's normalisation,
    punctuation read as a word break so that "Jean-Luc" and "Jean Luc" agree)."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def first_sentence(text: str) -> str:
    """``text`` cut at its first sentence end (the mark kept) or newline, stripped."""
    found = _SENTENCE_END.search(text)
    cut = text[: found.start() + (found.group() != "\n")] if found else text
    return cut.strip()


def match(generation: str, target: str, rule: str) -> bool:
    """Whether ``generation`` answers ``target`` by ``rule`` (one of :data:`RULES`), both normalised."""
    gen, tgt = normalize_answer(generation), normalize_answer(target)
    if not tgt:
        return gen == tgt
    if rule == "exact":
        return gen == tgt
    if rule == "first_span":
        return gen == tgt or gen.startswith(tgt + " ")
    if rule == "contains":
        return f" {tgt} " in f" {gen} "
    raise ValueError(f"unknown match rule {rule!r}; known: {RULES}")


def stop_ids(model: nn.Module, tokenizer: Any, context: str) -> set[int]:
    """Token ids that end a generation: the model's and tokenizer's EOS, and in ``chat`` the end of turn."""
    ids: set[int] = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        ids.update(value if isinstance(value, (list, tuple)) else [] if value is None else [value])
    if context == "chat":
        end = list(tokenizer(end_of_answer(tokenizer, context), add_special_tokens=False)["input_ids"])
        if len(end) == 1:
            ids.add(end[0])
    return ids


@torch.no_grad()
def generate_answers(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], context: str = "plain", *,
    max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 64,
) -> list[str]:
    """Greedy answers to ``prompts`` asked in ``context``: each generation's first sentence (see the
    module text), special tokens dropped. Prompts are decoded in batches sorted by length."""
    encoded = [prompt_ids(tokenizer, p, context) for p in prompts]
    stops = stop_ids(model, tokenizer, context)
    out = [""] * len(prompts)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            for i, new in zip(idx, _greedy(model, tokenizer, [encoded[i] for i in idx], stops, max_new_tokens)):
                out[i] = first_sentence(tokenizer.decode(new, skip_special_tokens=True))
    finally:
        model.train(training)
    return out


def _greedy(model: nn.Module, tokenizer: Any, rows: list[list[int]], stops: set[int], max_new_tokens: int) -> list[list[int]]:
    """Greedy new tokens of left-padded ``rows`` with the KV cache; a row leaves the batch (and the
    cache) when it ends: a stop token (not kept), or a sentence end or newline in its new text."""
    from transformers import DynamicCache

    device = model.get_input_embeddings().weight.device
    width = max(map(len, rows))
    pad = pad_id_of(tokenizer)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    given = {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}
    new: list[list[int]] = [[] for _ in rows]
    live = list(range(len(rows)))
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **given).logits[:, -1]
    for _ in range(max_new_tokens):
        tokens = logits.argmax(-1).tolist()
        keep = []
        for slot, (row, token) in enumerate(zip(live, tokens)):
            if token in stops:
                continue
            new[row].append(token)
            if not _SENTENCE_END.search(tokenizer.decode(new[row], skip_special_tokens=True)):
                keep.append(slot)
        if not keep:
            break
        if len(keep) < len(live):
            chosen = torch.tensor(keep, device=device)
            cache.batch_select_indices(chosen)
            mask, positions = mask[chosen], positions[chosen]
            live = [live[k] for k in keep]
            tokens = [tokens[k] for k in keep]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], 1)
        positions = positions[:, -1:] + 1
        logits = model(input_ids=torch.tensor(tokens, device=device)[:, None], attention_mask=mask,
                       position_ids=positions, use_cache=True, **given).logits[:, -1]
    return new


# --------------------------------------------------------------------------- scoring requests
@dataclass
class GenerationTotals:
    """Running sums of one context's generation scores over requests (means per request, then over
    requests, like the teacher-forced metrics)."""

    context: str
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    judged: bool = False

    def add(self, name: str, values: Sequence[float]) -> None:
        if values:
            self.sums[name] = self.sums.get(name, 0.0) + sum(values) / len(values)
            self.counts[name] = self.counts.get(name, 0) + 1

    def merge(self, other: "GenerationTotals") -> None:
        """Fold ``other`` (the same context, other requests) into these sums."""
        for name, value in other.sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + other.counts[name]
        self.judged = self.judged or other.judged

    def mean(self, name: str) -> float | None:
        return self.sums[name] / self.counts[name] if self.counts.get(name) else None

    def as_dict(self) -> dict[str, Any]:
        """The ``generation[context]`` object of ``results.json``."""
        rule = HEADLINE[self.context]
        out: dict[str, Any] = {
            "efficacy": self.mean(f"efficacy_{rule}"), "generalization": self.mean(f"generalization_{rule}"),
            "locality_unchanged": self.mean("locality_unchanged"), "locality_kept": self.mean("locality_kept"),
            "rule": rule,
        }
        for r in RULES:
            out[r] = {"efficacy": self.mean(f"efficacy_{r}"), "generalization": self.mean(f"generalization_{r}")}
        if self.judged:
            out["judge"] = {"efficacy": self.mean("efficacy_judge"), "generalization": self.mean("generalization_judge")}
        out["counts"] = {k: v for k, v in self.counts.items() if k.endswith(("_exact", "unchanged", "kept"))}
        return out


def request_prompts(requests: Sequence[EditRequest]) -> tuple[list[str], list[tuple[str, int, int]]]:
    """Every prompt to generate from for ``requests`` (edit prompt, rephrases, locality prompts) and,
    per request and group, ``(group, start, stop)`` spans into that list."""
    prompts: list[str] = []
    spans: list[tuple[str, int, int]] = []
    for request in requests:
        for group, items in (("efficacy", [request.prompt]), ("generalization", list(request.rephrases)),
                             ("locality", [p for p, _ in request.locality])):
            spans.append((group, len(prompts), len(prompts) + len(items)))
            prompts.extend(items)
    return prompts, spans


def score_generations(
    totals: GenerationTotals, requests: Sequence[EditRequest], texts: Sequence[str],
    reference: Sequence[str] | None = None, judged: Sequence[bool | None] | None = None,
) -> None:
    """Add ``requests``' scores to ``totals`` from ``texts`` (what :func:`generate_answers` said for
    :func:`request_prompts`' list); ``reference``: the unedited model's texts of the same list;
    ``judged``: a judge's verdicts on the same list (``None`` where it gave none)."""
    _, spans = request_prompts(requests)
    rule = HEADLINE[totals.context]
    for k, request in enumerate(requests):
        for group, a, b in spans[3 * k : 3 * k + 3]:
            if group == "locality":
                if reference is not None:
                    answers = [ans for _, ans in request.locality]
                    totals.add("locality_unchanged", [float(normalize_answer(texts[i]) == normalize_answer(reference[i]))
                                                      for i in range(a, b)])
                    known = [i for i, ans in zip(range(a, b), answers) if match(reference[i], ans, rule)]
                    totals.add("locality_kept", [float(match(texts[i], answers[i - a], rule)) for i in known])
                continue
            for r in RULES:
                totals.add(f"{group}_{r}", [float(match(texts[i], request.target, r)) for i in range(a, b)])
            if judged is not None:
                verdicts = [float(v) for v in judged[a:b] if v is not None]
                totals.judged = True
                totals.add(f"{group}_judge", verdicts)


def evaluate_generation(
    model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], contexts: Sequence[str], *,
    reference: dict[str, Sequence[str]] | None = None, batch_size: int = 64, judge: Any = None,
) -> tuple[dict[str, GenerationTotals], dict[str, list[str]]]:
    """Generate and score ``requests`` in each of ``contexts``.

    Returns:
        ``(totals, texts)``: per context its :class:`GenerationTotals` and the generated texts (in
        :func:`request_prompts` order; pass them as ``reference`` when scoring the edited model).
    """
    contexts = check_contexts(list(contexts), tokenizer)
    prompts, _ = request_prompts(requests)
    totals, texts = {}, {}
    for context in contexts:
        said = generate_answers(model, tokenizer, prompts, context, batch_size=batch_size)
        judged = judge.grade_requests(requests, said) if judge is not None else None
        totals[context] = GenerationTotals(context)
        score_generations(totals[context], requests, said, None if reference is None else reference[context], judged)
        texts[context] = said
    return totals, texts


__all__ = ["HEADLINE", "MAX_NEW_TOKENS", "RULES", "GenerationTotals", "evaluate_generation", "first_sentence",
           "generate_answers", "match", "normalize_answer", "request_prompts", "score_generations", "stop_ids"]
