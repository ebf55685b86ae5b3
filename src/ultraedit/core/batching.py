"""Edit requests and their teacher-forced tokenization (method page, "Tokenization of one request").

    input  = tokens(prompt) ++ tokens(" " + target)[:-1]
    labels = [-100] * (len(tokens(prompt)) - 1) ++ tokens(" " + target)

Label position ``i`` is the token the logits at position ``i`` must predict (no further shift), and
only target tokens carry a label. Minibatches are right-padded (labels with -100, mask with 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

IGNORE = -100
BATCH_KEYS = ("input_ids", "attention_mask", "labels")
SUBJECT_INDEX = "subject_index"  # optional batch entry, (B,): each sequence's subject position, -1 for none
#: ``EditRequest.extra`` key: the prompt is already rendered with its special tokens (e.g. through a
#: chat template) and the target follows it as written (no space, no special tokens added).
RENDERED = "rendered"


class EditError(ValueError):
    """Raised for invalid edits; the model and the editor state are left as they were."""


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into the model.

    Attributes:
        prompt: text the model continues, e.g. ``"The capital of France is"``.
        target: the new answer, e.g. ``"Lyon"`` (tokenized with a leading space).
        rephrases: other wordings of the prompt (scored for generalization, not edited).
        locality: ``(prompt, answer)`` pairs unrelated to the edit (scored for specificity).
        id: optional identifier carried into logs and reports.
    """

    prompt: str
    target: str
    rephrases: tuple[str, ...] = ()
    locality: tuple[tuple[str, str], ...] = ()
    id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def tokenize_pair(tokenizer: Any, prompt: str, answer: str, rendered: bool = False) -> tuple[list[int], list[int]]:
    """Teacher-forced ``(input_ids, labels)`` for one prompt/answer pair (equal lengths).

    The prompt is tokenized with the tokenizer's special tokens (e.g. BOS), the answer as
    ``" " + answer`` without them; a ``rendered`` prompt (see :data:`RENDERED`) gets no special
    tokens added and its answer no space. Raises :class:`EditError` if either is empty.
    """
    prompt_ids = list(tokenizer(prompt, add_special_tokens=not rendered)["input_ids"])
    answer_ids = list(tokenizer(answer if rendered else " " + answer, add_special_tokens=False)["input_ids"])
    return teacher_forced_ids(prompt_ids, answer_ids, prompt, answer)


def is_rendered(request: EditRequest) -> bool:
    return bool(request.extra.get(RENDERED)) if request.extra else False


def teacher_forced_ids(
    prompt_ids: list[int], answer_ids: list[int], prompt: str, answer: str, answer_field: str = "target"
) -> tuple[list[int], list[int]]:
    """The method's layout of a tokenized pair: ``input = prompt ++ answer[:-1]``,
    ``labels = [-100] * (len(prompt) - 1) ++ answer``. Raises :class:`EditError` (naming the
    prompt or the ``answer_field``) if either has no tokens."""
    if not prompt_ids:
        raise EditError(f"prompt {prompt!r} tokenizes to no tokens")
    if not answer_ids:
        raise EditError(f"{answer_field} {answer!r} tokenizes to no tokens")
    return prompt_ids + answer_ids[:-1], [IGNORE] * (len(prompt_ids) - 1) + answer_ids


def subject_of(request: EditRequest) -> str | None:
    """The request's subject (``extra["subject"]``) when it occurs in the prompt, else ``None``."""
    subject = request.extra.get("subject") if request.extra else None
    if isinstance(subject, str) and subject.strip() and subject in request.prompt:
        return subject
    return None


def subject_position(tokenizer: Any, prompt: str, subject: str, rendered: bool = False) -> int:
    """Index of the last token of ``subject``'s first occurrence in the tokenized ``prompt`` (as
    :func:`tokenize_pair` tokenizes it: special tokens included), or -1 when it is the prompt's
    last token (already a captured position) or cannot be located. ROME/MEMIT's key position."""
    start = prompt.find(subject)
    if start < 0 or not subject:
        return -1
    end = start + len(subject)
    try:
        encoded = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=not rendered)
        spans = encoded["offset_mapping"]
        inside = [i for i, (a, b) in enumerate(spans) if b > a and a < end]
        position = inside[-1] if inside else -1
        count = len(encoded["input_ids"])
    except (NotImplementedError, TypeError, ValueError, KeyError):  # a slow tokenizer has no offsets
        count = len(tokenizer(prompt, add_special_tokens=not rendered)["input_ids"])
        position = len(tokenizer(prompt[:end], add_special_tokens=not rendered)["input_ids"]) - 1
    return position if 0 <= position < count - 1 else -1


def pad_id_of(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def collate(
    examples: Sequence[tuple[list[int], list[int]]], pad_id: int, length: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad ``(input_ids, labels)`` examples into one minibatch dict of ``(B, L)`` tensors."""
    length = length or max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, : len(labs)] = torch.tensor(labs, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def minibatches(
    tokenizer: Any, requests: Sequence[EditRequest], batch_size: int, subjects: bool = False
) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """Tokenize a turn's requests and cut them into minibatches the authors' way.

    Requests are sorted by tokenized length (prompt + target tokens), longest first (stable for
    ties), then cut into minibatches of ``batch_size`` in that order. With ``subjects`` each
    minibatch also has ``subject_index`` (:func:`subject_position` of ``extra["subject"]``, -1
    where a request has none).

    Returns:
        ``(batches, order)`` where ``order[i]`` is the index into ``requests`` of the i-th
        sequence across the batches.
    """
    encoded = []
    for index, request in enumerate(requests):
        if not isinstance(request, EditRequest):
            raise EditError(f"request {index}: expected an EditRequest, got {type(request).__name__}")
        try:
            encoded.append(tokenize_pair(tokenizer, request.prompt, request.target, is_rendered(request)))
        except EditError as err:
            raise EditError(f"request {index} (id={request.id!r}): {err}") from None
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + 1, reverse=True)
    pad = pad_id_of(tokenizer)
    batches = [
        collate([encoded[i] for i in order[start : start + batch_size]], pad)
        for start in range(0, len(order), batch_size)
    ]
    if subjects:
        positions = [
            subject_position(tokenizer, r.prompt, subject, is_rendered(r)) if (subject := subject_of(r)) else -1
            for r in requests
        ]
        for start, batch in zip(range(0, len(order), batch_size), batches):
            batch[SUBJECT_INDEX] = torch.tensor([positions[i] for i in order[start : start + batch_size]])
    return batches, order

