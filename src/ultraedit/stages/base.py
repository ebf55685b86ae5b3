"""What a stage is: one option beyond the paper, with its sub-config and a few named hooks.

The editor runs a turn as the method page states it (:mod:`ultraedit.core.turn`) and calls each
configured stage at fixed points, in a fixed order (:data:`ultraedit.stages.ORDER`):

==================  =======================================================================
hook                when, and what it may change
==================  =======================================================================
``check``           at construction: why the stage cannot apply to these edit modules (or None)
``adapt``           for a named configuration: the part of the stage that applies (default: all or none)
``setup``           at construction, on the unedited model (statistics it needs for every turn)
``ready``           before a turn does any work: raise :class:`EditError` if the stage cannot run
``expand``          a text turn's requests -> more prompts to edit with each (same target)
``contexts``        the turn's text sequences -> the sequences it edits (e.g. also through a template)
``begin``           after the turn's capture, before any solve (per-turn terms, searches)
``ridge``           a ``(modules, d_in, d_in)`` term added to the ridge ``lambda I``
``values``          the target values ``V`` of the rows edited at this step
``offset``          ``u``: the solve becomes ``(K^T K + A) dW = K^T V + A u`` (``A``: the ridge)
``vet``             the turn's shift, tried on the model before it is committed, kept or shrunk
``after``           the stage's state after the turn (committed with it): ``state_dict`` form
``report``          what the stage says of the turn (``TurnReport.stages``)
==================  =======================================================================

A stage with state across turns (the key memory) saves it through ``state_dict`` /
``load_state_dict``; it travels with the editor's snapshot (undo, the server's rollback) and its
saved state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, ContextManager, Sequence

import torch
from torch import nn

from ..core.batching import EditRequest
from ..core.capture import MinibatchCapture
from ..core.normalizer import LifelongNormalizer


@dataclass
class Turn:
    """What the stages see of one turn.

    Attributes:
        model, tokenizer, modules: the editor's.
        dtype: the dtype of statistics and solves.
        base: the unedited weight of an edit module (weight layout, on the CPU).
        requests: the turn's text requests (``None`` for pre-tokenized turns).
        batches: the validated minibatches, on the model's device.
        captures: the turn's capture on the unedited model (one per minibatch).
        normalizers: the statistics with this turn's rows folded in.
        scratch: per stage name, what its ``begin`` computed for its later hooks.
    """

    model: nn.Module
    tokenizer: Any
    modules: dict[str, nn.Module]
    dtype: torch.dtype
    base: Callable[[str], torch.Tensor]
    requests: Sequence[EditRequest] | None
    batches: list[dict[str, torch.Tensor]]
    captures: list[MinibatchCapture]
    normalizers: dict[tuple[int, int], LifelongNormalizer]
    scratch: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rows:
    """The rows of the modules of one shape at one step of a turn.

    Attributes:
        group: the modules (names), solved together.
        keys: ``(modules, rows, d_in)``, every row captured at this step.
        subject: ``(rows,)`` bool: the rows at a subject position (the rest are target tokens).
        selected: ``(rows,)`` bool: the rows edited at this step (``None``: all; refinement leaves
            the requests already right out, their rows preserved with value 0).
        step: 0 for the turn's first closed-form step.
    """

    group: list[str]
    keys: torch.Tensor
    subject: torch.Tensor
    selected: torch.Tensor | None = None
    step: int = 0

    def edited(self, mask: torch.Tensor) -> torch.Tensor:
        """``mask`` (``(..., rows)``) restricted to the rows edited at this step."""
        return mask if self.selected is None else mask[..., self.selected.to(mask.device)]


class Stage:
    """Base class: every hook does nothing. ``name`` is the stage's field in :class:`ultraedit.EditConfig`."""

    name: ClassVar[str] = ""
    #: the stage needs each text request's subject position in its minibatch (``subject_index``)
    marks_subjects: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        self.config = config

    def check(self, model: nn.Module, modules: dict[str, nn.Module]) -> str | None:
        return None

    def adapt(self, model: nn.Module, modules: dict[str, nn.Module]) -> tuple[Any, str | None]:
        """For a named configuration: ``(the sub-config that applies to modules on model or None, why
        it changed)``. By default the whole stage is left out when :meth:`check` finds a reason."""
        reason = self.check(model, modules)
        return (self.config, None) if reason is None else (None, f"left out the {self.name} stage: {reason}")

    def setup(self, model: nn.Module, tokenizer: Any, modules: dict[str, nn.Module], dtype: torch.dtype) -> None:
        return None

    def ready(self) -> None:
        return None

    def expand(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest]) -> list[list[str]] | None:
        return None

    def contexts(self, tokenizer: Any, sequences: Sequence[EditRequest]) -> tuple[list[EditRequest], list[int]] | None:
        """``(sequences, source)``: what the turn edits instead (``source[j]``: the index in ``sequences``
        the j-th comes from), or ``None`` to leave them."""
        return None

    def begin(self, turn: Turn) -> None:
        return None

    def ridge(self, turn: Turn, group: list[str]) -> torch.Tensor | None:
        return None

    def values(self, turn: Turn, rows: Rows, values: torch.Tensor) -> torch.Tensor:
        return values

    def offset(self, turn: Turn, group: list[str], terms: Any) -> torch.Tensor | None:
        return None

    def vet(self, turn: Turn, shifts: dict[str, torch.Tensor],
            trying: Callable[[dict[str, torch.Tensor]], ContextManager[None]]) -> dict[str, torch.Tensor]:
        """``trying(shifts)`` puts the model with ``shifts`` applied in place for its ``with`` block."""
        return shifts

    def after(self, turn: Turn) -> dict[str, torch.Tensor] | None:
        return None

    def report(self, turn: Turn) -> Any:
        return None

    def state_shapes(self, modules: dict[str, nn.Module]) -> dict[str, tuple[int, ...] | None]:
        """The keys and shapes of the stage's state (empty: the stage keeps none; ``None``: any shape)."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        return None


def sub_config(owner: str, kind: type, value: Any) -> Any:
    """``value`` as a ``kind`` sub-config: as is, or built from a dict of its fields (an unknown field is
    refused naming the ones it has)."""
    if not isinstance(value, dict):
        return value
    from dataclasses import fields

    known = {f.name for f in fields(kind)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown EditConfig.{owner} fields: {unknown} (known: {sorted(known)})")
    return kind(**value)


def positive(owner: str, name: str, value: Any, *, zero: bool = False, integer: bool = False) -> None:
    """Refuse a sub-config value that is not a finite number > 0 (``>= 0`` with ``zero``; an int with ``integer``)."""
    import math

    if integer:
        ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if zero else value >= 1)
        kind = "an int >= 0" if zero else "a positive int"
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
            value >= 0 if zero else value > 0)
        kind = "a finite number >= 0" if zero else "a positive finite number"
    if not ok:
        raise ValueError(f"EditConfig.{owner}.{name} must be {kind}, got {value!r}")
