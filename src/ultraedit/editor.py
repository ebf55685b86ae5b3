"""The UltraEdit editor: one turn = capture, lifelong normalization, closed-form solve, apply
(:mod:`ultraedit.core.turn`), with the configured stages (:mod:`ultraedit.stages`) at their hooks.

A turn is atomic: every shift is computed (and checked finite) on copies of the normalizers before
any weight or statistic changes; on any error the model and the editor are exactly as before.
"""

from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .config import EditConfig
from .core.batching import EditError, EditRequest, minibatches
from .core.capture import MinibatchCapture, capture
from .core.presets import resolve_modules
from .core.solver import Preserved, ridge_solve, target_values
from .core.turn import new_normalizers, turn_rows, update_normalizers
from .core.weights import apply_shift, groups, in_out, module_shape, write_weight
from .report import PendingTurn, TurnReport, applied, check_finite, validate_batches
from .session import store
from .session.files import StateError
from .session.identity import hash_diff, mark_applied, refuse
from .session.memory import EditSession, RevertReport, Snapshot, UndoEntry, cpu_copy
from .stages import Rows, Turn, build
from .stages.common import module_scales, with_copies
from .stages.refine import refine

_NARROW = (torch.bfloat16, torch.float16)  # weights whose rounding step can swallow a turn's shift
DELTA_ACCUMULATIONS = ("float32", "weights")
LOST_FRACTION = 0.5  # a turn whose applied shift keeps less than this of the intended one is "mostly lost"


class LostShiftWarning(UserWarning):
    """Most of a turn's weight shift did not reach the (bf16/fp16) weights: it was below their
    rounding step. Only with ``delta_accumulation="weights"``; the default keeps it."""


