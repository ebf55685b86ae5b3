"""What a benchmark run is: :class:`BenchConfig` (the command line's options), the data sets and
metrics it knows, the paper's numbers to compare with, and UltraEdit as one of the editing methods
(:mod:`ultraedit.methods` holds the baselines)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from torch import nn

from ..configs import ConfigError, default_for, resolve
from ..contexts import ContextError, check_contexts
from ..core.batching import EditRequest
from ..editor import UltraEditor
from ..methods import METHODS, MethodError, register_method
from ..models import DTYPES

#: ``--dataset`` choices: the readable formats plus the built-in testbed's requests.
DATASETS: tuple[str, ...] = ("zsre", "counterfact", "fever", "wikibigedit", "ultraeditbench", "jsonl", "testbed")

#: Headline metrics, in table order, with their display names.
METRIC_NAMES: dict[str, str] = {
    "efficacy": "Efficacy (token acc.)",
    "generalization": "Generalization (token acc.)",
    "specificity": "Specificity (token acc.)",
    "efficacy_exact": "Efficacy (every answer token right, teacher forced)",
    "generalization_exact": "Generalization (every answer token right, teacher forced)",
    "specificity_exact": "Specificity (every answer token right, teacher forced)",
    "locality_vs_unedited": "Locality vs unedited model's predictions",
    "retention": "Retention (locality tokens the unedited model got right, still right)",
    "personas": "Personas (token acc.)",
    "personas_exact": "Personas (every answer token right, teacher forced)",
    "multi_hop": "Multi-hop (token acc.)",
    "multi_hop_exact": "Multi-hop (every answer token right, teacher forced)",
}

#: Generation-based metrics of one context (``results["generation"][context]``), with display names.
GENERATION_NAMES: dict[str, str] = {
    "efficacy": "Efficacy (headline rule)",
    "generalization": "Generalization (headline rule)",
    "exact.efficacy": "Efficacy (exact match)",
    "exact.generalization": "Generalization (exact match)",
    "first_span.efficacy": "Efficacy (target starts the answer)",
    "first_span.generalization": "Generalization (target starts the answer)",
    "contains.efficacy": "Efficacy (target in the answer)",
    "contains.generalization": "Generalization (target in the answer)",
    "judge.efficacy": "Efficacy (judge)",
    "judge.generalization": "Generalization (judge)",
    "locality_unchanged": "Locality: generation unchanged",
    "locality_kept": "Locality: right before, still right",
}

#: The paper's reported results (arXiv 2505.14679, as cited on the method page), for comparison:
#: ``(dataset, model name fragment, edits, (efficacy, generalization, specificity) in %)``.
PAPER_RESULTS: tuple[tuple[str, str, int, tuple[float, float, float]], ...] = (
    ("zsre", "llama-3-8b", 20_000, (90.07, 87.36, 49.51)),
    ("ultraeditbench", "llama-3-8b", 2_000_000, (83.45, 79.11, 78.05)),
    ("ultraeditbench", "mistral-7b", 2_000_000, (81.70, 77.25, 77.09)),
    ("ultraeditbench", "gpt-j-6b", 2_000_000, (81.65, 76.80, 76.44)),
    ("ultraeditbench", "qwen2.5-7b", 2_000_000, (80.70, 75.78, 76.01)),
)


def paper_reference(dataset: str, model_name: str) -> dict[str, Any] | None:
    """The paper's numbers for this dataset and model (matched on the model's name), or ``None``."""
    name = model_name.lower()
    for data, fragment, edits, (es, gs, ls) in PAPER_RESULTS:
        if data == dataset and fragment in name:
            return {"source": "arXiv 2505.14679", "edits": edits, "efficacy": es / 100,
                    "generalization": gs / 100, "specificity": ls / 100}
    return None


class BenchError(ValueError):
    """A benchmark cannot run as configured (bad option, too little data, missing testbed)."""


#: Errors a run reports in one line (the command line's exit code 2), besides the data's and the model's.
RUN_ERRORS = (BenchError, MethodError)


@dataclass
class BenchConfig:
    """One benchmark run (the command line's options).

    Attributes:
        model: Hugging Face model name or local path, or ``"testbed"`` (a label when ``run`` gets a
            model object).
        dataset: one of :data:`DATASETS` (the record format of ``data``).
        data: the dataset file (not needed for ``dataset="testbed"`` or when ``run`` gets requests).
        out: output directory.
        turns: T, the number of turns.
        turn_size: N, requests per turn (paper: 100).
        batch_size: requests per minibatch inside a turn (paper: 10).
        config: UltraEdit's named configuration or JSON file (``None``: the model's default, see
            :func:`ultraedit.configs.default_for`); ``sets``: ``--set KEY=VALUE`` overrides on it.
        lr, modules, preset: the step size and edit modules (``None``: the configuration's).
        eval_every: also evaluate after every K-th turn (``None``: only at the end).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: dtype to load the model in (``"auto"``: as stored, float32 for the testbed).
        seed: seeds Python's and torch's generators and FEVER's rephrase choice.
        method: a key of :data:`METHODS`.
        skip_invalid: skip malformed records (written to ``out/rejects.jsonl``) instead of failing.
        eval_batch_size, eval_max_tokens: evaluation forward size, in sequences and padded tokens.
        forward_batch_size: UltraEdit's forward/backward size in requests (speed knob only).
        progress: show progress bars (stderr).
        method_options: a baseline's hyperparameters by name (``--method-option KEY=VALUE``).
        generation: also judge the edits by greedy generation (:mod:`ultraedit.generation`) before
            and after editing; ``contexts``: the contexts asked in (``None``: ``plain``, and ``chat``
            where the model has a chat template); ``judge``: an OpenAI-compatible endpoint that
            grades each generation (:mod:`ultraedit.judge`; ``None``: no judge).
    """

    model: str
    dataset: str
    out: str
    turns: int
    turn_size: int = 100
    batch_size: int = 10
    data: str | None = None
    config: str | None = None
    sets: list[str] = field(default_factory=list)
    lr: float | None = None
    modules: list[str] | None = None
    preset: str | None = None
    eval_every: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    method: str = "ultraedit"
    skip_invalid: bool = False
    eval_batch_size: int = 64
    eval_max_tokens: int | None = 16384
    forward_batch_size: int | None = 100
    progress: bool = True
    method_options: dict[str, Any] | None = None
    generation: bool = True
    contexts: list[str] | None = None
    judge: str | None = None

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise BenchError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        for name in ("turns", "turn_size", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BenchError(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_max_tokens", "forward_batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise BenchError(f"{name} must be a positive integer or None, got {value!r}")
        if self.eval_every is not None and (not isinstance(self.eval_every, int) or self.eval_every < 1):
            raise BenchError(f"eval_every must be a positive integer, got {self.eval_every!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise BenchError(f"lr must be a positive finite number, got {self.lr}")
        if self.dtype not in DTYPES:
            raise BenchError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.contexts is not None:
            try:
                self.contexts = check_contexts(list(self.contexts))
            except ContextError as err:
                raise BenchError(str(err)) from None
        if self.judge is not None and not self.generation:
            raise BenchError("--judge grades generations; it cannot be used with generation scoring off")
        if self.method not in METHODS:
            raise BenchError(f"unknown method {self.method!r}; registered: {', '.join(sorted(METHODS))}")

    @property
    def edits(self) -> int:
        return self.turns * self.turn_size


class EditMethod(Protocol):
    """What the runner needs from an editing method (UltraEdit, or a baseline plug-in)."""

    def edit(self, requests: Sequence[EditRequest]) -> Any:
        """Apply one turn of requests to the model in place; may return a report with ``loss``."""

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable hyperparameters, including ``"modules"`` (the weights it changes)."""


MethodFactory = Callable[[nn.Module, Any, BenchConfig], EditMethod]


class UltraEditMethod:
    """UltraEdit (:class:`UltraEditor`) behind the :class:`EditMethod` interface: the run's
    configuration (:func:`ultraedit.configs.resolve`) with the protocol's minibatch and forward size."""

    def __init__(self, model: nn.Module, tokenizer: Any, config: BenchConfig) -> None:
        if config.method_options:
            raise BenchError("ultraedit takes no --method-option; use --config, --set, --lr, --modules or --preset")
        try:
            self.resolved = resolve(
                config.config or default_for(config.model), model, modules=config.modules, preset=config.preset,
                lr=config.lr, capture_batch_size=config.batch_size,
                sets=[f"runtime.forward_batch_size={json.dumps(config.forward_batch_size)}", *config.sets])
        except ConfigError as err:
            raise BenchError(str(err)) from None
        self.editor = UltraEditor(model, self.resolved.config, tokenizer=tokenizer)

    def edit(self, requests: Sequence[EditRequest]) -> Any:
        return self.editor.edit(requests)

    def describe(self) -> dict[str, Any]:
        return {**self.resolved.config.to_dict(), "modules": list(self.editor.modules),
                "configuration": self.resolved.name, "notes": self.resolved.notes}


register_method("ultraedit", UltraEditMethod)
