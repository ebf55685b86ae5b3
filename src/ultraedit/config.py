"""``EditConfig``: the method's hyperparameters, a runtime group, and one optional sub-config per stage.

``EditConfig()`` is the authors' method exactly (lr 1e-6, ridge 1, minibatches of 10, the family's
preset modules) and builds no stage. Each option beyond the paper is a sub-config, ``None`` = off:
``refine``, ``generic``, ``memory``, ``neighbours``, ``subject`` (with ``subject.search``),
``outliers``, ``paraphrases``, ``guard`` (:mod:`ultraedit.stages`). Named configurations (``faithful``,
``recommended``, ...) are data: :mod:`ultraedit.configs`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from .stages import (
    ChatConfig,
    EndingConfig,
    SUB_CONFIGS,
    GenericConfig,
    GuardConfig,
    MemoryConfig,
    NeighboursConfig,
    OutliersConfig,
    ParaphraseConfig,
    RefineConfig,
    SubjectConfig,
)
from .stages.base import sub_config

DTYPES = {"float32": torch.float32, "float64": torch.float64}
SOLVERS = ("auto", "dual", "primal")
NORMALIZERS = ("paper", "welford")
LR_SCALES = ("none", "width", "output")
RIDGE_SCALES = ("none", "keys")

#: ``(d_in, d_out)`` of the modules the authors' lr 1e-6 was tuned on (Llama-3-8B gate/up_proj).
LR_REFERENCE_SHAPE = (4096, 14336)


@dataclass
class Runtime:
    """What changes speed and memory, not the edit: ``forward_batch_size`` (most requests in one
    forward/backward; ``None`` = the whole turn; results identical), ``dtype`` of statistics and
    solves (``"float32"`` or ``"float64"``), ``solver`` (``"auto"``: the dual form when a turn has fewer
    rows than ``d_in``; ``"dual"``; ``"primal"``; the same ``dW`` up to rounding)."""

    forward_batch_size: int | None = 100
    dtype: str = "float32"
    solver: str = "auto"

    def __post_init__(self) -> None:
        size = self.forward_batch_size
        if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size >= 1):
            raise ValueError(f"EditConfig.runtime.forward_batch_size must be a positive int or None, got {size!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"EditConfig.runtime.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"EditConfig.runtime.solver must be one of {SOLVERS}, got {self.solver!r}")


@dataclass
class EditConfig:
    """Hyperparameters of UltraEdit; the defaults are the authors' method.

    Attributes:
        modules: dotted names of the linear layers to edit; ``None`` uses ``preset``.
        preset: a name from :data:`ultraedit.core.presets.PRESETS`; ``None`` picks the default for
            the model's ``config.model_type``. Ignored when ``modules`` is given.
        lr: step size of the target values ``V = -lr * ||K_hat||^2 * G_hat``.
        ridge: ``lambda`` of the ridge solve (> 0).
        capture_batch_size: requests per minibatch; each minibatch's loss is a mean over its target
            tokens and feeds the normalizer as one block, so this changes results.
        normalizer: ``"paper"`` (the authors' running-variance formula) or ``"welford"`` (the textbook one).
        lr_scale: ``"none"`` uses ``lr`` as is. Beyond the paper: ``"width"`` scales it per module
            shape by ``4096 * sqrt(14336) / (d_in * sqrt(d_out))``, the inverse of how the row norm of
            ``V`` grows with the shape, so ``lr`` keeps the meaning it has on Llama-3-8B's MLP
            projections (where the authors tuned 1e-6); ``"output"`` scales it by ``out / (d_in *
            sqrt(d_out))``, ``out`` the edit modules' typical output norm (the mean over them of the
            median over the package's generic text, measured on the unedited model), so that a row of
            ``V`` is about ``lr`` times what the modules typically write: the same relative step on
            any model, whatever its weights' scale.
        ridge_scale: ``"none"`` uses ``ridge`` as is. Beyond the paper: ``"keys"`` multiplies it by
            the keys' typical mean square entry (the mean over the edit modules of the median of
            ``||k||^2 / d_in`` over the generic text), so that the ridge weighs the same against
            ``K^T K`` on any model: with ``"output"``, rescaling a layer's neurons (``up_proj`` rows
            times ``c``, ``down_proj`` columns divided by ``c``) rescales the edit the same way.
        runtime: :class:`Runtime` (speed and memory only).
        refine, generic, memory, neighbours, subject, outliers, paraphrases, ending, chat, guard: the stages beyond
            the paper (:mod:`ultraedit.stages`), ``None`` = off.
    """

    modules: list[str] | None = None
    preset: str | None = None
    lr: float = 1e-6
    ridge: float = 1.0
    capture_batch_size: int = 10
    normalizer: str = "paper"
    lr_scale: str = "none"
    ridge_scale: str = "none"
    runtime: Runtime = field(default_factory=Runtime)
    refine: RefineConfig | None = None
    generic: GenericConfig | None = None
    memory: MemoryConfig | None = None
    neighbours: NeighboursConfig | None = None
    subject: SubjectConfig | None = None
    outliers: OutliersConfig | None = None
    paraphrases: ParaphraseConfig | None = None
    ending: EndingConfig | None = None
    chat: ChatConfig | None = None
    guard: GuardConfig | None = None

    def __post_init__(self) -> None:
        if self.modules is not None:
            self.modules = list(self.modules)
            if not self.modules or not all(isinstance(m, str) and m for m in self.modules):
                raise ValueError("EditConfig.modules must be a non-empty list of module names")
            if len(set(self.modules)) != len(self.modules):
                raise ValueError(f"EditConfig.modules has duplicates: {self.modules}")
        for name in ("lr", "ridge"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
                raise ValueError(f"EditConfig.{name} must be a positive finite number, got {value!r}")
        size = self.capture_batch_size
        if not (isinstance(size, int) and not isinstance(size, bool) and size >= 1):
            raise ValueError(f"EditConfig.capture_batch_size must be a positive int, got {size!r}")
        if self.normalizer not in NORMALIZERS:
            raise ValueError(f"EditConfig.normalizer must be one of {NORMALIZERS}, got {self.normalizer!r}")
        if self.lr_scale not in LR_SCALES:
            raise ValueError(f"EditConfig.lr_scale must be one of {LR_SCALES}, got {self.lr_scale!r}")
        if self.ridge_scale not in RIDGE_SCALES:
            raise ValueError(f"EditConfig.ridge_scale must be one of {RIDGE_SCALES}, got {self.ridge_scale!r}")
        if isinstance(self.runtime, dict):
            self.runtime = Runtime(**self.runtime)
        for name, kind in SUB_CONFIGS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, sub_config(name, kind, value))
            elif value is not None and not isinstance(value, kind):
                raise ValueError(f"EditConfig.{name} must be a {kind.__name__}, a dict of its fields or None, "
                                 f"got {type(value).__name__}")

    def module_lr(self, shape: tuple[int, int], output: float | None = None) -> float:
        """The step size used for a module of shape ``(d_in, d_out)`` (see ``lr_scale``; ``"output"``
        needs the edit modules' measured ``output`` norm)."""
        d_in, d_out = shape
        if self.lr_scale == "width":
            return self.lr * (LR_REFERENCE_SHAPE[0] * math.sqrt(LR_REFERENCE_SHAPE[1])) / (d_in * math.sqrt(d_out))
        if self.lr_scale == "output":
            if output is None:
                raise ValueError("lr_scale='output' needs the edit modules' measured output norm")
            return self.lr * output / (d_in * math.sqrt(d_out))
        return self.lr

    def measured(self) -> bool:
        """Whether the step or the ridge depends on scales measured on the model (needs its tokenizer)."""
        return self.lr_scale == "output" or self.ridge_scale == "keys"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.runtime.dtype]

    def stages(self) -> list[str]:
        """The stages this configuration turns on, in the editor's order."""
        return [name for name in SUB_CONFIGS if getattr(self, name) is not None]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EditConfig":
        """An :class:`EditConfig` from its :meth:`to_dict` form, or from a session saved by an earlier
        version (flat fields, mapped; a removed option that was on is refused, naming why)."""
        from .legacy import nested

        if not isinstance(data, dict):
            raise ValueError(f"an EditConfig is a JSON object, got {type(data).__name__}")
        data = nested(data)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown EditConfig fields: {sorted(unknown)}")
        return cls(**data)


__all__ = ["ChatConfig", "DTYPES", "EditConfig", "EndingConfig", "GenericConfig", "GuardConfig", "MemoryConfig", "NeighboursConfig", "OutliersConfig",
           "ParaphraseConfig", "RefineConfig", "Runtime", "SubjectConfig"]
