"""Scoring prompt/answer pairs as the authors do (teacher-forced token accuracy), and the benchmark's metrics.

For one pair, the accuracy is the fraction of answer tokens where ``argmax(logits)`` equals the
label, with the same teacher-forced tokenization as editing (``batching.tokenize_pair``).
Efficacy, generalization and specificity are means of this score over edit prompts, rephrases and
locality prompts. Forwards are batched, sorted by length to keep padding small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from .core.batching import IGNORE, EditError, EditRequest, collate, pad_id_of, teacher_forced_ids
from .core.capture import TargetHead


@torch.no_grad()
def score_pairs(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 64,
) -> dict[str, list[float]]:
    """Teacher-forced scores of ``(prompt, answer)`` pairs.

    Returns:
        ``{"accuracy": [...], "logprob": [...]}`` per pair, in input order: token accuracy in
        [0, 1] and the summed log-probability (nats) of the answer tokens.
    """
    scores = teacher_forced(model, tokenizer, pairs, batch_size=batch_size)
    return {"accuracy": scores.accuracy, "logprob": scores.logprob}


# --------------------------------------------------------------------------- benchmark metrics
#
# The authors' metrics and two stricter columns, all from ONE teacher-forced forward per pair:
#
# * token accuracy (ES / GS / LS): fraction of answer tokens where argmax(logits) == label;
# * generation exact match: greedy decoding of ``len(answer tokens)`` tokens from the prompt
#   reproduces the answer tokens. Greedy step k conditions on the k-1 tokens generated before it;
#   while those equal the answer's tokens its context IS the teacher-forced context, so the greedy
#   output equals the answer iff every teacher-forced argmax is right. Exact match is therefore
#   ``accuracy == 1`` of the same forward (``greedy_decode`` is the literal loop; the tests check
#   that both agree);
# * locality vs the unedited model: the fraction of answer positions of a locality pair where the
#   edited model's argmax equals the unedited model's argmax (EasyEdit's locality), which does not
#   depend on whether the dataset's locality answer is one the base model knows.


#: Metric groups of a request: name -> where its (prompt, answer) pairs come from.
#: ``personas`` and ``multi_hop`` exist for WikiBigEdit (``EditRequest.extra``).
GROUPS: tuple[str, ...] = ("efficacy", "generalization", "specificity", "personas", "multi_hop")
_EXTRA_GROUPS = {"personas": "personas", "multi_hop": "mhop"}


def tokenize_pairs(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Batched :func:`batching.tokenize_pair`: same ``(input_ids, labels)`` per pair, two tokenizer calls.

    Raises:
        EditError: naming the pair index, if a prompt or an answer tokenizes to no tokens.
    """
    if not pairs:
        return []
    prompts = list(tokenizer([p for p, _ in pairs])["input_ids"])
    answers = list(tokenizer([" " + a for _, a in pairs], add_special_tokens=False)["input_ids"])
    out = []
    for i, (p_ids, a_ids) in enumerate(zip(prompts, answers)):
        try:
            out.append(teacher_forced_ids(list(p_ids), list(a_ids), *pairs[i], answer_field="answer"))
        except EditError as err:
            raise EditError(f"pair {i}: {err}") from None
    return out


@dataclass
class PairScores:
    """Teacher-forced results of ``n`` prompt/answer pairs, in input order.

    Attributes:
        accuracy: token accuracy in [0, 1] per pair.
        exact: 1.0 if greedy decoding reproduces every answer token, else 0.0.
        logprob: summed log-probability (nats) of the answer tokens.
        predictions: argmax token ids at the answer positions (as many as answer tokens).
        answers: the answer token ids (the labels the predictions are scored against).
    """

    accuracy: list[float] = field(default_factory=list)
    exact: list[float] = field(default_factory=list)
    logprob: list[float] = field(default_factory=list)
    predictions: list[tuple[int, ...]] = field(default_factory=list)
    answers: list[tuple[int, ...]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.accuracy)


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Padding-aware batches: indices sorted by length (longest first, stable), cut so that a batch
    has at most ``batch_size`` rows and, if ``max_tokens`` is given, at most ``max_tokens`` padded
    tokens (``rows * longest``; a single longer sequence still gets a batch of its own)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) >= batch_size or (max_tokens and (len(current) + 1) * longest > max_tokens)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@torch.no_grad()