class UltraEditor:
    """Lifelong UltraEdit editor wrapped around a Hugging Face causal LM.

    Args:
        model: the causal LM to edit in place (CPU or CUDA, any float dtype).
        config: hyperparameters; default :class:`EditConfig`, the authors' method with the family's preset.
        tokenizer: needed by :meth:`edit` (text requests), not by :meth:`edit_tokens`.
        keep_turn_deltas: how many recent turns :meth:`revert_last` can undo (0 = none); each kept
            turn costs one CPU copy of the edit modules' weights in the model dtype.
        delta_accumulation: how shifts reach bf16/fp16 weights. ``"float32"`` (default): the
            cumulative shift ``W - W_base`` is kept in float32 (on the weights' device; twice the bf16
            size of the edit modules) and the weights are rewritten as ``round(W_base + delta)`` each
            turn, so no part of any turn is lost to rounding. ``"weights"``: each turn's shift is
            rounded and added to the weights (a shift below half a rounding step of a weight is lost,
            with a :class:`LostShiftWarning`). float32/float64 weights always take ``W += dW``.

    Attributes:
        modules: edit modules by dotted name, in config order.
        stages: the configured stages (:mod:`ultraedit.stages`), in the order they run.
        normalizers: one :class:`~ultraedit.core.normalizer.LifelongNormalizer` per module shape.
        session: the saved-state bookkeeping (:class:`~ultraedit.session.EditSession`).
        turns, edits: counters over the editor's lifetime.
        generation: changes at every commit and revert; a :class:`PendingTurn` is valid only on
            the generation it was prepared on.
    """

    def __init__(self, model: nn.Module, config: EditConfig | None = None, tokenizer: Any = None, *,
                 keep_turn_deltas: int = 0, delta_accumulation: str = "float32") -> None:
        if delta_accumulation not in DELTA_ACCUMULATIONS:
            raise ValueError(f"delta_accumulation must be 'float32' or 'weights', got {delta_accumulation!r}")
        self.delta_accumulation = delta_accumulation
        self.model = model
        self.config = config = config or EditConfig()
        self.tokenizer = tokenizer
        self.modules = edit_modules(model, config)
        self.groups = groups(self.modules)
        self.stages = build(config)
        for stage in self.stages:  # every check before any model work
            reason = stage.check(model, self.modules)
            if reason is not None:
                raise EditError(f"EditConfig.{stage.name}: {reason}")
        self.normalizers = new_normalizers(self.modules, config.normalizer, config.torch_dtype)
        self.session = EditSession.of(model, self.modules, keep_turn_deltas)
        for stage in self.stages:  # on the unedited model (a resume builds the editor before its shift)
            stage.setup(model, tokenizer, self.modules, config.torch_dtype)
        self.lrs, self.ridge = self._scales()
        self.turns = 0
        self.edits = 0
        self.generation = 0

    # ------------------------------------------------------------------ public API
    def edit(self, requests: Sequence[EditRequest]) -> TurnReport:
        """Apply one turn of text edit requests (:meth:`tokenize`, :meth:`prepare`, :meth:`commit`);
        the report counts the requests given and the rewordings edited with them."""
        batches, order, reworded = self.tokenize(requests)
        pending = self.prepare(batches, order=order, requests=requests)
        pending.requests = requests
        pending.report.requests = len(requests)
        pending.report.paraphrases = reworded
        self.commit(pending)
        return pending.report

    def tokenize(self, requests: Sequence[EditRequest]) -> tuple[list[dict[str, torch.Tensor]], list[int], int]:
        """A text turn's minibatches, the request each sequence comes from (in minibatch order), and how
        many sequences are rewordings. Requests are tokenized with teacher forcing, sorted by length
        (longest first) and cut into minibatches of ``config.capture_batch_size``, as the authors do;
        with ``config.paraphrases`` each request is also edited through the model's own rewordings
        (sampled here, before anything changes)."""
        if self.tokenizer is None:
            raise EditError("UltraEditor.edit needs a tokenizer: UltraEditor(model, config, tokenizer=...)")
        if not requests:
            raise EditError("a turn needs at least one edit request")
        self._ready()
        prompts: list[list[str]] = [[] for _ in requests]
        for stage in self.stages:
            extra = stage.expand(self.model, self.tokenizer, requests)
            if extra is not None:
                prompts = [mine + more for mine, more in zip(prompts, extra)]
        sequences, owners = with_copies(requests, prompts)
        for stage in self.stages:
            rendered = stage.contexts(self.tokenizer, sequences)
            if rendered is not None:
                sequences, owners = rendered[0], [owners[i] for i in rendered[1]]
        subjects = any(stage.marks_subjects for stage in self.stages)
        batches, order = minibatches(self.tokenizer, sequences, self.config.capture_batch_size, subjects=subjects)
        return batches, [owners[i] for i in order], len(sequences) - len(requests)

    def edit_tokens(self, batches: Sequence[dict[str, torch.Tensor]]) -> TurnReport:
        """Apply one turn given pre-tokenized minibatches.

        Args:
            batches: minibatches, each a dict of ``(B, L)`` integer tensors ``input_ids``,
                ``attention_mask`` and ``labels`` (-100 outside target tokens; ``labels[i]`` is the
                token the logits at position ``i`` predict). The normalizer is updated once per
                minibatch, in the order given; the solve uses all rows of the turn. A minibatch may
                also carry ``subject_index`` (``(B,)``, -1 for none): each such position adds a row
                (:func:`ultraedit.core.batching.subject_position` finds it), which the subject stage
                weighs and assigns when configured.
        """
        pending = self.prepare(batches)
        self.commit(pending)
        return pending.report

    def prepare(self, batches: Sequence[dict[str, torch.Tensor]], order: Sequence[int] | None = None,
                requests: Sequence[EditRequest] | None = None) -> PendingTurn:
        """Compute a turn's shifts, statistics and stage states without changing anything."""
        self._ready()
        start = time.perf_counter()
        vocab = self.model.get_input_embeddings().weight.shape[0]
        batches = validate_batches(batches, order, vocab, self._device())
        captures = self._capture(batches, order)
        captured = time.perf_counter()
        normalizers = {shape: norm.clone() for shape, norm in self.normalizers.items()}
        update_normalizers(normalizers, self.modules, captures)  # step 3, on copies
        turn = Turn(self.model, self.tokenizer, self.modules, self.config.torch_dtype, self.session.base.__getitem__,
                    requests, batches, captures, normalizers)
        for stage in self.stages:
            stage.begin(turn)
        shifts, steps = self._steps(turn, order)
        bad = [n for n, m in self.modules.items() if not bool(torch.isfinite(shifts[n].to(m.weight.dtype)).all())]
        if bad:
            raise EditError(f"the weight shift of {bad} is not finite in the weights' dtype (lr too large?); nothing was applied")
        for stage in self.stages:
            shifts = stage.vet(turn, shifts, self._trying)
        done = time.perf_counter()
        count = sum(b["input_ids"].shape[0] for b in batches)
        rows = sum(mb.rows for mb in captures)
        report = TurnReport(
            turn=self.turns + 1, requests=count, rows={n: rows for n in self.modules},
            shift_norms={n: float(torch.linalg.vector_norm(shifts[n], dtype=torch.float32)) for n in self.modules},
            loss=sum(mb.loss for mb in captures) / len(captures), seconds=done - start,
            capture_seconds=captured - start, solve_seconds=done - captured,
            order=list(order) if order is not None else list(range(count)), steps=steps,
            stages={s.name: said for s in self.stages if (said := s.report(turn)) is not None},
        )
        states = {s.name: state for s in self.stages if (state := s.after(turn)) is not None}
        return PendingTurn(shifts, normalizers, report, generation=self.generation, stages=states)

    def commit(self, pending: PendingTurn) -> None:
        """Apply a prepared turn: add every shift to its weight and adopt the new statistics and stage states.

        All or nothing: if writing any module's weight fails (out of memory, a device error), the
        modules already written are restored and the error is raised with the editor unchanged. A
        pending turn is valid only on the exact state it was prepared on: after any other commit or
        a revert since, it raises :class:`EditError` (its statistics would replace newer ones).
        """
        if pending.generation != self.generation:
            raise EditError(
                f"this pending turn was prepared as turn {pending.report.turn}, but the editor is at turn "
                f"{self.turns} and changed since (a turn was committed or reverted); prepare it again")
        before = self.snapshot(cpu=True) if self.session.keep_turn_deltas > 0 else None
        self._write_shifts(pending.shifts, pending.report)
        self.normalizers = pending.normalizers
        for stage in self.stages:
            if stage.name in pending.stages:
                stage.load_state_dict(pending.stages[stage.name])
        self.turns += 1
        self.edits += pending.report.requests
        self.generation += 1
        self._record(pending, before)
        self._warn_if_lost(pending.report)

    def _scales(self) -> tuple[dict[tuple[int, int], float] | None, float]:
        """The step size per module shape (``config.lr_scale``; it depends on the shape and on scales
        measured over all edit modules, so modules of one shape share it) and the ridge
        (``config.ridge_scale``), on the unedited model; no step sizes where they need the tokenizer
        and there is none (a turn is then refused)."""
        config = self.config
        if not config.measured():
            return {shape: config.module_lr(shape) for shape in self.groups}, config.ridge
        if self.tokenizer is None:
            return None, config.ridge
        measured = module_scales(self.model, self.tokenizer, self.modules).values()
        output = sum(out for out, _ in measured) / len(measured)
        keys = sum(key for _, key in measured) / len(measured)
        lrs = {shape: config.module_lr(shape, output if config.lr_scale == "output" else None) for shape in self.groups}
        return lrs, config.ridge * (keys if config.ridge_scale == "keys" else 1.0)

    # ------------------------------------------------------------------ the solve
    def _steps(self, turn: Turn, order: Sequence[int] | None) -> tuple[dict[str, torch.Tensor], int]:
        """The turn's shift (in the dtype :meth:`commit` adds it in) and its number of closed-form steps."""
        preserved = self._preserved(turn)
        config = self.config.refine
        if config is None or config.steps == 1:
            return self._solve(turn, preserved, turn.captures, out_dtype=True), 1
        first = self._solve(turn, preserved, turn.captures)
        saved = self.snapshot(weights_only=True)

        def trial(total: dict[str, torch.Tensor]) -> None:
            for name, module in self.modules.items():
                write_weight(module, saved.weights[name])
                apply_shift(module, total[name])

        def solve(captures: list[MinibatchCapture], rows: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
            return self._solve(turn, preserved, captures, rows, step)

        try:
            total, steps = refine(config, turn.batches, first, solve, lambda: self._capture(turn.batches, order), trial)
        finally:
            self.restore(saved)
        return {n: total[n].to(self._shift_dtype(self.modules[n])) for n in total}, steps

    def _preserved(self, turn: Turn) -> dict[tuple[int, int], Preserved | None]:
        """Per module shape, the stages' ridge terms summed in stage order (``None`` for none): one
        :class:`Preserved` per shape, so refinement steps factor it once."""
        out: dict[tuple[int, int], Preserved | None] = {}
        for shape, group in self.groups.items():
            terms = [t for stage in self.stages if (t := stage.ridge(turn, group)) is not None]
            out[shape] = Preserved(sum(terms[1:], terms[0]), self.ridge) if terms else None
        return out

    def _solve(self, turn: Turn, preserved: dict[tuple[int, int], Preserved | None], captures: list[MinibatchCapture],
               selected: torch.Tensor | None = None, step: int = 0, out_dtype: bool = False) -> dict[str, torch.Tensor]:
        """Steps 4-6 for every module, batched over modules of equal shape (they have the same rows).

        ``selected`` (a bool per captured row) restricts the edit to those rows; the other rows' keys
        are preserved (added to the ridge, as rows whose value is 0). ``out_dtype`` returns each shift
        in the dtype :meth:`commit` adds it in, else in the compute dtype."""
        shifts: dict[str, torch.Tensor] = {}
        subject = torch.cat([mb.subject for mb in captures])  # per row: at a subject position?
        for shape, group in self.groups.items():
            norm = turn.normalizers[shape]
            keys, grads = turn_rows(captures, group, self.config.torch_dtype, norm.device)
            rows = Rows(group, keys, subject.to(keys.device), selected, step)
            kept = None
            if selected is not None:
                sel = selected.to(keys.device)
                keys, grads, kept = keys[:, sel], grads[:, sel], keys[:, ~sel]
            values = target_values(keys, grads, norm, self.lrs[shape])
            for stage in self.stages:
                values = stage.values(turn, rows, values)
            if kept is not None and kept.shape[-2] > 0:  # rows already right: preserved, value 0
                keys = torch.cat((keys, kept), -2)
                values = torch.cat((values, values.new_zeros(*kept.shape[:-1], values.shape[-1])), -2)
            dtypes = {self._shift_dtype(self.modules[n]) for n in group}
            target = dtypes.pop() if out_dtype and len(dtypes) == 1 else None
            shifts.update(zip(group, self._ridge_solve(turn, group, keys, values, preserved[shape], target)))
        return shifts

    def _ridge_solve(self, turn: Turn, group: list[str], keys: torch.Tensor, values: torch.Tensor,
                     terms: Preserved | None, target: torch.dtype | None) -> torch.Tensor:
        """``dW``, with a stage's offset ``u``: ``(K^T K + A) dW = K^T V + A u  <=>  dW = ridge_solve(K, V - K u) + u``."""
        runtime = self.config.runtime
        offsets = [u for stage in self.stages if (u := stage.offset(turn, group, terms)) is not None]
        if not offsets:
            return ridge_solve(keys, values, self.ridge, runtime.solver, target, terms)
        pull = sum(offsets[1:], offsets[0]).to(keys.device, keys.dtype)
        solved = ridge_solve(keys, values - keys @ pull, self.ridge, runtime.solver, None, terms) + pull
        return solved if target is None else solved.to(target)

    @contextmanager
    def _trying(self, shifts: dict[str, torch.Tensor]) -> Iterator[None]:
        """The model with ``shifts`` (in the dtype :meth:`commit` adds them in) written as commit would
        write them, for the ``with`` block; the weights are put back afterwards."""
        saved = self.snapshot(weights_only=True)
        try:
            for name, module in self.modules.items():
                new, _ = self._new_weight(name, module, in_out(module, shifts[name]).to(module.weight.device))
                write_weight(module, new)
            yield
        finally:
            self.restore(saved)

    def _capture(self, batches: list[dict[str, torch.Tensor]], order: Sequence[int] | None) -> list[MinibatchCapture]:
        captures = capture(self.model, self.modules, batches, forward_batch_size=self.config.runtime.forward_batch_size)
        check_finite(captures, list(self.modules), order, [b["input_ids"].shape[0] for b in batches])
        return captures

    # ------------------------------------------------------------------ writing weights
    def accumulates(self, module: nn.Module) -> bool:
        """Whether ``module``'s shifts accumulate in a float32 delta (bf16/fp16 weights, default)."""
        return self.delta_accumulation == "float32" and module.weight.dtype in _NARROW

    def _shift_dtype(self, module: nn.Module) -> torch.dtype:
        return torch.float32 if self.accumulates(module) else module.weight.dtype

    def _new_weight(self, name: str, module: nn.Module, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(new weight, new float32 delta or None)`` for a shift in the weight's layout."""
        weight = module.weight.detach()
        if not self.accumulates(module):
            return weight + shift.to(weight.dtype), None
        delta = self.session.delta.get(name)
        delta = shift.float() if delta is None else delta + shift.float()
        return self._rounded_base_plus(name, delta), delta

    def _rounded_base_plus(self, name: str, delta: torch.Tensor | None) -> torch.Tensor:
        """``round(base + delta)`` in the weight's dtype and device: an accumulating module's weight."""
        weight = self.modules[name].weight
        base = self.session.base[name].to(device=weight.device, non_blocking=True)  # page-locked on a GPU
        return (base.float() + delta if delta is not None else base.float()).to(weight.dtype)

    def _write_shifts(self, shifts: dict[str, torch.Tensor], report: TurnReport) -> None:
        """Write every module's new weight; on any error restore the modules already written.
        Fills ``report.applied_norms``/``applied_fractions``; adopts the new float32 deltas last."""
        written: list[str] = []
        previous: dict[str, torch.Tensor] = {}  # CPU copies, for modules whose old weight cannot be rebuilt
        deltas: dict[str, torch.Tensor] = {}
        try:
            for name, module in self.modules.items():
                weight = module.weight.detach()
                shift = in_out(module, shifts[name]).to(weight.device)
                new, delta = self._new_weight(name, module, shift)
                if not bool(torch.isfinite(new).all()):
                    raise EditError(f"the new weight of {name!r} is not finite in {weight.dtype}; nothing was applied")
                report.applied_norms[name], report.applied_fractions[name] = applied(weight, new, shift)
                if delta is None:  # an accumulating module's old weight is round(base + old delta)
                    previous[name] = weight.to("cpu", copy=True)
                write_weight(module, new)
                written.append(name)
                if delta is not None:
                    deltas[name] = delta
        except BaseException:
            for name in reversed(written):
                old = previous.get(name)
                if old is None:
                    old = self._rounded_base_plus(name, self.session.delta.get(name))
                write_weight(self.modules[name], old.to(self.modules[name].weight.device))
            report.applied_norms.clear()
            report.applied_fractions.clear()
            raise
        self.session.delta.update(deltas)

    def _warn_if_lost(self, report: TurnReport) -> None:
        lost = {n: f for n, f in report.applied_fractions.items() if f < LOST_FRACTION and not self.accumulates(self.modules[n])}
        if lost:
            worst = min(lost, key=lost.__getitem__)
            dtype = str(self.modules[worst].weight.dtype).removeprefix("torch.")
            warnings.warn(
                f"turn {report.turn}: most of the weight shift was lost to {dtype} rounding in {len(lost)} of "
                f"{len(self.modules)} edit modules (worst {worst}: {lost[worst]:.0%} applied); "
                "UltraEditor(..., delta_accumulation='float32'), the default, keeps it",
                LostShiftWarning, stacklevel=3)

    # ------------------------------------------------------------------ state: snapshot, undo, save, load
    def snapshot(self, *, weights_only: bool = False, cpu: bool = False, bookmark: bool = False) -> Snapshot:
        """The editor's state now: weights, float32 deltas, statistics, stage states and counters
        (``weights_only``: the weights alone). ``cpu`` copies everything to the host (the undo
        history); otherwise only the weights are copied: a turn writes weights in place but makes new
        deltas, statistics and stage states, never changing the old ones, so those are shared.
        ``bookmark`` adds the session's bookkeeping (undo history, log position, extra data)."""
        weights = {n: cpu_copy(m.weight) if cpu else m.weight.detach().clone() for n, m in self.modules.items()}
        if weights_only:
            return Snapshot(weights)
        keep = cpu_copy if cpu else (lambda t: t)
        return Snapshot(
            weights=weights,
            deltas={n: keep(d) for n, d in self.session.delta.items()},
            normalizers={s: {k: keep(v) for k, v in nm.state_dict().items()} for s, nm in self.normalizers.items()},
            stages={name: {k: keep(t) for k, t in state.items()} for name, state in self.stage_states().items()},
            turns=self.turns, edits=self.edits,
            bookmark=self.session.bookmark() if bookmark else None,
        )

    def restore(self, snap: Snapshot) -> None:
        """Put the editor back exactly as it was at ``snap`` (a weights-only snapshot: the weights)."""
        for name, module in self.modules.items():
            write_weight(module, snap.weights[name].to(module.weight.device))
        if snap.normalizers is None:
            return
        self.session.delta = {n: d.to(self.modules[n].weight.device) for n, d in snap.deltas.items()}
        for shape, norm in self.normalizers.items():
            norm.load_state_dict(snap.normalizers[shape])
        self._load_stage_states(snap.stages)
        self.turns, self.edits = snap.turns, snap.edits
        if snap.bookmark is not None:
            self.session.rewind(snap.bookmark)
        self.generation += 1  # turns prepared before are stale

    def stage_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each stateful stage's state (the key memory), by stage name."""
        return {s.name: s.state_dict() for s in self.stages if s.state_shapes(self.modules)}

    def _load_stage_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        dtype = self.config.torch_dtype
        for stage in self.stages:
            if stage.name in states:
                stage.load_state_dict({k: t.to(self.modules[k].weight.device, dtype) if k in self.modules else t
                                       for k, t in states[stage.name].items()})

    def _record(self, pending: PendingTurn, before: Snapshot | None) -> None:
        """The session's record of a committed turn: its undo entry and its edit-log record."""
        report, session = pending.report, self.session
        if before is not None:
            session.remember(UndoEntry(self.turns, report.requests, session.log_seq + 1, before))
        record: dict[str, Any] = {"event": "turn", "turn": self.turns, "requests": report.requests,
                                  "edits_total": self.edits}
        if pending.requests is not None:
            record["edits"] = [{"id": r.id, "prompt": r.prompt, "target": r.target} for r in pending.requests]
        record.update(shift_norms=report.shift_norms, applied_norms=report.applied_norms, loss=report.loss,
                      seconds=round(report.seconds, 6))
        if report.stages:
            record["stages"] = report.stages
        session.log(record)

    def revert_last(self, k: int = 1) -> RevertReport:
        """Undo the last ``k`` turns: weights, statistics and stage states become exactly what they were
        before the earliest of them.

        Needs ``keep_turn_deltas >= k``. A revert undoes whole turns, not single facts: each reverted
        turn had been computed on the model as edited by all turns before it, so it cannot be removed
        from the middle of a sequence; later turns then continue from the restored state. The edit
        log keeps the reverted turns and records a ``revert`` event.
        """
        undo = self.session.undo
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"revert_last needs k >= 1, got {k!r}")
        if k > self.turns:
            raise StateError(f"cannot revert {k} turns: the editor has applied {self.turns}")
        if k > len(undo):
            raise StateError(f"cannot revert {k} turns: only the last {len(undo)} are kept (keep_turn_deltas="
                             f"{self.session.keep_turn_deltas}; build the editor with a larger keep_turn_deltas)")
        entries = [undo[-i] for i in range(1, k + 1)]  # newest first
        expected = list(range(self.turns, self.turns - k, -1))
        if [e.turn for e in entries] != expected:
            raise StateError(f"undo snapshots {[e.turn for e in entries]} do not match turns {expected}")
        self.restore(entries[-1].snapshot)
        for _ in range(k):
            undo.pop()
        removed = sum(e.requests for e in entries)
        turns = sorted(e.turn for e in entries)
        note = (f"turns {turns[0]}-{turns[-1]} undone exactly: weights and statistics are those after turn "
                f"{self.turns}. Each undone turn had been computed on the model edited by all earlier turns; "
                "a revert removes whole turns, and later turns continue from the restored model.")
        self.session.log({"event": "revert", "turns": turns, "edits_removed": removed, "turns_after": self.turns,
                          "edits_total": self.edits})
        return RevertReport(reverted_turns=turns, edits_removed=removed, turns=self.turns, edits=self.edits, note=note)

    def save(self, directory: str | os.PathLike[str], *, delta_dtype: str = "float32") -> Path:
        """Save the session atomically to ``directory`` (:func:`ultraedit.session.save`)."""
        return store.save(self, directory, delta_dtype=delta_dtype)

    @classmethod
    def load(cls, model: nn.Module, directory: str | os.PathLike[str], tokenizer: Any = None, *,
             keep_turn_deltas: int | None = None) -> "UltraEditor":
        """Resume a saved session on ``model``, a freshly loaded copy of the SAME base model.

        The model's edit modules must have the fingerprint stored in the state (architecture, names,
        shapes, dtypes, SHA-256 of the original weights); otherwise a ``FingerprintError`` says what
        differs. Every file of the state is read and checked before the model is touched; then the
        model is edited in place (``W = W_base + delta``; restored if that fails midway) and the
        returned editor carries the statistics, stage states, counters, undo history and edit-log
        position of the saved session. Errors are ``StateError`` naming the file.

        Args:
            keep_turn_deltas: override the saved setting (None keeps it; smaller drops old snapshots).
        """
        saved = store.open_saved(directory)
        store.check_model(saved, model)
        meta = saved.meta
        try:
            config = EditConfig.from_dict(meta["config"])
            keep = int(meta.get("keep_turn_deltas", 0) if keep_turn_deltas is None else keep_turn_deltas)
            editor = cls(model, config, tokenizer, keep_turn_deltas=keep,
                         delta_accumulation=meta.get("delta_accumulation", "float32"))
        except StateError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise StateError(f"{saved.meta_path}: malformed ({type(err).__name__}: {err})") from None
        session = editor.session
        refuse(saved.directory, hash_diff(meta["fingerprint"], session.fingerprint()))
        layout = store.Layout(editor.modules, list(editor.normalizers),
                              {s.name: shapes for s in editor.stages if (shapes := s.state_shapes(editor.modules))},
                              {n for n, m in editor.modules.items() if editor.accumulates(m)}, session.base)
        contents = store.read_contents(saved, layout, keep)  # read and check everything first ...
        for shape, norm in editor.normalizers.items():  # ... then apply
            norm.load_state_dict(contents.statistics[shape])
        editor._load_stage_states(contents.stages)
        session.delta = store.add_saved_delta(saved, layout)
        editor.turns, editor.edits, session.log_seq = contents.turns, contents.edits, contents.log_seq
        session.pending_log = list(meta["log_tail"])
        session.extra = dict(meta.get("extra") or {})
        session.session_id = meta.get("session_id") or session.session_id
        session.undo.extend(contents.undo)
        mark_applied(model, saved.directory, meta)
        return editor

    # ------------------------------------------------------------------ checks
    def _ready(self) -> None:
        if self.lrs is None:
            raise EditError("EditConfig.lr_scale='output' and ridge_scale='keys' need the tokenizer: "
                            "UltraEditor(model, config, tokenizer=...)")
        for stage in self.stages:
            stage.ready()

    def _device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def __repr__(self) -> str:
        stages = ", ".join(s.name for s in self.stages) or "none"
        return (f"UltraEditor({type(self.model).__name__}, modules={len(self.modules)}, stages={stages}, "
                f"turns={self.turns}, edits={self.edits}, lr={self.config.lr})")


def edit_modules(model: nn.Module, config: EditConfig) -> dict[str, nn.Module]:
    """The edit modules ``config`` names (or its preset selects) on ``model``, checked: each exists, is
    an ``nn.Linear`` or ``Conv1D``, and holds its weight in place (not offloaded)."""
    try:
        names = config.modules if config.modules is not None else resolve_modules(model, config.preset)
    except (KeyError, ValueError) as err:  # unknown preset, or one that does not fit this model
        raise EditError(err.args[0] if err.args else str(err)) from None
    available = dict(model.named_modules())
    modules: dict[str, nn.Module] = {}
    for name in names:
        if name not in available:
            close = [n for n in available if n.endswith(name.split(".")[-1])][:3]
            hint = f"; modules with that suffix include {close}" if close else ""
            raise EditError(f"edit module {name!r} does not exist in {type(model).__name__}{hint}")
        try:
            module_shape(available[name])
        except TypeError as err:
            raise EditError(f"edit module {name!r}: {err}") from None
        if available[name].weight.device.type == "meta":
            raise EditError(
                f"edit module {name!r} has its weight offloaded (on the meta device, as accelerate's CPU/disk "
                "offload leaves it), so it cannot be edited in place: keep the edit layers resident, e.g. "
                "device_map with them on a GPU, or accelerate.dispatch_model(..., main_device='cpu') for "
                "layers that should live on the CPU")
        modules[name] = available[name]
    return modules
