"""The damage guard (``EditConfig.guard``): no turn is committed that costs the model more than a budget.

Before any edit, the guard measures the unedited model on fixed probes: the held-out text's
perplexity (``lines`` of ``data/heldout.txt``) and up to ``facts`` common-knowledge facts it answers
right (teacher-forced, every answer token the argmax; from ``data/known_facts.jsonl``). This is built
once per model and cached. Before a turn is committed, its shift is applied on trial and the probes
measured again; the turn passes when, against the unedited model,

* at least ``retention`` of the known facts' answer tokens are still the argmax (teacher-forced: the
  benchmark's retention, on facts the unedited model answers right), and
* the perplexity rose by at most ``perplexity``.

A turn that does not pass is shrunk: the largest share of its shift that passes is searched by
halving, ``halvings`` times, the interval between a share that passes and one that does not (1/2,
then 1/4 or 3/4, ...); a turn of which no share tried passes commits nothing. Either way the turn
report says so (``report.stages["guard"]``) and a :class:`GuardWarning` is raised: no turn that wrecks the model is committed,
and no edit is lost without a word. Facts about a subject the session has edited are left out of
the measure from that turn on (changing them is the point of the edit), and remembered with the
saved state.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from ..cache import cache_dir, cached_json, model_hash
from ..core.batching import EditError
from ..evaluation import perplexity, teacher_forced
from ..texts import package_text
from .base import Stage, Turn, positive

#: Where the guard's probes come from (a baseline is cached per model and per content of both).
FACTS_FILE, TEXT_FILE, VERSION = "known_facts.jsonl", "heldout.txt", 1


class GuardWarning(UserWarning):
    """A turn was shrunk or refused because it would cost the model more than the guard's budget."""


@dataclass
class GuardConfig:
    """``retention``: the least share of the probe facts' answer tokens (facts the unedited model
    answers right) that must stay the argmax; ``perplexity``: the most rise of the held-out perplexity over the unedited model's;
    ``facts``, ``lines``: how many probe facts and held-out lines are measured; ``halvings``: how many
    times the interval of a turn's share is halved in the search for the largest share that passes
    (a turn costs at most ``1 + halvings`` measurements)."""

    retention: float = 0.9
    perplexity: float = 0.1
    facts: int = 200
    lines: int = 16
    halvings: int = 4

    def __post_init__(self) -> None:
        if not (isinstance(self.retention, (int, float)) and 0.0 <= self.retention <= 1.0):
            raise ValueError(f"EditConfig.guard.retention must be in [0, 1], got {self.retention!r}")
        positive("guard", "perplexity", self.perplexity, zero=True)
        positive("guard", "facts", self.facts, integer=True)
        positive("guard", "lines", self.lines, integer=True)
        positive("guard", "halvings", self.halvings, integer=True, zero=True)


def known_facts() -> list[dict[str, Any]]:
    """The candidate probe facts shipped with the package: ``prompt``, ``answer``, ``subject``, ``relation``."""
    return [json.loads(line) for line in package_text(FACTS_FILE)]