def teacher_forced(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 64,
    max_tokens: int | None = 16384,
    progress: bool = False,
    desc: str = "evaluating",
) -> PairScores:
    """Score ``(prompt, answer)`` pairs with one batched, teacher-forced forward each.

    Sequences are sorted by length and right-padded per batch (see :func:`length_batches`); the
    ``(B, L, V)`` logits of a batch are reduced on the model's device, and only the answer
    positions get a log-softmax.
    """
    encoded = tokenize_pairs(tokenizer, pairs)
    n = len(encoded)
    scores = PairScores([0.0] * n, [0.0] * n, [0.0] * n, [()] * n, [()] * n)
    if not n:
        return scores
    device = model.get_input_embeddings().weight.device
    pad = pad_id_of(tokenizer)
    batches = length_batches([len(ids) for ids, _ in encoded], batch_size, max_tokens)
    training = model.training
    model.eval()
    try:
        bar = _progress(batches, progress, desc, unit="batch")
        with TargetHead(model) as head:  # vocabulary projection at answer positions only
            for idx in bar:
                batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad).items()}
                labels = batch["labels"]
                mask = head.mask = labels != IGNORE
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
                picked = logits[mask] if logits.ndim == 3 else logits  # (T, V), row-major over (B, L)
                gold = labels[mask]
                pred = picked.argmax(-1)
                logp = torch.log_softmax(picked.float(), -1).gather(-1, gold.unsqueeze(-1)).squeeze(-1)
                counts = mask.sum(1).tolist()
                hit = (pred == gold).cpu().split(counts)
                pred_rows = pred.cpu().split(counts)
                gold_rows = gold.cpu().split(counts)
                logp_rows = logp.cpu().split(counts)
                for row, i in enumerate(idx):
                    hits = int(hit[row].sum())
                    scores.accuracy[i] = hits / counts[row]
                    scores.exact[i] = 1.0 if hits == counts[row] else 0.0
                    scores.logprob[i] = float(logp_rows[row].sum())
                    scores.predictions[i] = tuple(pred_rows[row].tolist())
                    scores.answers[i] = tuple(gold_rows[row].tolist())
    finally:
        model.train(training)
    return scores


@torch.no_grad()
def greedy_decode(model: nn.Module, tokenizer: Any, prompt: str, n_tokens: int) -> list[int]:
    """Greedy continuation of ``prompt``: ``n_tokens`` token ids, one full forward per step (a literal,
    unbatched reference for the exact-match column; the benchmark uses :func:`teacher_forced`)."""
    device = model.get_input_embeddings().weight.device
    ids = list(tokenizer(prompt)["input_ids"])
    out: list[int] = []
    training = model.training
    model.eval()
    try:
        for _ in range(n_tokens):
            x = torch.tensor([ids + out], device=device)
            out.append(int(model(input_ids=x, use_cache=False).logits[0, -1].argmax()))
    finally:
        model.train(training)
    return out


def agreement(before: Sequence[int], after: Sequence[int]) -> float:
    """Fraction of positions where two argmax sequences (same pair, before/after editing) agree."""
    if len(before) != len(after) or not before:
        raise ValueError(f"cannot compare predictions of lengths {len(before)} and {len(after)}")
    return sum(a == b for a, b in zip(before, after)) / len(before)


def request_pairs(request: EditRequest, group: str) -> list[tuple[str, str]]:
    """The ``(prompt, answer)`` pairs of one metric group (see :data:`GROUPS`) of a request."""
    if group == "efficacy":
        return [(request.prompt, request.target)]
    if group == "generalization":
        return [(r, request.target) for r in request.rephrases]
    if group == "specificity":
        return [tuple(p) for p in request.locality]  # type: ignore[misc]
    if group in _EXTRA_GROUPS:
        return [tuple(p) for p in request.extra.get(_EXTRA_GROUPS[group], ())]  # type: ignore[misc]
    raise ValueError(f"unknown metric group {group!r}; known: {GROUPS}")


@dataclass
class RequestScores:
    """Per-request scores of a list of requests (``None`` where a request has no pair of a group).

    Attributes:
        accuracy: group -> per request, mean token accuracy over the group's pairs.
        exact: group -> per request, mean generation exact match over the group's pairs.
        locality_predictions: per request, argmax ids of each locality pair (``specificity`` group).
        locality_agreement: per request, mean :func:`agreement` with ``reference`` predictions
            (only when a reference was given).
        locality_known, locality_kept: per request, the locality answer tokens the reference
            (unedited) predictions got right, and how many of those are still right now
            (only when a reference was given); their pooled ratio is ``retention``.
    """

    accuracy: dict[str, list[float | None]]
    exact: dict[str, list[float | None]]
    locality_predictions: list[tuple[tuple[int, ...], ...]]
    locality_agreement: list[float | None] | None = None
    locality_known: list[int] | None = None
    locality_kept: list[int] | None = None


