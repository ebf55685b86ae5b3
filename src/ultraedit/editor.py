"""The UltraEdit editor: one turn = capture, lifelong normalization, closed-form solve, apply.

Reads like the method page (``ultraedit-method.md``)::

    for each minibatch of the turn:                       # steps 1-3
        K_m, G_m = keys and output gradients at target positions, for every edit module m
        normalizer[shape(m)].update([K_m, G_m])
    for every edit module m, with all rows of the turn:   # steps 4-7
        V  = -lr * ||K_hat||^2 * G_hat
        dW = (K^T K + lambda I)^-1 K^T V
        W += dW^T   (nn.Linear; GPT-2 Conv1D: W += dW)

A turn is atomic: every shift is computed (and checked finite) on copies of the normalizers before
any weight or statistic changes; on any error the model and the editor are exactly as before.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from .batching import BATCH_KEYS, IGNORE, SUBJECT_INDEX, EditError, EditRequest, minibatches, subject_of
from .capture import MinibatchCapture, capture, key_mask
from .normalizer import LifelongNormalizer
from .neighbours import neighbour_grams, neighbour_pairs, with_copies, with_prefixes
from .paraphrase import paraphrases
from .presets import layer_index, num_layers, preset_for, recommended_preset, resolve_modules
from .solver import Preserved, ridge_solve, target_values
from .subject_values import STOP_RULES, context_batches, essence_batches, subject_deltas

if TYPE_CHECKING:  # pragma: no cover
    from .state import RevertReport

try:  # GPT-2 style layers store the weight as (d_in, d_out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()  # type: ignore[assignment]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_NARROW = (torch.bfloat16, torch.float16)  # weights whose rounding step can swallow a turn's shift
DELTA_ACCUMULATIONS = ("float32", "weights")
LOST_FRACTION = 0.5  # a turn whose applied shift keeps less than this of the intended one is "mostly lost"


class LostShiftWarning(UserWarning):
    """Most of a turn's weight shift did not reach the (bf16/fp16) weights: it was below their
    rounding step. Only with ``delta_accumulation="weights"``; the default keeps it."""

#: The options of :meth:`EditConfig.recommended` (measurements in the README); ``lr`` is the one
#: measured for the MLP output projection, :data:`RECOMMENDED_PRESET` what changes for a family preset's
#: modules (the fallback of :func:`ultraedit.presets.recommended_preset`).
RECOMMENDED: dict[str, Any] = {
    "lr": 1e-5, "lr_scale": "width", "refine_steps": 5, "preserve": 300.0, "memory": 1.0, "confidence": 0.8,
    "subject_keys": 1.0, "subject_depth": 0.43, "key_outliers": 4.0, "neighbours": 8,
    "subject_optimise": 8, "subject_clamp": 0.4, "preserve_text": "generated", "preserve_base": 20.0,
}
#: Where the recommended layers do not fit (the family preset's modules): the step measured for
#: gate/up_proj, and no subject rows (measured only on the MLP output projections).
RECOMMENDED_PRESET = {"lr": 5e-6, "subject_keys": 0.0, "subject_depth": 0.0, "subject_optimise": 0}

#: ``EditConfig.preserve_text``: where the preserved generic keys come from.
PRESERVE_TEXTS = ("package", "generated", "both")

#: ``(d_in, d_out)`` of the modules the authors' lr 1e-6 was tuned on (Llama-3-8B gate/up_proj).
LR_REFERENCE_SHAPE = (4096, 14336)


@dataclass
class EditConfig:
    """Hyperparameters of UltraEdit (defaults: the authors' configs).

    Attributes:
        modules: dotted names of the linear layers to edit; ``None`` uses ``preset``.
        preset: a name from :data:`ultraedit.presets.PRESETS`; ``None`` picks the default for
            the model's ``config.model_type``. Ignored when ``modules`` is given.
        lr: step size of the target values ``V = -lr * ||K_hat||^2 * G_hat``.
        ridge: ``lambda`` of the ridge solve (> 0).
        capture_batch_size: requests per minibatch; each minibatch's loss is a mean over its
            target tokens and feeds the normalizer as one block, so this changes results.
        forward_batch_size: most requests run in one forward/backward pass (several minibatches
            share it, with results identical to one pass per minibatch); ``None`` = whole turn.
            A speed/memory knob only.
        normalizer: ``"paper"`` (the authors' running-variance formula) or ``"welford"``.
        dtype: dtype of statistics and solves, ``"float32"`` or ``"float64"``.
        solver: ``"auto"`` (dual form when rows < d_in), ``"dual"`` or ``"primal"``.

    Options beyond the paper (defaults keep the authors' method exactly):
        lr_scale: ``"none"`` uses ``lr`` as is; ``"width"`` scales it per module shape by
            ``4096 * sqrt(14336) / (d_in * sqrt(d_out))``, the inverse of how the row norm of
            ``V`` grows with the module shape, so ``lr`` keeps the meaning it has on
            Llama-3-8B's MLP projections (where the authors tuned 1e-6).
        refine_steps: most closed-form steps per turn. After each step the shift is applied
            (temporarily), gradients are captured again, and requests whose target tokens are
            all predicted already are kept fixed (their keys join the preserved set); the turn
            stops early when every request is right. 1 = the authors' single step.
        preserve: weight ``alpha`` of preserved generic-text keys in the ridge,
            ``(K^T K + lambda I + alpha E0[k k^T])^-1 K^T V``, where ``E0[k k^T]`` is the
            second moment of each edit module's input over a generic English text shipped with
            the package (MEMIT's covariance term; needs a tokenizer). 0 = off.
        preserve_text: the text ``E0[k k^T]`` is taken over: ``"package"`` (the package's
            ``data/generic.txt``, about 1,600 tokens), ``"generated"`` (16,384 tokens the model
            samples from its BOS token, seeded and cached per model: :mod:`ultraedit.covariance`,
            MEMIT's statistics where no Wikipedia is at hand) or ``"both"`` (the mean of the two).
        memory: weight ``beta`` of the keys of all earlier turns in the ridge: per module the
            editor keeps ``M = sum over past turns of K^T K`` (``d_in x d_in``, constant in the
            number of edits; saved with the state, undone by revert) and solves
            ``(K^T K + lambda I + alpha E0 + beta M)^-1 K^T V``, so a turn moves the outputs at
            earlier edits' keys as little as it can (MEMIT/AlphaEdit's sequential term). 0 = off.
        confidence: with refinement steps, a request counts as done when every target token is
            the argmax AND has at least this probability (0 = the argmax alone). A margin on the
            edit prompt carries further to its paraphrases.
        neighbours: per request with a known subject (``extra["subject"]``, as the ZsRE and
            CounterFact readers set it), this many copies of its prompt with the subject replaced
            by other subjects of the turn are preserved keys of the ridge, weighted by
            ``neighbour_weight`` (:mod:`ultraedit.neighbours`): the shift should follow the
            subject, not the template. Text requests only (:meth:`UltraEditor.edit`). 0 = off.
        prefixes: each request is also edited behind this many context prefixes (sentences of
            the package's generic text before the prompt, chosen with a seed from the request's
            text; ROME/MEMIT's context templates), so the edit holds in other contexts. Text
            requests only; costs ``1 + prefixes`` times the rows. 0 = off.
        paraphrases: each request with a known subject is also edited through up to this many
            rewordings of its prompt that the model writes itself at the start of the turn
            (:mod:`ultraedit.paraphrase`: a few-shot prompt, 4 samples seeded by the request's
            text, filtered), so the edit is tied to the fact rather than to one wording. Text
            requests only; costs the sampling (about 0.7 s per request for SmolLM2-135M on 2 CPU
            cores) and up to ``1 + paraphrases`` times the rows. 0 = off.
        subject_keys: each request with a known subject (``extra["subject"]``) also adds the row
            (key and output gradient at the last token of the subject, ROME/MEMIT's key
            position) to the turn, its value weighted by this number: the edit is then carried
            by the subject's representation too, which its paraphrases share. Text requests
            only. 0 = off.
        subject_depth: with ``subject_keys``, the edit modules in the lowest ``subject_depth`` of
            the model's layers (layer index < ``subject_depth * layers``) edit only the subject
            rows and the others only the target rows; the rows a module does not edit stay in
            its ridge with value 0 (preserved). ROME/MEMIT's split of roles: the lower layers
            enrich the subject, the upper ones read the answer out at the last token. 0 = every
            module edits both.
        key_outliers: a row whose key norm exceeds this multiple of the median key norm of the
            turn's rows (per module) is kept, not edited (value 0: a preserved row). Such keys
            are massive activations at attention-sink tokens (the first token, some bare-space
            tokens: ~10x the usual norm in SmolLM2's middle layers); ``V`` grows with
            ``||K_hat||^2``, and a shift fitted to them moves every sequence. 0 = off.
        subject_steps: with ``subject_depth``, the turn's first this many refinement steps solve
            only the modules below the split (the subject rows); the modules above join from the
            next step, for what the subject edit has not yet carried. The edit is then written at
            the subject first, as far as it goes, which its paraphrases share; the target rows
            finish it. 0 = every step solves every module.
        subject_optimise: with ``subject_depth``, the subject rows' values in the turn's first step
            are optimised instead of first-order (ROME/MEMIT's ``z``, :mod:`ultraedit.subject_values`):
            per request, this many Adam steps (step size ``subject_lr``) on a change ``delta`` of
            the residual stream at the subject's last token after the top module below the split,
            minimising the target tokens' NLL + ``subject_decay * ||delta||^2 / ||h||^2`` within
            ``||delta|| <= subject_clamp * ||h||`` (``h``: the hidden state there); each module
            below the split then gets ``delta / n`` (n such modules) as the value of that row.
            Later refinement steps are first-order as before. No weight moves during the search;
            it costs about this many forward/backward passes over the turn. 0 = off.
        subject_kl: with ``subject_optimise``, the search also keeps what the model says the
            subject is: ``subject_kl * KL(p0 || p)`` of the next token after ``"{subject} is a"``
            with the change added at the subject (ROME/MEMIT's essence term, their ``kl_factor``).
            Text requests only (the subject's text is needed). 0 = off.
        subject_contexts: with ``subject_optimise``, each request's change is optimised over its
            prompt and this many copies behind a generic-text sentence (ROME/MEMIT's context
            templates; the sentences :func:`ultraedit.neighbours.with_prefixes` draws), the change
            added at the subject's last token in every copy and the loss the mean of the copies'.
            Only the search sees the copies; the turn edits the prompts as given. Text requests
            only. 0 = off.
        subject_stop: when a request's search stops: ``"loss"`` once its mean target NLL is under
            0.05 (MEMIT's loop), ``"argmax"`` once every target token is the argmax in every copy
            (ENCORE's most-probable early stopping: no further push past what the edit needs).
        preserve_base: weight ``gamma`` of the generic keys' outputs of the *unedited* model. ``preserve``
            penalises each turn's own shift on generic text (``alpha ||dW||^2_E0``, MEMIT's term);
            this adds ``gamma ||D + dW||^2_E0``, the cumulative shift since the unedited model
            (``D = W - W_base``: earlier turns and this turn's earlier refinement steps), so the
            solve becomes ``(K^T K + lambda I + (alpha + gamma) E0 + ...) dW = K^T V - gamma E0 D``
            and each turn pulls back some of what earlier turns drifted on generic text instead of
            letting the drifts add up. Costs one ``d_in x d_in`` by ``d_in x d_out`` product and solve
            per module and step. 0 = off.
        subject_preserve: with ``subject_depth``, the modules below the split (editing at the
            subject) weigh the generic-text keys this many times as much: ``(alpha + gamma) E0``
            becomes ``subject_preserve (alpha + gamma) E0`` in their ridge (the pull-back's
            ``gamma E0 D`` is unchanged). Their change keyed on a subject's last token also reaches
            other subjects' last tokens, where CounterFact's neighbourhood is. 1 = off.
    """

    modules: list[str] | None = None
    preset: str | None = None
    lr: float = 1e-6
    ridge: float = 1.0
    capture_batch_size: int = 10
    forward_batch_size: int | None = 100
    normalizer: str = "paper"
    dtype: str = "float32"
    solver: str = "auto"
    lr_scale: str = "none"
    refine_steps: int = 1
    preserve: float = 0.0
    preserve_text: str = "package"
    memory: float = 0.0
    confidence: float = 0.0
    neighbours: int = 0
    neighbour_weight: float = 1.0
    prefixes: int = 0
    paraphrases: int = 0
    subject_keys: float = 0.0
    subject_depth: float = 0.0
    key_outliers: float = 0.0
    subject_steps: int = 0
    subject_optimise: int = 0
    subject_lr: float = 2.0
    subject_decay: float = 0.5
    subject_clamp: float = 0.75
    subject_kl: float = 0.0
    subject_contexts: int = 0
    subject_stop: str = "loss"
    preserve_base: float = 0.0
    subject_preserve: float = 1.0

    def __post_init__(self) -> None:
        if self.modules is not None:
            self.modules = list(self.modules)
            if not self.modules or not all(isinstance(m, str) and m for m in self.modules):
                raise ValueError("EditConfig.modules must be a non-empty list of module names")
            if len(set(self.modules)) != len(self.modules):
                raise ValueError(f"EditConfig.modules has duplicates: {self.modules}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"EditConfig.lr must be a positive finite number, got {self.lr}")
        if not (math.isfinite(self.ridge) and self.ridge > 0):
            raise ValueError(f"EditConfig.ridge must be a positive finite number, got {self.ridge}")
        if not (isinstance(self.capture_batch_size, int) and self.capture_batch_size >= 1):
            raise ValueError(f"EditConfig.capture_batch_size must be a positive int, got {self.capture_batch_size}")
        if self.forward_batch_size is not None and not (
            isinstance(self.forward_batch_size, int) and self.forward_batch_size >= 1
        ):
            raise ValueError(f"EditConfig.forward_batch_size must be a positive int or None, got {self.forward_batch_size}")
        if self.normalizer not in ("paper", "welford"):
            raise ValueError(f"EditConfig.normalizer must be 'paper' or 'welford', got {self.normalizer!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"EditConfig.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.solver not in ("auto", "dual", "primal"):
            raise ValueError(f"EditConfig.solver must be 'auto', 'dual' or 'primal', got {self.solver!r}")
        if self.lr_scale not in ("none", "width"):
            raise ValueError(f"EditConfig.lr_scale must be 'none' or 'width', got {self.lr_scale!r}")
        if not (isinstance(self.refine_steps, int) and self.refine_steps >= 1):
            raise ValueError(f"EditConfig.refine_steps must be a positive int, got {self.refine_steps!r}")
        if not (math.isfinite(self.preserve) and self.preserve >= 0):
            raise ValueError(f"EditConfig.preserve must be a finite number >= 0, got {self.preserve}")
        if not (isinstance(self.prefixes, int) and self.prefixes >= 0):
            raise ValueError(f"EditConfig.prefixes must be an int >= 0, got {self.prefixes!r}")
        if not (isinstance(self.paraphrases, int) and self.paraphrases >= 0):
            raise ValueError(f"EditConfig.paraphrases must be an int >= 0, got {self.paraphrases!r}")
        if not (isinstance(self.neighbours, int) and self.neighbours >= 0):
            raise ValueError(f"EditConfig.neighbours must be an int >= 0, got {self.neighbours!r}")
        if not (math.isfinite(self.neighbour_weight) and self.neighbour_weight >= 0):
            raise ValueError(f"EditConfig.neighbour_weight must be a finite number >= 0, got {self.neighbour_weight}")
        if not (0.0 <= self.confidence < 1.0):
            raise ValueError(f"EditConfig.confidence must be in [0, 1), got {self.confidence}")
        if not (math.isfinite(self.memory) and self.memory >= 0):
            raise ValueError(f"EditConfig.memory must be a finite number >= 0, got {self.memory}")
        if not (0.0 <= self.subject_depth <= 1.0):
            raise ValueError(f"EditConfig.subject_depth must be in [0, 1], got {self.subject_depth}")
        if not (math.isfinite(self.key_outliers) and self.key_outliers >= 0):
            raise ValueError(f"EditConfig.key_outliers must be a finite number >= 0, got {self.key_outliers}")
        if not (math.isfinite(self.subject_keys) and self.subject_keys >= 0):
            raise ValueError(f"EditConfig.subject_keys must be a finite number >= 0, got {self.subject_keys}")
        if not (isinstance(self.subject_steps, int) and 0 <= self.subject_steps < self.refine_steps):
            raise ValueError(f"EditConfig.subject_steps must be an int in [0, refine_steps), got {self.subject_steps!r}")
        if self.subject_steps and self.subject_depth <= 0:
            raise ValueError("EditConfig.subject_steps needs subject_depth > 0 (which modules edit at the subject)")
        if not (isinstance(self.subject_optimise, int) and self.subject_optimise >= 0):
            raise ValueError(f"EditConfig.subject_optimise must be an int >= 0, got {self.subject_optimise!r}")
        if self.subject_optimise and self.subject_depth <= 0:
            raise ValueError("EditConfig.subject_optimise needs subject_depth > 0 (which modules edit at the subject)")
        for name in ("subject_lr", "subject_clamp"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"EditConfig.{name} must be a positive finite number, got {getattr(self, name)}")
        if not (math.isfinite(self.subject_kl) and self.subject_kl >= 0):
            raise ValueError(f"EditConfig.subject_kl must be a finite number >= 0, got {self.subject_kl}")
        if self.preserve_text not in PRESERVE_TEXTS:
            raise ValueError(f"EditConfig.preserve_text must be one of {PRESERVE_TEXTS}, got {self.preserve_text!r}")
        if not (isinstance(self.subject_contexts, int) and self.subject_contexts >= 0):
            raise ValueError(f"EditConfig.subject_contexts must be an int >= 0, got {self.subject_contexts!r}")
        if not (math.isfinite(self.preserve_base) and self.preserve_base >= 0):
            raise ValueError(f"EditConfig.preserve_base must be a finite number >= 0, got {self.preserve_base}")
        if not (math.isfinite(self.subject_preserve) and self.subject_preserve > 0):
            raise ValueError(f"EditConfig.subject_preserve must be a finite number > 0, got {self.subject_preserve}")
        if self.subject_preserve != 1.0 and self.subject_depth <= 0:
            raise ValueError("EditConfig.subject_preserve needs subject_depth > 0 (which modules edit at the subject)")
        if self.subject_stop not in STOP_RULES:
            raise ValueError(f"EditConfig.subject_stop must be one of {STOP_RULES}, got {self.subject_stop!r}")
        if not (math.isfinite(self.subject_decay) and self.subject_decay >= 0):
            raise ValueError(f"EditConfig.subject_decay must be a finite number >= 0, got {self.subject_decay}")

    def module_lr(self, shape: tuple[int, int]) -> float:
        """The step size used for modules of shape ``(d_in, d_out)`` (see ``lr_scale``)."""
        if self.lr_scale == "none":
            return self.lr
        d_in, d_out = shape
        return self.lr * (LR_REFERENCE_SHAPE[0] * math.sqrt(LR_REFERENCE_SHAPE[1])) / (d_in * math.sqrt(d_out))

    @classmethod
    def recommended(cls, model: nn.Module, **overrides: Any) -> "EditConfig":
        """The configuration we recommend for ``model``: the MLP output projection from 13% to 87%
        of its depth, the lower 43% of the layers editing at the subject and the rest at the
        target, or the family preset where those modules' ``d_in x d_in`` statistics would exceed
        2 GiB (:func:`ultraedit.presets.recommended_preset`), the step size carried from the
        authors' lr by the module shapes (``lr_scale="width"``), refinement steps to a confidence
        margin, generic-text preserved keys, the memory of earlier turns' keys and 8 subject-swapped
        neighbours per request as preserved keys.
        Rules, not a per-checkpoint table (measured on SmolLM2-135M; see the README)."""
        fields: dict[str, Any] = dict(RECOMMENDED)
        preset = recommended_preset(model)
        fields["modules"] = resolve_modules(model, preset)
        if preset is preset_for(model):  # the family preset's modules (gate/up_proj for Llama)
            fields.update(RECOMMENDED_PRESET)
        fields.update(overrides)
        return cls(**fields)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def generic_weight(self) -> float:
        """``alpha + gamma`` (``preserve + preserve_base``): the weight of ``E0[k k^T]`` in the ridge;
        0 = no generic-text statistics are used."""
        return self.preserve + self.preserve_base

    @property
    def samples_text(self) -> bool:
        """Whether ``E0`` is taken over text the model samples itself (built on a model's first run,
        then read from the cache)."""
        return self.generic_weight > 0 and self.preserve_text in ("generated", "both")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EditConfig":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown EditConfig fields: {sorted(unknown)}")
        return cls(**data)


def options_summary() -> str:
    """What ``ultraedit presets`` prints about the configurations and the options beyond the paper."""
    recommended = ", ".join(f"{k}={v!r}" for k, v in RECOMMENDED.items())
    return "\n".join([
        "Configurations:",
        "  faithful     the authors' method: EditConfig() (lr 1e-6, ridge 1, the family preset); 'bench --faithful'",
        f"  recommended  EditConfig.recommended(model): the 'recommended' layers above at the model's depth, {recommended};",
        "               the default of 'ultraedit edit', 'serve', 'bench' and 'demo' for a model ('--faithful': the authors')",
        "Options beyond the paper (EditConfig fields; off by default):",
        "  lr_scale     'none' | 'width': lr per module x 4096*sqrt(14336)/(d_in*sqrt(d_out)) (carries the",
        "               authors' Llama-3-8B lr to other widths)",
        "  refine_steps most closed-form steps per turn; later steps re-capture gradients and edit only the",
        "               requests not yet right (the right ones preserved); stops when all are right",
        "  preserve     alpha of generic-text keys in the ridge: (K^T K + lambda I + alpha E0[k k^T])^-1 K^T V",
        "  preserve_text 'package' (data/generic.txt) | 'generated' (16,384 tokens the model samples, cached)",
        "               | 'both' (their mean): the text E0 is taken over",
        "  memory       beta of all earlier turns' keys in the ridge (+ beta sum_past K^T K; a d_in x d_in matrix",
        "               per module, saved with the state, undone by revert)",
        "  confidence   refinement keeps editing a request until each target token is the argmax with at least",
        "               this probability (0 = the argmax alone)",
        "  neighbours   per request with a subject, this many copies of its prompt with other subjects of the turn",
        "               are preserved keys (weight neighbour_weight): the edit should follow the subject",
        "  prefixes     each request is also edited behind this many generic-text sentences (context templates)",
        "  paraphrases  each request is also edited through up to this many rewordings of its prompt that the",
        "               model samples itself (few-shot, seeded by the request, filtered to name the subject)",
        "  subject_keys also edit at the subject's last token (ROME/MEMIT's key position), that row's value x this",
        "  subject_depth with subject_keys: modules in the lowest fraction of the layers edit only the subject",
        "               rows, the others only the target rows (the rest preserved)",
        "  key_outliers rows whose key norm is over this multiple of the turn's median are kept, not edited",
        "               (massive activations at attention-sink tokens)",
        "  subject_steps with subject_depth: the turn's first this many steps solve only the modules that edit at",
        "               the subject; the upper modules join after (the edit goes into the subject first)",
        "  subject_optimise with subject_depth: the first step's subject values are optimised (ROME/MEMIT's z:",
        "               this many Adam steps on the residual change at the subject, subject_lr, subject_decay,",
        "               ||delta|| <= subject_clamp ||h||), spread over the modules below the split",
        "  subject_kl   with subject_optimise: weight of KL(p0 || p) after '{subject} is a' in that search",
        "  subject_contexts with subject_optimise: that search also runs each prompt behind this many generic",
        "               sentences (context templates), one change for all",
        "  subject_stop 'loss' (NLL < 0.05) | 'argmax' (every target token the argmax): when a request's search stops",
        "  preserve_base gamma of the generic keys' outputs of the unedited model: + gamma ||D + dW||^2_E0, D the",
        "               shift of all earlier turns (earlier drift on generic text is pulled back)",
        "  subject_preserve with subject_depth: the modules below the split weigh E0 this many times as much",
        "               ((alpha + gamma) E0 -> subject_preserve (alpha + gamma) E0 in their ridge)",
    ])


@dataclass
class TurnReport:
    """What one turn did.

    Attributes:
        turn: 1-based number of this turn in the editor's lifetime.
        requests: sequences (edit requests) in the turn.
        rows: target-token rows captured per module (equal for all modules).
        shift_norms: Frobenius norm of each module's weight shift ``dW`` (intended).
        applied_norms: Frobenius norm of what the weights actually changed by (``W_after -
            W_before``, float32), after rounding to the weights' dtype.
        applied_fractions: how much of the intended shift the weights received: the projection
            ``<W_after - W_before, dW> / ||dW||^2`` (1.0 = all of it; bf16 weights that round a
            small shift away give ~0). Filled by :meth:`UltraEditor.commit`.
        loss: mean over minibatches of the pre-edit loss (mean CE over target tokens).
        seconds: wall-clock time of the turn; ``capture_seconds`` (first capture) and ``solve_seconds`` split it.
        steps: closed-form steps taken (1 unless ``EditConfig.refine_steps`` > 1).
        paraphrases: rewordings edited with the requests (``EditConfig.paraphrases``).
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


@dataclass
class PendingTurn:
    """Everything a turn will change, computed but not yet applied."""

    shifts: dict[str, torch.Tensor]  # name -> dW (d_in, d_out): float32 where it accumulates, else the weight's dtype
    normalizers: dict[tuple[int, int], LifelongNormalizer]
    report: TurnReport
    requests: Sequence[EditRequest] | None = None  # text requests (set by edit), for the edit log
    generation: int = 0  # the editor state it was prepared on (UltraEditor.generation)
    key_memory: dict[str, torch.Tensor] | None = None  # the memory after this turn (EditConfig.memory > 0)


def module_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an ``nn.Linear`` or GPT-2 ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"cannot edit a {type(module).__name__}: only nn.Linear and Conv1D layers")


def _write_weight(module: nn.Module, new: torch.Tensor) -> None:
    """Copy ``new`` into the module's weight (the one place a turn writes weights)."""
    with torch.no_grad():
        module.weight.copy_(new)


def in_out(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` between the module's weight layout and ``(d_in, d_out)``, either way: a transpose for
    ``nn.Linear`` (``(d_out, d_in)``), as is for GPT-2 ``Conv1D`` (which stores ``(d_in, d_out)``)."""
    return tensor if (Conv1D and isinstance(module, Conv1D)) else tensor.T


def apply_shift(module: nn.Module, shift: torch.Tensor, alpha: float = 1.0) -> None:
    """Add ``alpha * dW`` (``(d_in, d_out)``) to the module's weight, in its dtype and on its device."""
    weight = module.weight
    delta = in_out(module, shift)
    with torch.no_grad():
        weight.add_(delta.to(device=weight.device, dtype=weight.dtype), alpha=alpha)


def _unsolved_rows(
    batches: Sequence[dict[str, torch.Tensor]], captures: list[MinibatchCapture], confidence: float = 0.0
) -> list[torch.Tensor]:
    """Per minibatch, a bool per captured row (target token, or subject position): does its request still miss a target
    token (not the argmax, or with ``confidence`` > 0, probability below it)?"""
    out = []
    for batch, mb in zip(batches, captures):
        counts = (batch["labels"] != IGNORE).sum(1).tolist()
        done = mb.hits if confidence <= 0 else mb.hits & (mb.probs.to(mb.hits.device) >= confidence)
        missed = torch.stack([~h.all() for h in done.split(counts)])
        out.append(missed.repeat_interleave(key_mask(batch).sum(1).to(missed.device)))
    return out


def _applied(weight: torch.Tensor, new: torch.Tensor, shift: torch.Tensor) -> tuple[float, float]:
    """``(||new - weight||, <new - weight, shift> / ||shift||^2)`` in float32."""
    change = new.float() - weight.float()
    intended = shift.float()
    squared = float(intended.square().sum())
    fraction = float((change * intended).sum()) / squared if squared > 0 else 1.0
    return float(torch.linalg.vector_norm(change)), fraction


class UltraEditor:
    """Lifelong UltraEdit editor wrapped around a Hugging Face causal LM.

    Args:
        model: the causal LM to edit in place (CPU or CUDA, any float dtype).
        config: hyperparameters; default :class:`EditConfig` with the model family's preset.
        tokenizer: needed by :meth:`edit` (text requests), not by :meth:`edit_tokens`.
        keep_turn_deltas: how many recent turns :meth:`revert_last` can undo (0 = none); each
            kept turn costs one CPU copy of the edit modules' weights in the model dtype.
        delta_accumulation: how shifts reach bf16/fp16 weights. ``"float32"`` (default): the
            cumulative shift ``W - W_base`` is kept in float32 (on the weights' device; twice the
            bf16 size of the edit modules) and the weights are rewritten as ``round(W_base +
            delta)`` each turn, so no part of any turn is lost to rounding. ``"weights"``: each
            turn's shift is rounded and added to the weights (what earlier versions did; a shift
            below half a rounding step of a weight is lost, with a :class:`LostShiftWarning`).
            float32/float64 weights always take ``W += dW``.

    Attributes:
        modules: edit modules by dotted name, in config order.
        normalizers: one :class:`LifelongNormalizer` per module shape ``(d_in, d_out)``, of width
            ``d_in + d_out``.
        turns, edits: counters over the editor's lifetime.
        generation: changes at every commit and revert; a :class:`PendingTurn` is valid only on
            the generation it was prepared on.
    """

    def __init__(
        self,
        model: nn.Module,
        config: EditConfig | None = None,
        tokenizer: Any = None,
        *,
        keep_turn_deltas: int = 0,
        delta_accumulation: str = "float32",
    ) -> None:
        if delta_accumulation not in DELTA_ACCUMULATIONS:
            raise ValueError(f"delta_accumulation must be 'float32' or 'weights', got {delta_accumulation!r}")
        self.delta_accumulation = delta_accumulation
        self.model = model
        self.config = config = config or EditConfig()
        self.tokenizer = tokenizer
        try:
            names = config.modules if config.modules is not None else resolve_modules(model, config.preset)
        except (KeyError, ValueError) as err:  # unknown preset, or one that does not fit this model
            raise EditError(err.args[0] if err.args else str(err)) from None
        available = dict(model.named_modules())
        self.modules: dict[str, nn.Module] = {}
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
            self.modules[name] = available[name]
        self._check_subject_modules()
        self.normalizers: dict[tuple[int, int], LifelongNormalizer] = {}
        for name, module in self.modules.items():
            shape = module_shape(module)
            if shape not in self.normalizers:
                self.normalizers[shape] = LifelongNormalizer(
                    sum(shape), formula=config.normalizer, dtype=config.torch_dtype, device=module.weight.device
                )
        # Generic-text key moments (preserve or preserve_base > 0) are taken on the model as given,
        # i.e. the base model (state.load builds the editor before applying the saved shift), so a
        # resumed session solves with the same moments as the uninterrupted one.
        self._moments: dict[str, torch.Tensor] | None = None
        if config.generic_weight > 0 and tokenizer is not None:
            self._generic_moments()
        # EditConfig.memory > 0: per module, the sum of K^T K over all committed turns (empty = zero).
        self.key_memory: dict[str, torch.Tensor] = {}
        self.turns = 0
        self.edits = 0
        self.generation = 0
        from .state import EditSession  # saved state, edit log and undo (state.py)

        self.session = EditSession(self, keep_turn_deltas=keep_turn_deltas)

    # ------------------------------------------------------------------ public API
    def edit(self, requests: Sequence[EditRequest]) -> TurnReport:
        """Apply one turn of text edit requests.

        Requests are tokenized with teacher forcing, sorted by length (longest first) and cut
        into minibatches of ``config.capture_batch_size``, as the authors do. With
        ``config.prefixes`` the turn also edits each request behind context prefixes
        (:func:`ultraedit.neighbours.with_prefixes`), with ``config.paraphrases`` through the
        model's own rewordings (:func:`ultraedit.paraphrase.paraphrases`, sampled before anything
        changes); the report counts the requests given.
        """
        if self.tokenizer is None:
            raise EditError("UltraEditor.edit needs a tokenizer: UltraEditor(model, config, tokenizer=...)")
        if not requests:
            raise EditError("a turn needs at least one edit request")
        sequences, owners, reworded = self._sequences(requests)
        batches, order = minibatches(
            self.tokenizer, sequences, self.config.capture_batch_size, subjects=self.config.subject_keys > 0
        )
        essence, contexts = self._search_inputs(sequences, order, batches)
        order = [owners[i] for i in order]  # a prefixed copy is named by its request
        pending = self.prepare(batches, order=order, preserved=self._neighbour_grams(requests), essence=essence,
                               contexts=contexts)
        pending.requests = requests
        pending.report.requests = len(requests)
        pending.report.paraphrases = reworded
        self.commit(pending)
        return pending.report

    def _sequences(self, requests: Sequence[EditRequest]) -> tuple[list[EditRequest], list[int], int]:
        """The turn's sequences, their owners (indices in ``requests``) and how many are rewordings:
        the requests, their context-prefixed copies and their rewordings."""
        sequences, owners = with_prefixes(requests, self.config.prefixes)
        if self.config.paraphrases <= 0:
            return sequences, owners, 0
        try:
            reworded = paraphrases(self.model, self.tokenizer, requests, self.config.paraphrases)
        except ValueError as err:
            raise EditError(str(err)) from None
        copies, owned = with_copies(requests, reworded)
        return sequences + copies[len(requests):], owners + owned[len(requests):], len(copies) - len(requests)

    def _search_inputs(
        self, sequences: Sequence[EditRequest], order: list[int], batches: list[dict[str, torch.Tensor]]
    ) -> tuple[list[dict[str, torch.Tensor]] | None, list[dict[str, torch.Tensor]] | None]:
        """``(essence, contexts)`` of the subject search, per minibatch and row for row (``order``: the
        sequences in minibatch order, as :func:`minibatches` returns it): the essence prompts
        (``subject_kl``) and the context copies (``subject_contexts``); ``None`` for an option off."""
        config = self.config
        if config.subject_optimise <= 0 or (config.subject_kl <= 0 and config.subject_contexts <= 0):
            return None, None
        rows = iter(order)  # the batches' rows, in order
        requests = [[sequences[next(rows)] for _ in range(len(b["input_ids"]))] for b in batches]
        device = self._device()

        def placed(made: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
            return [{k: t.to(device) for k, t in b.items()} for b in made]

        essence = contexts = None
        if config.subject_kl > 0:
            essence = placed(essence_batches(self.tokenizer, [[subject_of(r) for r in rs] for rs in requests]))
        if config.subject_contexts > 0:
            contexts = placed(context_batches(self.tokenizer, requests, config.subject_contexts))
        return essence, contexts

    def edit_tokens(self, batches: Sequence[dict[str, torch.Tensor]]) -> TurnReport:
        """Apply one turn given pre-tokenized minibatches.

        Args:
            batches: minibatches, each a dict of ``(B, L)`` integer tensors ``input_ids``,
                ``attention_mask`` and ``labels`` (-100 outside target tokens; ``labels[i]`` is
                the token the logits at position ``i`` predict). The normalizer is updated once
                per minibatch, in the order given; the solve uses all rows of the turn. A
                minibatch may also carry ``subject_index`` (``(B,)``, -1 for none): each such
                position adds a subject row (:func:`ultraedit.batching.subject_position` finds
                it), weighted by ``subject_keys`` when that is set and by 1 otherwise; giving
                the index is the request for those rows, ``subject_depth`` splits the roles.
        """
        pending = self.prepare(batches)
        self.commit(pending)
        return pending.report

    def prepare(
        self,
        batches: Sequence[dict[str, torch.Tensor]],
        order: Sequence[int] | None = None,
        preserved: dict[str, torch.Tensor] | None = None,
        essence: list[dict[str, torch.Tensor]] | None = None,
        contexts: list[dict[str, torch.Tensor]] | None = None,
    ) -> PendingTurn:
        """Compute a turn's shifts and updated statistics without changing anything.

        ``preserved`` (module name -> ``(d_in, d_in)``) is added to this turn's ridge systems;
        ``essence``: the minibatches' essence prompts (``subject_kl``); ``contexts``: their context
        copies (``subject_contexts``)."""
        start = time.perf_counter()
        batches = self._validate(batches, order)
        captures = self._capture(batches, order)
        captured = time.perf_counter()

        # Step 3: lifelong normalizer, fed one minibatch at a time, modules in config order.
        normalizers = {shape: norm.clone() for shape, norm in self.normalizers.items()}
        for mb in captures:
            for name, module in self.modules.items():
                normalizers[module_shape(module)].update(torch.cat((mb.keys[name], mb.grads[name]), -1))

        # Steps 4-6 (plus refinement steps when configured).
        preserve = self._preserved(normalizers, preserved)
        subject_values = self._subject_values(batches, essence, contexts)
        if self.config.refine_steps == 1:
            shifts = self._solve(captures, normalizers, out_dtype="weights", preserve=preserve,
                                 subject_values=subject_values)
            steps = 1
        else:
            shifts, steps = self._refine(batches, order, captures, normalizers, preserve, subject_values)
        bad = [n for n, m in self.modules.items() if not bool(torch.isfinite(shifts[n].to(m.weight.dtype)).all())]
        if bad:
            raise EditError(
                f"the weight shift of {bad} is not finite in the weights' dtype (lr too large?); nothing was applied"
            )
        done = time.perf_counter()
        rows = sum(mb.rows for mb in captures)
        requests = sum(b["input_ids"].shape[0] for b in batches)
        report = TurnReport(
            turn=self.turns + 1,
            requests=requests,
            rows={n: rows for n in self.modules},
            shift_norms={n: float(torch.linalg.vector_norm(shifts[n], dtype=torch.float32)) for n in self.modules},
            loss=sum(mb.loss for mb in captures) / len(captures),
            seconds=done - start,
            capture_seconds=captured - start,
            solve_seconds=done - captured,
            order=list(order) if order is not None else list(range(requests)),
            steps=steps,
        )
        memory = self._memory_after(captures) if self.config.memory > 0 else None
        return PendingTurn(shifts=shifts, normalizers=normalizers, report=report, generation=self.generation,
                           key_memory=memory)

    def _memory_after(self, captures: list[MinibatchCapture]) -> dict[str, torch.Tensor]:
        """The key memory with this turn's keys (as captured before the turn's shift) added."""
        dtype = self.config.torch_dtype
        memory = {}
        for name, module in self.modules.items():
            keys = torch.cat([mb.keys[name] for mb in captures]).to(module.weight.device, dtype)
            gram = keys.T @ keys
            memory[name] = gram + self.key_memory[name] if name in self.key_memory else gram
        return memory

    def _capture(self, batches: list[dict[str, torch.Tensor]], order: Sequence[int] | None) -> list[MinibatchCapture]:
        captures = capture(self.model, self.modules, batches, forward_batch_size=self.config.forward_batch_size)
        self._check_finite(captures, order, [b["input_ids"].shape[0] for b in batches])
        return captures

    def _solve(
        self,
        captures: list[MinibatchCapture],
        normalizers: dict[tuple[int, int], LifelongNormalizer],
        edited: list[torch.Tensor] | None = None,
        out_dtype: str = "compute",
        preserve: dict[tuple[int, int], Preserved | None] | None = None,
        lower_only: bool = False,
        subject_values: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Steps 4-6 for every module, batched over modules of equal shape (they have the same rows).

        ``edited`` (per minibatch, a bool per captured row) restricts the edit to those rows; the
        other rows' keys are preserved (added to the ridge, as rows whose value is 0).
        ``preserve``: per module shape, the turn's preserved-key term (:meth:`_preserved`).
        ``lower_only`` (``subject_steps``): the modules above ``subject_depth`` edit no row.
        ``out_dtype="weights"`` returns each shift in its weight's dtype, else in the compute dtype.
        """
        shifts: dict[str, torch.Tensor] = {}
        dtype = self.config.torch_dtype
        select = torch.cat(edited) if edited is not None else None
        subject_rows = torch.cat([mb.subject for mb in captures])  # per row: at a subject position?
        for shape, norm in normalizers.items():
            group = self._group(shape)
            keys = torch.stack([torch.cat([mb.keys[n] for mb in captures]).to(norm.device, dtype) for n in group])
            grads = torch.stack([torch.cat([mb.grads[n] for mb in captures]).to(norm.device, dtype) for n in group])
            outliers = self._outlier_rows(keys)
            subject = subject_rows.to(keys.device)
            kept = None
            if select is not None:
                sel = select.to(keys.device)
                keys, grads, kept = keys[:, sel], grads[:, sel], keys[:, ~sel]
                outliers = outliers[:, sel] if outliers is not None else None
                subject = subject[sel]
            values = target_values(keys, grads, norm, self.config.module_lr(shape))
            if self.config.subject_keys not in (0.0, 1.0):
                values = values * torch.where(subject, self.config.subject_keys, 1.0).to(values.dtype)[:, None]
            lower = self._lower(group)
            if subject_values is not None and bool(lower.any()):  # subject_optimise: delta / n in each
                # of the n modules below the split (all shapes: together they add delta to the residual)
                spread = subject_values.to(values.device, values.dtype) / len(self._subject_modules())
                values[:, subject] = torch.where(lower[:, None, None].to(values.device), spread, values[:, subject])
            if outliers is not None:
                values = values.masked_fill(outliers[..., None], 0.0)
            if self.config.subject_depth > 0:
                values = values.masked_fill(self._rows_left_alone(group, subject, lower_only)[..., None], 0.0)
            if kept is not None and kept.shape[-2] > 0:  # rows already right: preserved, value 0
                keys = torch.cat((keys, kept), -2)
                values = torch.cat((values, values.new_zeros(*kept.shape[:-1], values.shape[-1])), -2)
            # Held in the dtype commit adds them in: float32 where they accumulate into the float32
            # delta; otherwise the weights' dtype (bit-identical weights, half the memory for bf16).
            shift_dtypes = {self._shift_dtype(self.modules[n]) for n in group}
            single = shift_dtypes.pop() if len(shift_dtypes) == 1 else None
            target = single if out_dtype == "weights" else None
            terms = (preserve or {}).get(shape)
            pull = self._pull_back(group, terms) if self.config.preserve_base > 0 else None
            if pull is None:
                solved = ridge_solve(keys, values, self.config.ridge, self.config.solver, target, terms)
            else:  # (K^T K + A) dW = K^T V + A u  <=>  dW = ridge_solve(K, V - K u) + u
                pull = pull.to(keys.device, keys.dtype)
                solved = ridge_solve(keys, values - keys @ pull, self.config.ridge, self.config.solver, None, terms)
                solved = solved + pull if target is None else (solved + pull).to(target)
            for name, shift in zip(group, solved):
                shifts[name] = shift
        return shifts

    def _pull_back(self, group: list[str], terms: Preserved | None) -> torch.Tensor | None:
        """``preserve_base``: ``u = -A^-1 gamma E0 D`` per module of ``group`` (``A = lambda I +``
        the preserved terms, ``D = W - W_base`` in ``(d_in, d_out)``, the shift so far of this turn
        included), ``(modules, d_in, d_out)``; ``None`` while nothing has moved. One module at a
        time, so that only one ``D`` and one product are held besides the result."""
        assert terms is not None  # preserve_base > 0 puts gamma E0 in it
        dtype, factor = self.config.torch_dtype, terms.factor()
        pulls, moved = [], False
        for i, name in enumerate(group):
            module = self.modules[name]
            base = self.session.base[name].to(module.weight.device, torch.float32)
            drift = in_out(module, module.weight.detach().float() - base)
            if not bool(drift.any()):
                pulls.append(torch.zeros_like(drift, dtype=dtype))
                continue
            moved = True
            moment = self._generic_moments()[name].to(dtype)
            rhs = -self.config.preserve_base * (moment @ drift.to(moment.device, dtype))
            if factor is not None:
                pulls.append(torch.cholesky_solve(rhs, factor[i].to(rhs.device, dtype)))
            else:
                system = terms.matrix[i].to(rhs.device, dtype).clone()
                system.diagonal().add_(terms.ridge)
                pulls.append(torch.linalg.solve(system, rhs))
        return torch.stack(pulls) if moved else None

    def _subject_values(
        self, batches: list[dict[str, torch.Tensor]], essence: list[dict[str, torch.Tensor]] | None = None,
        contexts: list[dict[str, torch.Tensor]] | None = None,
    ) -> torch.Tensor | None:
        """``subject_optimise``: the optimised residual change of every subject row, ``(subject rows,
        hidden)`` in row order, after the top module below ``subject_depth`` (``None`` when off or
        when the turn has no subject rows)."""
        if self.config.subject_optimise <= 0 or not any(SUBJECT_INDEX in b for b in batches):
            return None
        names = self._subject_modules()
        if not names:
            raise EditError(f"subject_optimise: no edit module lies below subject_depth {self.config.subject_depth}")
        start = max(map(layer_index, names)) + 1  # the layer above the top module that edits at the subject
        config = self.config
        deltas = subject_deltas(self.model, start, batches, config.subject_optimise, config.subject_lr,
                                config.subject_decay, config.subject_clamp, essence, config.subject_kl,
                                contexts, config.subject_stop)
        return torch.cat([d[b[SUBJECT_INDEX] >= 0] for d, b in zip(deltas, batches) if SUBJECT_INDEX in b])

    def _check_subject_modules(self) -> None:
        """``subject_optimise`` writes a change of the residual stream, so every module below
        ``subject_depth`` must write the residual stream (output width = the hidden size)."""
        if self.config.subject_optimise <= 0:
            return
        width = self.model.get_input_embeddings().weight.shape[1]
        for name in self._subject_modules():
            if module_shape(self.modules[name])[1] != width:
                raise EditError(
                    f"subject_optimise: edit module {name!r} lies below subject_depth {self.config.subject_depth} "
                    f"but writes {module_shape(self.modules[name])[1]} features, not the residual stream's {width}: "
                    "edit at the subject with modules that write the residual stream (MLP down/output or "
                    "attention output projections)")

    def _subject_modules(self) -> list[str]:
        """The edit modules below ``subject_depth`` (those that edit at the subject), in config order."""
        return [n for n, low in zip(self.modules, self._lower(list(self.modules)).tolist()) if low]

    def _lower(self, group: list[str]) -> torch.Tensor:
        """Per module of ``group``, is it below ``subject_depth`` (does it edit at the subject)?"""
        split = self.config.subject_depth * num_layers(self.model)
        return torch.tensor([layer_index(name) < split for name in group])

    def _group(self, shape: tuple[int, int]) -> list[str]:
        """The edit modules of one ``(d_in, d_out)`` shape, in config order (solved together)."""
        return [n for n, m in self.modules.items() if module_shape(m) == shape]

    def _outlier_rows(self, keys: torch.Tensor) -> torch.Tensor | None:
        """``(modules, rows)`` bool: keys longer than ``key_outliers`` x their module's median (or ``None``)."""
        if self.config.key_outliers <= 0:
            return None
        norms = torch.linalg.vector_norm(keys, dim=-1)
        return norms > self.config.key_outliers * norms.median(dim=-1, keepdim=True).values

    def _rows_left_alone(self, group: list[str], subject: torch.Tensor, lower_only: bool = False) -> torch.Tensor:
        """``(modules, rows)`` bool (``subject_depth``): target rows in the modules below the
        split, subject rows in those above it (``subject``: per row, is it a subject row?);
        ``lower_only``: every row in the modules above it."""
        lower = self._lower(group).to(subject.device)
        upper_rows = torch.ones_like(subject) if lower_only else subject
        return torch.where(lower[:, None], ~subject[None, :], upper_rows[None, :])

    def _preserved(
        self, normalizers: dict[tuple[int, int], LifelongNormalizer], preserved: dict[str, torch.Tensor] | None = None
    ) -> dict[tuple[int, int], Preserved | None]:
        """Per module shape, the ridge's preserved-key term of the turn: ``alpha E0[k k^T]`` (generic
        text; ``(alpha + gamma) E0`` with ``preserve_base``), ``beta M`` (earlier turns' keys) and the
        turn's own ``preserved`` terms (neighbours); ``None`` for none. One :class:`Preserved` per shape, so refinement steps factor it once."""
        out: dict[tuple[int, int], Preserved | None] = {}
        for shape in normalizers:
            group = self._group(shape)
            terms = []
            generic = self.config.generic_weight  # alpha ||dW||^2_E0 + gamma ||D + dW||^2_E0
            if generic > 0:
                moments = torch.stack([self._generic_moments()[n] for n in group])
                lower = self._lower(group).tolist()
                scale = torch.tensor([self.config.subject_preserve if low else 1.0 for low in lower],
                                     dtype=moments.dtype, device=moments.device)
                terms.append(generic * (scale[:, None, None] * moments))
            if self.config.memory > 0 and self.key_memory:
                terms.append(self.config.memory * torch.stack([self.key_memory[n] for n in group]))
            if preserved:
                terms.append(torch.stack([preserved[n] for n in group]))
            out[shape] = Preserved(sum(terms[1:], terms[0]), self.config.ridge) if terms else None
        return out

    def _neighbour_grams(self, requests: Sequence[EditRequest]) -> dict[str, torch.Tensor] | None:
        """``neighbour_weight * N^T N`` per module for a turn's text requests (``neighbours`` > 0)."""
        if self.config.neighbours <= 0 or self.config.neighbour_weight <= 0:
            return None
        pairs = neighbour_pairs(requests, self.config.neighbours)
        if not pairs:
            return None
        grams = neighbour_grams(self.model, self.tokenizer, self.modules, pairs, dtype=self.config.torch_dtype)
        return {n: self.config.neighbour_weight * g.to(self.modules[n].weight.device) for n, g in grams.items()}

    def _generic_moments(self) -> dict[str, torch.Tensor]:
        """``E0[k k^T]`` per edit module over ``preserve_text`` (computed once)."""
        if self._moments is None:
            if self.tokenizer is None:
                raise EditError("EditConfig.preserve or preserve_base > 0 needs the tokenizer: UltraEditor(model, config, tokenizer=...)")
            from .covariance import second_moments
            from .preserve import key_moments

            dtype, source = self.config.torch_dtype, self.config.preserve_text
            parts = []
            if source in ("package", "both"):
                parts.append(key_moments(self.model, self.tokenizer, self.modules, dtype=dtype))
            if source in ("generated", "both"):
                generated, _ = second_moments(self.model, self.tokenizer, list(self.modules),
                                              progress=sys.stderr.isatty())  # once per model (cached)
                parts.append({n: m.to(self.modules[n].weight.device, dtype) for n, m in generated.items()})
            self._moments = {n: sum(p[n] for p in parts) / len(parts) for n in self.modules}
        return self._moments

    def _refine(
        self,
        batches: list[dict[str, torch.Tensor]],
        order: Sequence[int] | None,
        captures: list[MinibatchCapture],
        normalizers: dict[tuple[int, int], LifelongNormalizer],
        preserve: dict[tuple[int, int], Preserved | None] | None = None,
        subject_values: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Refinement steps: apply the shift so far, capture again, solve again for the requests
        not yet right (the right ones preserved), until all are right or ``refine_steps`` steps.
        The weights are restored before returning; the shifts are the sum of the steps'.
        ``subject_values`` (``subject_optimise``) are the first step's subject values."""
        subject_first = self.config.subject_steps
        total = self._solve(captures, normalizers, preserve=preserve, lower_only=subject_first >= 1,
                            subject_values=subject_values)
        steps = 1
        saved = {n: m.weight.detach().clone() for n, m in self.modules.items()}
        try:
            while steps < self.config.refine_steps:
                for name, module in self.modules.items():
                    with torch.no_grad():
                        module.weight.copy_(saved[name])
                    apply_shift(module, total[name])
                captures = self._capture(batches, order)
                wrong = _unsolved_rows(batches, captures, self.config.confidence)
                if not any(bool(w.any()) for w in wrong):
                    break
                step = self._solve(captures, normalizers, edited=wrong, preserve=preserve,
                                   lower_only=steps < subject_first)
                total = {n: total[n] + step[n] for n in total}
                steps += 1
        finally:
            with torch.no_grad():
                for name, module in self.modules.items():
                    module.weight.copy_(saved[name])
        return {n: total[n].to(self._shift_dtype(self.modules[n])) for n in total}, steps

    def commit(self, pending: PendingTurn) -> None:
        """Apply a prepared turn: add every shift to its weight and adopt the new statistics.

        All or nothing: if writing any module's weight fails (out of memory, a device error), the
        modules already written are restored and the error is raised with the editor unchanged.
        A pending turn is valid only on the exact state it was prepared on: after any other commit
        or a revert since, it raises :class:`EditError` (its statistics would replace newer ones).
        """
        if pending.generation != self.generation:
            raise EditError(
                f"this pending turn was prepared as turn {pending.report.turn}, but the editor is at turn "
                f"{self.turns} and changed since (a turn was committed or reverted); prepare it again"
            )
        undo = self.session.before_commit()
        self._write_shifts(pending.shifts, pending.report)
        self.normalizers = pending.normalizers
        if pending.key_memory is not None:
            self.key_memory = pending.key_memory
        self.turns += 1
        self.edits += pending.report.requests
        self.generation += 1
        self.session.after_commit(pending, undo)
        self._warn_if_lost(pending.report)

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
                shift = in_out(module, shifts[name])
                shift = shift.to(weight.device)
                new, delta = self._new_weight(name, module, shift)
                if not bool(torch.isfinite(new).all()):
                    raise EditError(f"the new weight of {name!r} is not finite in {weight.dtype}; nothing was applied")
                report.applied_norms[name], report.applied_fractions[name] = _applied(weight, new, shift)
                if delta is None:  # an accumulating module's old weight is round(base + old delta)
                    previous[name] = weight.to("cpu", copy=True)
                _write_weight(module, new)
                written.append(name)
                if delta is not None:
                    deltas[name] = delta
        except BaseException:
            for name in reversed(written):
                self._restore_weight(name, previous.get(name))
            report.applied_norms.clear()
            report.applied_fractions.clear()
            raise
        self.session.delta.update(deltas)

    def _restore_weight(self, name: str, previous: torch.Tensor | None) -> None:
        """Undo a write of this turn: ``previous`` (a copy), or ``round(base + delta)`` as before it."""
        module = self.modules[name]
        if previous is None:
            previous = self._rounded_base_plus(name, self.session.delta.get(name))
        _write_weight(module, previous.to(module.weight.device))

    def _warn_if_lost(self, report: TurnReport) -> None:
        lost = {n: f for n, f in report.applied_fractions.items() if f < LOST_FRACTION and not self.accumulates(self.modules[n])}
        if lost:
            worst = min(lost, key=lost.__getitem__)
            dtype = str(self.modules[worst].weight.dtype).removeprefix("torch.")
            warnings.warn(
                f"turn {report.turn}: most of the weight shift was lost to {dtype} rounding in {len(lost)} of "
                f"{len(self.modules)} edit modules (worst {worst}: {lost[worst]:.0%} applied); "
                "UltraEditor(..., delta_accumulation='float32'), the default, keeps it",
                LostShiftWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ saved state (state.py)
    def save(self, directory: str | os.PathLike[str], *, delta_dtype: str = "float32") -> Path:
        """Save the session atomically to ``directory`` (see :func:`ultraedit.state.save`)."""
        from .state import save

        return save(self, directory, delta_dtype=delta_dtype)

    @classmethod
    def load(
        cls, model: nn.Module, directory: str | os.PathLike[str], tokenizer: Any = None, *, keep_turn_deltas: int | None = None
    ) -> "UltraEditor":
        """Resume a saved session on a freshly loaded base ``model`` (see :func:`ultraedit.state.load`)."""
        from .state import load

        return load(model, directory, tokenizer, keep_turn_deltas=keep_turn_deltas)

    def revert_last(self, k: int = 1) -> "RevertReport":
        """Undo the last ``k`` turns exactly (see :func:`ultraedit.state.revert_last`)."""
        from .state import revert_last

        return revert_last(self, k)

    # ------------------------------------------------------------------ checks
    def _device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def _validate(
        self, batches: Sequence[dict[str, torch.Tensor]], order: Sequence[int] | None
    ) -> list[dict[str, torch.Tensor]]:
        if not batches:
            raise EditError("a turn needs at least one minibatch")
        vocab = self.model.get_input_embeddings().weight.shape[0]
        device = self._device()
        out = []
        seq = 0
        for b, batch in enumerate(batches):
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
                    raise EditError(
                        f"minibatch {b}: '{k}' has shape {tuple(t.shape)}, expected 2-D {tuple(shape)} like 'input_ids'"
                    )
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
            for row in range(shape[0]):
                if not bool(targets[row].any()):
                    who = f"request {order[seq + row]}" if order is not None else f"row {row}"
                    raise EditError(f"minibatch {b}, {who}: empty target (no label other than -100)")
            if SUBJECT_INDEX in batch:
                tensors[SUBJECT_INDEX] = self._subject_index(b, batch[SUBJECT_INDEX], mask)
            seq += shape[0]
            out.append({k: t.to(device=device, dtype=torch.long) for k, t in tensors.items()})
        return out

    @staticmethod
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

    def _check_finite(
        self, captures: list[MinibatchCapture], order: Sequence[int] | None, sizes: list[int]
    ) -> None:
        first = 0
        for b, (mb, size) in enumerate(zip(captures, sizes)):
            for name in self.modules:
                for kind, rows in (("keys", mb.keys[name]), ("gradients", mb.grads[name])):
                    if not bool(torch.isfinite(rows).all()):
                        who = (
                            f"requests {sorted(order[first : first + size])}" if order is not None else f"rows 0..{size - 1}"
                        )
                        raise EditError(
                            f"non-finite {kind} at module {name!r} in minibatch {b} ({who}); nothing was applied"
                        )
            first += size

    def __repr__(self) -> str:
        return (
            f"UltraEditor({type(self.model).__name__}, modules={len(self.modules)}, "
            f"turns={self.turns}, edits={self.edits}, lr={self.config.lr})"
        )
