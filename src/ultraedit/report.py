"""What a turn produces before and after it is committed, and the checks a turn's input passes
before anything is computed (pre-tokenized minibatches: keys, shapes, ids, targets)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .core.batching import BATCH_KEYS, IGNORE, SUBJECT_INDEX, EditError, EditRequest
from .core.capture import MinibatchCapture
from .core.normalizer import LifelongNormalizer


@dataclass
class TurnReport:
    """What one turn did.

    Attributes:
        turn: 1-based number of this turn in the editor's lifetime.
        requests: edit requests (sequences) in the turn.
        rows: target-token rows captured per module (equal for all modules).
        shift_norms: Frobenius norm of each module's weight shift ``dW`` (intended).
        applied_norms: Frobenius norm of what the weights actually changed by (``W_after -
            W_before``, float32), after rounding to the weights' dtype.
        applied_fractions: how much of the intended shift the weights received: the projection
            ``<W_after - W_before, dW> / ||dW||^2`` (1.0 = all of it; bf16 weights that round a
            small shift away give ~0). Filled by :meth:`UltraEditor.commit`.
        loss: mean over minibatches of the pre-edit loss (mean CE over target tokens).
        seconds: wall-clock time of the turn; ``capture_seconds`` (first capture) and ``solve_seconds`` split it.
        order: the request index of each sequence, in minibatch order.
        steps: closed-form steps taken (1 unless ``EditConfig.refine``).
        paraphrases: rewordings edited with the requests (``EditConfig.paraphrases``).
        stages: what stages say of the turn, by stage name (the damage guard: its verdict).
    """

    turn: int
    requests: int
    rows: dict[str, int]
    shift_norms: dict[str, float]
    loss: float
    seconds: float
    capture_seconds: float = 0.0
    solve_seconds: float = 0.0
    order: list[int] = field(default_factory=list)
    steps: int = 1
    paraphrases: int = 0
    applied_norms: dict[str, float] = field(default_factory=dict)
    applied_fractions: dict[str, float] = field(default_factory=dict)
    stages: dict[str, Any] = field(default_factory=dict)


@dataclass
class PendingTurn:
    """Everything a turn will change, computed but not yet applied."""

    shifts: dict[str, torch.Tensor]  # name -> dW (d_in, d_out): float32 where it accumulates, else the weight's dtype
    normalizers: dict[tuple[int, int], LifelongNormalizer]
    report: TurnReport
    requests: Sequence[EditRequest] | None = None  # text requests (set by edit), for the edit log
    generation: int = 0  # the editor state it was prepared on (UltraEditor.generation)
    stages: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # stage states after the turn


def validate_batches(
    batches: Sequence[dict[str, torch.Tensor]], order: Sequence[int] | None, vocab: int, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """The minibatches as long tensors on ``device``; :class:`EditError` naming the minibatch, request
    and key for the first thing wrong."""
    if not batches:
        raise EditError("a turn needs at least one minibatch")
    out = []
    seq = 0
    for b, batch in enumerate(batches):
        tensors = _checked(b, batch, vocab)
        targets = tensors["labels"] != IGNORE
        for row in range(targets.shape[0]):
            if not bool(targets[row].any()):
                who = f"request {order[seq + row]}" if order is not None else f"row {row}"
                raise EditError(f"minibatch {b}, {who}: empty target (no label other than -100)")
        if SUBJECT_INDEX in batch:
            tensors[SUBJECT_INDEX] = _subject_index(b, batch[SUBJECT_INDEX], tensors["attention_mask"])
        seq += targets.shape[0]
        out.append({k: t.to(device=device, dtype=torch.long) for k, t in tensors.items()})
    return out


def _checked(b: int, batch: object, vocab: int) -> dict[str, torch.Tensor]:
    if not isinstance(batch, dict):
        raise EditError(f"minibatch {b}: expected a dict with keys {BATCH_KEYS}, got {type(batch).__name__}")
    missing = [k for k in BATCH_KEYS if k not in batch]
    extra = [k for k in batch if k not in BATCH_KEYS and k != SUBJECT_INDEX]
    if missing or extra:
        raise EditError(
            f"minibatch {b}: keys must be {list(BATCH_KEYS)} (and optionally {SUBJECT_INDEX!r}); "
            f"missing {missing}, unexpected {extra}"
        )
    tensors = {k: torch.as_tensor(batch[k]) for k in BATCH_KEYS}
    shape = tensors["input_ids"].shape
    for k, t in tensors.items():
        if t.ndim != 2 or t.shape != shape:
            raise EditError(f"minibatch {b}: '{k}' has shape {tuple(t.shape)}, expected 2-D {tuple(shape)} like 'input_ids'")
        if t.is_floating_point() or t.is_complex():
            raise EditError(f"minibatch {b}: '{k}' must be an integer tensor, got {t.dtype}")
    ids, mask, labels = tensors["input_ids"], tensors["attention_mask"], tensors["labels"]
    if shape[0] == 0 or shape[1] == 0:
        raise EditError(f"minibatch {b}: 'input_ids' is empty, shape {tuple(shape)}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise EditError(f"minibatch {b}: 'input_ids' has ids outside the vocabulary [0, {vocab})")
    targets = labels != IGNORE
    if bool((targets & (mask == 0)).any()):
        raise EditError(f"minibatch {b}: 'labels' has targets at padded positions (attention_mask 0)")
    if bool(((labels < 0) & targets).any()) or int(labels.max()) >= vocab:
        raise EditError(f"minibatch {b}: 'labels' must be -100 or token ids in [0, {vocab})")
    return tensors


def _subject_index(b: int, value: object, mask: torch.Tensor) -> torch.Tensor:
    """A minibatch's optional ``subject_index``: ``(B,)`` integers, -1 or an attended column."""
    index = torch.as_tensor(value)
    if index.shape != mask.shape[:1] or index.is_floating_point() or index.is_complex():
        raise EditError(f"minibatch {b}: '{SUBJECT_INDEX}' must be {mask.shape[0]} integers, got {tuple(index.shape)} "
                        f"{index.dtype}")
    length = mask.ne(0).sum(1)
    if bool(((index < -1) | (index >= length)).any()):
        raise EditError(f"minibatch {b}: '{SUBJECT_INDEX}' must be -1 or a position inside its sequence")
    return index


def check_finite(captures: Sequence[MinibatchCapture], names: Sequence[str], order: Sequence[int] | None,
                 sizes: Sequence[int]) -> None:
    """:class:`EditError` naming the module, minibatch and requests of the first non-finite key or gradient."""
    first = 0
    for b, (mb, size) in enumerate(zip(captures, sizes)):
        for name in names:
            for kind, rows in (("keys", mb.keys[name]), ("gradients", mb.grads[name])):
                if not bool(torch.isfinite(rows).all()):
                    who = f"requests {sorted(order[first : first + size])}" if order is not None else f"rows 0..{size - 1}"
                    raise EditError(f"non-finite {kind} at module {name!r} in minibatch {b} ({who}); nothing was applied")
        first += size


def applied(weight: torch.Tensor, new: torch.Tensor, shift: torch.Tensor) -> tuple[float, float]:
    """``(||new - weight||, <new - weight, shift> / ||shift||^2)`` in float32."""
    change = new.float() - weight.float()
    intended = shift.float()
    squared = float(intended.square().sum())
    fraction = float((change * intended).sum()) / squared if squared > 0 else 1.0
    return float(torch.linalg.vector_norm(change)), fraction