def score_requests(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    *,
    reference: Sequence[Sequence[Sequence[int]]] | None = None,
    batch_size: int = 64,
    max_tokens: int | None = 16384,
    progress: bool = False,
) -> RequestScores:
    """Score every metric group of every request in one batched pass over all their pairs.

    Args:
        reference: per request, the unedited model's locality predictions (as returned in
            ``locality_predictions`` by a call on the unedited model) for ``locality_agreement``.
    """
    if reference is not None and len(reference) != len(requests):
        raise ValueError(f"reference has {len(reference)} entries for {len(requests)} requests")
    pairs: list[tuple[str, str]] = []
    spans: dict[str, list[tuple[int, int]]] = {g: [] for g in GROUPS}
    for request in requests:
        for group in GROUPS:
            items = request_pairs(request, group)
            spans[group].append((len(pairs), len(pairs) + len(items)))
            pairs.extend(items)
    scores = teacher_forced(model, tokenizer, pairs, batch_size=batch_size, max_tokens=max_tokens, progress=progress)

    def mean(values: list[float], a: int, b: int) -> float | None:
        return sum(values[a:b]) / (b - a) if b > a else None

    accuracy = {g: [mean(scores.accuracy, a, b) for a, b in spans[g]] for g in GROUPS}
    exact = {g: [mean(scores.exact, a, b) for a, b in spans[g]] for g in GROUPS}
    predictions = [tuple(scores.predictions[a:b]) for a, b in spans["specificity"]]
    answers = [tuple(scores.answers[a:b]) for a, b in spans["specificity"]]
    if reference is None:
        return RequestScores(accuracy, exact, predictions)
    agree: list[float | None] = []
    known: list[int] = []
    kept: list[int] = []
    for r, (ref, now, gold) in enumerate(zip(reference, predictions, answers)):
        if len(ref) != len(now):
            raise ValueError(f"request {r}: reference has {len(ref)} locality pairs, the request {len(now)}")
        agree.append(sum(agreement(x, y) for x, y in zip(ref, now)) / len(now) if now else None)
        right_before = [(p, g) for x, y, z in zip(ref, now, gold) for b, p, g in zip(x, y, z) if b == g]
        known.append(len(right_before))
        kept.append(sum(p == g for p, g in right_before))
    return RequestScores(accuracy, exact, predictions, agree, known, kept)


class MetricTotals:
    """Running means of request-level scores, fed chunk by chunk (memory independent of request count).

    A group's value is the mean over the requests that have at least one pair of it of their mean
    over those pairs (the authors' per-record averaging). ``retention`` is pooled over tokens: of
    the locality answer tokens the unedited model predicted right, the share still right.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.known_tokens = 0
        self.kept_tokens = 0
        self.retention_scored = False

    def _add(self, name: str, values: Iterable[float | None]) -> None:
        for v in values:
            if v is not None:
                self.sums[name] = self.sums.get(name, 0.0) + v
                self.counts[name] = self.counts.get(name, 0) + 1

    def add(self, scores: RequestScores) -> None:
        for group in GROUPS:
            self._add(group, scores.accuracy[group])
            self._add(f"{group}_exact", scores.exact[group])
        if scores.locality_agreement is not None:
            self._add("locality_vs_unedited", scores.locality_agreement)
        if scores.locality_known is not None and scores.locality_kept is not None:
            self.retention_scored = True
            self.known_tokens += sum(scores.locality_known)
            self.kept_tokens += sum(scores.locality_kept)

    def means(self) -> dict[str, float | None]:
        """Metric name -> mean in [0, 1] (only metrics with at least one request; ``retention`` is
        ``None`` when scored against a reference that got no locality token right)."""
        means: dict[str, float | None] = {k: self.sums[k] / self.counts[k] for k in self.sums}
        if self.retention_scored:
            means["retention"] = self.kept_tokens / self.known_tokens if self.known_tokens else None
        return means

    def as_dict(self) -> dict[str, Any]:
        return {"metrics": self.means(), "counts": dict(self.counts)}


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, lines: Sequence[str], *, lines_per_sequence: int = 4) -> float:
    """``exp`` of the mean next-token negative log-likelihood over every token of ``lines``
    (joined ``lines_per_sequence`` at a time into sequences)."""
    from .core.anatomy import context_length
    from .texts import text_batches

    device = model.get_input_embeddings().weight.device
    total, count = 0.0, 0
    training = model.training
    model.eval()
    try:
        for batch in text_batches(tokenizer, list(lines), lines_per_sequence=lines_per_sequence,
                                  max_tokens=context_length(model)):
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
            total += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="sum"))
            count += int((labels != IGNORE).sum())
    finally:
        model.train(training)
    return math.exp(total / count)


def _progress(items: Sequence[Any], enabled: bool, desc: str, unit: str) -> Iterator[Any] | Sequence[Any]:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, leave=False)


__all__ = [
    "GROUPS",
    "MetricTotals",
    "PairScores",
    "RequestScores",
    "agreement",
    "greedy_decode",
    "length_batches",
    "perplexity",
    "request_pairs",
    "score_pairs",
    "score_requests",
    "teacher_forced",
    "tokenize_pairs",
]