class GuardStage(Stage):
    name = "guard"

    def __init__(self, config: GuardConfig) -> None:
        super().__init__(config)
        self.probes: list[dict[str, Any]] = []  # the facts the unedited model knows (at most config.facts)
        self.lines: list[str] = []
        self.baseline = 0.0  # the unedited model's perplexity on the lines
        self.excluded = torch.zeros(0, dtype=torch.int64)  # per probe: 1 once its subject has been edited

    def setup(self, model: nn.Module, tokenizer: Any, modules: dict[str, nn.Module], dtype: torch.dtype) -> None:
        """The probes and the baseline, on the unedited model (cached per model and budget sizes)."""
        if tokenizer is None:
            return
        self.lines = package_text(TEXT_FILE)[: self.config.lines]
        facts = known_facts()
        content = hashlib.sha256(json.dumps([facts, self.lines]).encode()).hexdigest()[:16]
        key = f"v{VERSION}-{content}-facts{self.config.facts}.json"
        base = cached_json(cache_dir() / "guard" / model_hash(model)[:32] / key,
                           lambda: self._baseline(model, tokenizer, facts))
        self.probes = [facts[i] for i in base["known"]]
        self.baseline = base["perplexity"]
        self.excluded = torch.zeros(len(self.probes), dtype=torch.int64)

    def _baseline(self, model: nn.Module, tokenizer: Any, facts: list[dict[str, Any]]) -> dict[str, Any]:
        exact = teacher_forced(model, tokenizer, [(f["prompt"], f["answer"]) for f in facts]).exact
        known = [i for i, right in enumerate(exact) if right == 1.0][: self.config.facts]
        return {"known": known, "perplexity": perplexity(model, tokenizer, self.lines), "candidates": len(facts)}

    def ready(self) -> None:
        if not self.lines:
            raise EditError("EditConfig.guard needs the tokenizer: UltraEditor(model, config, tokenizer=...)")

    def begin(self, turn: Turn) -> None:
        """The probes about a subject this turn edits leave the measure."""
        excluded = self.excluded.clone()
        for request in turn.requests or ():
            subject = (request.extra or {}).get("subject") if request.extra else None
            for i, probe in enumerate(self.probes):
                about = probe.get("subject")
                if (about and about in request.prompt) or (isinstance(subject, str) and subject and subject in probe["prompt"]):
                    excluded[i] = 1
        turn.scratch[self.name] = {"excluded": excluded}

    def measure(self, turn: Turn, excluded: torch.Tensor) -> dict[str, float]:
        """Retention of the probe facts still in the measure (the share of their answer tokens still the
    argmax, as the benchmark's retention), and the perplexity rise, of the model now."""
        kept = [p for p, out in zip(self.probes, excluded.tolist()) if not out]
        scores = teacher_forced(turn.model, turn.tokenizer, [(p["prompt"], p["answer"]) for p in kept])
        tokens = [len(answer) for answer in scores.answers]
        right = sum(accuracy * n for accuracy, n in zip(scores.accuracy, tokens))
        now = perplexity(turn.model, turn.tokenizer, self.lines)
        return {"retention": right / sum(tokens) if kept else 1.0, "perplexity_rise": now / self.baseline - 1}

    def passes(self, cost: dict[str, float]) -> bool:
        return cost["retention"] >= self.config.retention and cost["perplexity_rise"] <= self.config.perplexity

    def vet(self, turn: Turn, shifts: dict[str, torch.Tensor],
            trying: Callable[[dict[str, torch.Tensor]], ContextManager[None]]) -> dict[str, torch.Tensor]:
        """The turn's shift, or the largest share of it (found by halving, ``halvings`` times, the
        interval between a passing and a failing share) whose model passes the budget; zero: refused."""
        started = time.perf_counter()
        excluded = turn.scratch[self.name]["excluded"]
        tried: list[dict[str, float]] = []

        def passes(scale: float) -> bool:
            with trying(_scaled(shifts, scale)):
                cost = self.measure(turn, excluded)
            tried.append({"scale": scale, **cost})
            return self.passes(cost)

        scale = 1.0
        if not passes(1.0):
            low, high = 0.0, 1.0
            for _ in range(self.config.halvings):
                middle = (low + high) / 2
                low, high = (middle, high) if passes(middle) else (low, middle)
            scale = low
        verdict = {"scale": scale, "tried": tried, "probes": int(len(self.probes) - int(excluded.sum())),
                   "seconds": time.perf_counter() - started}
        turn.scratch[self.name]["verdict"] = verdict
        if scale < 1.0:
            warnings.warn(_why(verdict, self.config), GuardWarning, stacklevel=4)
        return shifts if scale == 1.0 else _scaled(shifts, scale)

    def after(self, turn: Turn) -> dict[str, torch.Tensor]:
        return {"excluded": turn.scratch[self.name]["excluded"]}

    def report(self, turn: Turn) -> dict[str, Any] | None:
        return turn.scratch.get(self.name, {}).get("verdict")

    def state_shapes(self, modules: dict[str, nn.Module]) -> dict[str, tuple[int, ...] | None]:
        return {"excluded": (len(self.probes),) if self.probes else None}  # (an editor without a tokenizer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"excluded": self.excluded}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "excluded" in state:
            self.excluded = state["excluded"].to("cpu", torch.int64)


def _scaled(shifts: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    return shifts if scale == 1.0 else {n: s * scale for n, s in shifts.items()}


def _why(verdict: dict[str, Any], config: GuardConfig) -> str:
    first = verdict["tried"][0]
    cost = (f"retention {first['retention']:.3f} (budget {config.retention}), perplexity "
            f"{first['perplexity_rise']:+.1%} (budget +{config.perplexity:.0%})")
    if verdict["scale"] > 0:
        return f"damage guard: the turn would cost {cost}; committed at {verdict['scale']:g} of its shift"
    least = min(verdict["tried"], key=lambda t: t["scale"])
    return (f"damage guard: the turn would cost {cost} and no share of it passes (at {least['scale']:g} of it: "
            f"retention {least['retention']:.3f}, perplexity {least['perplexity_rise']:+.1%}); nothing of it was committed")
