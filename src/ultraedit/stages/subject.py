"""Subject rows (``EditConfig.subject``): the edit is also written at the subject's last token.

UltraEdit writes an edit at the prompt's target positions only. ROME and MEMIT write it at the
subject's last token, in the lower layers, which every rewording of the fact shares. This stage
adds, per request whose subject is known (``extra["subject"]``, as the ZsRE and CounterFact
readers set it), the row at the subject's last token (its key and output gradient) to the turn:

* ``weight`` scales those rows' values;
* ``depth`` splits the roles (ROME/MEMIT's): the edit modules in the lowest ``depth`` of the layers
  (layer index < ``depth * layers``) edit only the subject rows, the others only the target rows;
  the rows a module does not edit stay in its ridge with value 0 (preserved);
* ``search`` (optional) replaces the subject rows' first-order values in the turn's first step by
  optimised ones, ROME/MEMIT's ``z``: per request, ``steps`` Adam steps (``lr``) on a change
  ``delta`` of the residual stream at the subject's last token after the top module below the
  split, minimising the target tokens' NLL + ``decay * ||delta||^2 / ||h||^2`` within
  ``||delta|| <= clamp * ||h||`` (``h``: the hidden state there; a request stops moving once its
  NLL is under 0.05, as in the published loop). Only the layers above run in the search; no weight
  moves. Each of the ``n`` modules below the split then gets ``delta / n`` as that row's value:
  together they add ``delta`` to the residual stream. The first-order value ``-lr ||K_hat||^2
  G_hat`` is one small step of this same descent; a few Adam steps follow the model's
  non-linearity to a change that actually carries the answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.anatomy import frozen, hidden_size, layer_index, num_layers, writes_residual
from ..core.batching import SUBJECT_INDEX
from ..core.tail import Tail
from ..core.weights import module_shape
from .base import Rows, Stage, Turn, positive, sub_config

STOP_LOSS = 0.05  # a request whose mean target NLL is below this stops moving (MEMIT's early stop)


@dataclass
class SearchConfig:
    """The optimised subject values: Adam ``steps`` of size ``lr``, ``decay`` of ``||delta||^2 / ||h||^2``,
    ``||delta|| <= clamp ||h||``."""

    steps: int = 8
    lr: float = 2.0
    decay: float = 0.5
    clamp: float = 0.4

    def __post_init__(self) -> None:
        positive("subject.search", "steps", self.steps, integer=True)
        positive("subject.search", "lr", self.lr)
        positive("subject.search", "decay", self.decay, zero=True)
        positive("subject.search", "clamp", self.clamp)


@dataclass
class SubjectConfig:
    """``weight`` of the subject rows' values; ``depth``: the fraction of the layers below which
    modules edit at the subject (0 = every module edits every row); ``search``: optimised values."""

    weight: float = 1.0
    depth: float = 0.43
    search: SearchConfig | None = field(default_factory=SearchConfig)

    def __post_init__(self) -> None:
        positive("subject", "weight", self.weight)
        if not (isinstance(self.depth, (int, float)) and 0.0 <= self.depth <= 1.0):
            raise ValueError(f"EditConfig.subject.depth must be in [0, 1], got {self.depth!r}")
        self.search = sub_config("subject.search", SearchConfig, self.search)
        if self.search is not None and self.depth <= 0:
            raise ValueError("EditConfig.subject.search needs subject.depth > 0 (which modules edit at the subject)")


class SubjectStage(Stage):
    name = "subject"
    marks_subjects = True

    def __init__(self, config: SubjectConfig) -> None:
        super().__init__(config)
        self.split = 0.0
        self.below: list[str] = []

    def check(self, model: nn.Module, modules: dict[str, nn.Module]) -> str | None:
        """The split needs a module below it; the search writes a change of the residual stream, so it
        needs modules below the split whose output joins the residual stream as it is."""
        return self._placement(model, modules) or self._search_problem(model, modules)

    def adapt(self, model: nn.Module, modules: dict[str, nn.Module]) -> tuple[SubjectConfig | None, str | None]:
        """Without the search where only the search cannot apply (subject rows still help there)."""
        placement = self._placement(model, modules)
        if placement is not None:
            return None, f"left out the subject stage: {placement}"
        problem = self._search_problem(model, modules)
        if problem is None:
            return self.config, None
        return replace(self.config, search=None), f"left out subject.search: {problem}"

    def _placement(self, model: nn.Module, modules: dict[str, nn.Module]) -> str | None:
        self.split = self.config.depth * num_layers(model)
        self.below = [n for n in modules if layer_index(n) < self.split]
        if self.config.depth > 0 and not self.below:
            return f"no edit module lies below subject.depth {self.config.depth} ({self.split:g} of {num_layers(model)} layers)"
        return None

    def _search_problem(self, model: nn.Module, modules: dict[str, nn.Module]) -> str | None:
        if self.config.search is None or self.config.depth <= 0:
            return None
        width = hidden_size(model)
        for name in self.below:
            if module_shape(modules[name])[1] != width:
                return (f"edit module {name!r} lies below subject.depth {self.config.depth} but writes "
                        f"{module_shape(modules[name])[1]} features, not the residual stream's {width}: the search "
                        "needs modules that write it (MLP down/output or attention output projections)")
            if writes_residual(model, name) is False:
                return (f"edit module {name!r} lies below subject.depth {self.config.depth} but its output passes "
                        "through a norm before it joins the residual stream (as in Gemma-2/3): the search's "
                        "residual-stream change cannot be written as its value")
        return None

    def lower(self, group: Sequence[str]) -> torch.Tensor:
        """Per module of ``group``, is it below the split (does it edit at the subject)?"""
        return torch.tensor([layer_index(name) < self.split for name in group])

    def begin(self, turn: Turn) -> None:
        search = self.config.search
        if search is None or self.config.depth <= 0 or not any(SUBJECT_INDEX in b for b in turn.batches):
            return
        start = max(map(layer_index, self.below)) + 1  # the layer above the top module that edits at the subject
        deltas = subject_deltas(turn.model, start, turn.batches, search.steps, search.lr, search.decay, search.clamp)
        turn.scratch[self.name] = torch.cat(
            [d[b[SUBJECT_INDEX] >= 0] for d, b in zip(deltas, turn.batches) if SUBJECT_INDEX in b])

    def values(self, turn: Turn, rows: Rows, values: torch.Tensor) -> torch.Tensor:
        subject = rows.edited(rows.subject.to(values.device))
        if self.config.weight != 1.0:
            values = values * torch.where(subject, self.config.weight, 1.0).to(values.dtype)[:, None]
        if self.config.depth <= 0:
            return values
        lower = self.lower(rows.group).to(values.device)
        found = turn.scratch.get(self.name)
        if rows.step == 0 and found is not None and bool(lower.any()):  # delta / n in each of the n modules below
            spread = found.to(values.device, values.dtype) / len(self.below)
            values[:, subject] = torch.where(lower[:, None, None], spread, values[:, subject])
        alone = torch.where(lower[:, None], ~subject[None, :], subject[None, :])  # the rows a module leaves alone
        return values.masked_fill(alone[..., None], 0.0)


def subject_deltas(
    model: nn.Module, start: int, batches: Sequence[dict[str, torch.Tensor]],
    steps: int, lr: float, decay: float, clamp: float,
) -> list[torch.Tensor]:
    """Per minibatch, ``(B, hidden)`` float32: each sequence's ``delta`` at its ``subject_index`` in the
    input of decoder layer ``start`` (the output of the layer below it), zeros where it has none (-1).
    Only the layers from ``start`` on run in the search (:class:`~ultraedit.core.tail.Tail`)."""
    with frozen(model):
        return [_batch_deltas(model, start, batch, steps, lr, decay, clamp) for batch in batches]


class _Shifted:
    """A batch's :class:`~ultraedit.core.tail.Tail` and where its subject rows' ``delta`` goes."""

    def __init__(self, model: nn.Module, start: int, batch: dict[str, torch.Tensor]) -> None:
        self.tail = Tail(model, start, batch["input_ids"], batch["attention_mask"], batch["labels"])
        index = batch[SUBJECT_INDEX]
        self.rows = torch.nonzero(index >= 0).flatten()
        device = self.tail.hidden.device
        self.where = (self.rows.to(device), index[self.rows].to(device))

    def hidden(self, delta: torch.Tensor) -> torch.Tensor:
        """Layer ``start``'s input with each row's ``delta`` (``(rows, hidden)``) added at its subject."""
        change = delta[self.rows.to(delta.device)].to(self.tail.hidden.device, self.tail.hidden.dtype)
        return self.tail.hidden.index_put(self.where, change, accumulate=True)

    def losses(self, delta: torch.Tensor) -> torch.Tensor:
        """Per sequence, the mean NLL of its target tokens."""
        logits = self.tail.target_logits(self.hidden(delta))
        labels = self.tail.labels.to(logits.device)
        return self.tail.per_row(F.cross_entropy(logits, labels, reduction="none")).to(delta.device)


def _batch_deltas(model: nn.Module, start: int, batch: dict[str, torch.Tensor], steps: int, lr: float, decay: float,
                  clamp: float) -> torch.Tensor:
    """Adam on the minibatch's deltas; each sequence's loss is its own (Adam is per coordinate, so each
    delta moves as if optimised alone)."""
    index = batch[SUBJECT_INDEX]
    delta = torch.zeros(index.shape[0], hidden_size(model), device=index.device, requires_grad=True)
    if not bool((index >= 0).any()):
        return delta.detach()
    edit = _Shifted(model, start, batch)
    norm = torch.ones(index.shape[0], device=delta.device)  # ||h|| unedited, per sequence (1: no subject)
    norm[edit.rows] = torch.linalg.vector_norm(edit.tail.hidden[edit.where].float(), dim=-1).to(delta.device)
    optimiser = torch.optim.Adam([delta], lr=lr)
    moving = index >= 0
    for _ in range(steps):
        loss = edit.losses(delta)
        moving &= loss.detach() > STOP_LOSS
        if not bool(moving.any()):
            break
        penalty = decay * delta.square().sum(-1) / norm.square()
        optimiser.zero_grad()
        ((loss + penalty) * moving).sum().backward()
        kept = delta.detach()[~moving].clone()
        optimiser.step()
        with torch.no_grad():  # a stopped delta stays put (Adam's momentum would move it on)
            delta[~moving] = kept
            limit = clamp * norm  # project back into the ball ||delta|| <= clamp ||h||
            length = torch.linalg.vector_norm(delta, dim=-1)
            delta.mul_(torch.where(length > limit, limit / length.clamp(min=1e-12), 1.0)[:, None])
    return delta.detach()
