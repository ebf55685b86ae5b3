"""What the baselines share: where a model's layers and MLP output projections are, the
teacher-forced encoding of a turn with each request's key position, weight updates in
``(d_out, d_in)`` orientation, and :class:`Tail`, which runs a model from one decoder layer on.

Every baseline here edits (or wraps) the MLP output projection of a decoder layer
(``mlp.down_proj``, GPT-J ``mlp.fc_out``, GPT-2 ``mlp.c_proj``), as the published methods do.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..batching import IGNORE, EditRequest, collate, pad_id_of, tokenize_pair
from ..bench import BenchError
from ..presets import MLP_OUTPUTS, num_layers



class MethodError(BenchError):
    """A baseline cannot run as configured (unknown option, module it cannot edit)."""


# --------------------------------------------------------------------------- model anatomy
def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(dotted name, ModuleList)`` of the model's decoder layers (the list as long as the config says)."""
    depth = num_layers(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth and re.search(r"(^|\.)(layers|h)$", name):
            return name, module
    raise MethodError(f"cannot find the {depth} decoder layers of {type(model).__name__}")


def mlp_out_name(model: nn.Module, layer: int) -> str:
    """Dotted name of decoder layer ``layer``'s MLP output projection."""
    prefix, layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise MethodError(f"layer {layer} out of range: the model has {len(layers)} layers")
    names = dict(layers[layer].named_modules())
    for suffix in MLP_OUTPUTS:
        if suffix in names:
            return f"{prefix}.{layer}.{suffix}"
    raise MethodError(f"layer {layer} has no MLP output projection ({', '.join(MLP_OUTPUTS)})")


def layer_of(model: nn.Module, module_name: str) -> int:
    """The decoder layer index of an MLP output projection given by name (as ``--modules`` passes it)."""
    prefix, layers = decoder_layers(model)
    match = re.fullmatch(rf"{re.escape(prefix)}\.(\d+)\.(?:{'|'.join(map(re.escape, MLP_OUTPUTS))})", module_name)
    if not match or int(match.group(1)) >= len(layers):
        raise MethodError(f"{module_name!r} is not an MLP output projection of a decoder layer "
                          f"(e.g. {mlp_out_name(model, 0)})")
    return int(match.group(1))


def one_layer_params(model: nn.Module, config: Any, params: Any, method: str, lr_field: str) -> Any:
    """A one-layer method's (FT-M, GRACE) dataclass ``params`` from the bench's ``config``:
    ``--method-option KEY=VALUE``, then ``--lr`` into ``lr_field``, then the layer of ``--modules
    NAME``. ``--preset`` or several modules are errors."""
    params = apply_options(params, getattr(config, "method_options", None), method)
    if config.lr is not None:
        setattr(params, lr_field, config.lr)
    if config.preset is not None:
        raise MethodError(f"{method} edits one layer: pass --modules NAME instead of --preset")
    if config.modules:
        if len(config.modules) != 1:
            raise MethodError(f"{method} edits exactly one module, got {len(config.modules)}")
        params.layer = layer_of(model, config.modules[0])
    return params


def one_layer_module(model: nn.Module, params: Any, published: int) -> tuple[str, nn.Module]:
    """``(name, module)`` of the MLP output projection a one-layer method edits; ``params.layer``
    -1 becomes the ``published`` layer of a 32-layer model, scaled to ``model``'s depth."""
    if params.layer < 0:
        params.layer = scaled_layers([published], 32, num_layers(model))[0]
    name = mlp_out_name(model, params.layer)
    return name, model.get_submodule(name)


def scaled_layers(published: Sequence[int], published_depth: int, depth: int) -> list[int]:
    """A published layer choice moved proportionally to a model of another depth (deduplicated)."""
    out: list[int] = []
    for layer in published:
        scaled = min(depth - 1, round(layer * depth / published_depth))
        if scaled not in out:
            out.append(scaled)
    return out


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as ``(d_out, d_in)`` (nn.Linear stores it so; GPT-2's Conv1D stores the transpose)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


@torch.no_grad()
def add_update(module: nn.Module, delta_out_in: torch.Tensor) -> None:
    """``W += delta`` with ``delta`` given as ``(d_out, d_in)``, in the weight's dtype."""
    weight_out_in(module).add_(delta_out_in.to(module.weight.dtype))


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last decoder layer and the LM head."""
    prefix, _ = decoder_layers(model)
    parent = model.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else model
    for attr in ("norm", "ln_f", "final_layernorm"):
        module = getattr(parent, attr, None)
        if isinstance(module, nn.Module):
            return module
    raise MethodError(f"cannot find the final norm of {type(model).__name__}")


# --------------------------------------------------------------------------- options
def apply_options(params: Any, options: dict[str, Any] | None, method: str) -> Any:
    """Set dataclass ``params`` fields from ``--method-option KEY=VALUE`` strings (type from the default)."""
    known = {f.name: f for f in fields(params)}
    for key, raw in (options or {}).items():
        if key not in known:
            raise MethodError(f"{method} has no option {key!r}; options: {', '.join(sorted(known))}")
        default = getattr(params, key)
        try:
            value = _convert(raw, default)
        except ValueError:
            raise MethodError(f"{method} option {key}: cannot read {raw!r} as {type(default).__name__}") from None
        setattr(params, key, value)
    return params


def _convert(raw: Any, default: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    if isinstance(default, bool):
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(raw)
        return raw.lower() in ("1", "true", "yes")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    if isinstance(default, (list, tuple)):
        return [int(x) for x in raw.split(",") if x]
    return raw


# --------------------------------------------------------------------------- encoding
@dataclass
class Encoded:
    """A turn, teacher-forced and right-padded (requests in input order).

    ``lookup[i]`` is request i's key position: the last token of its subject inside the prompt
    when the request names a subject found in the prompt (MEMIT's "subject_last"), else the
    last prompt token. ``prompt_last[i]`` is the last prompt token (where the answer starts).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    lookup: torch.Tensor
    prompt_last: torch.Tensor
    target_tokens: list[tuple[int, ...]]

    def to(self, device: torch.device) -> Encoded:
        return Encoded(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                       self.lookup.to(device), self.prompt_last.to(device), self.target_tokens)


def encode(tokenizer: Any, requests: Sequence[EditRequest]) -> Encoded:
    """Teacher-forced ids/labels of every request (``batching.tokenize_pair``) and key positions."""
    examples, lookup, prompt_last, targets = [], [], [], []
    for request in requests:
        ids, labels = tokenize_pair(tokenizer, request.prompt, request.target)
        n_prompt = sum(1 for x in labels if x == IGNORE) + 1
        examples.append((ids, labels))
        prompt_last.append(n_prompt - 1)
        lookup.append(_subject_last(tokenizer, request, n_prompt))
        targets.append(tuple(x for x in labels if x != IGNORE))
    batch = collate(examples, pad_id_of(tokenizer))
    return Encoded(batch["input_ids"], batch["attention_mask"], batch["labels"],
                   torch.tensor(lookup), torch.tensor(prompt_last), targets)


def _subject_last(tokenizer: Any, request: EditRequest, n_prompt: int) -> int:
    subject = request.extra.get("subject") if request.extra else None
    if isinstance(subject, str) and subject and subject in request.prompt:
        end = request.prompt.index(subject) + len(subject)
        n = len(tokenizer(request.prompt[:end])["input_ids"])
        return max(0, min(n, n_prompt) - 1)
    return n_prompt - 1


# --------------------------------------------------------------------------- running from a layer
class _Stop(Exception):
    pass


class Tail:
    """Run ``model`` from decoder layer ``start`` on, for many optimisation steps of one turn.

    :meth:`__init__` runs the model once without gradients up to layer ``start`` and keeps that
    layer's input hidden states and call arguments (rotary embeddings, masks); :meth:`target_logits`
    then runs layers ``start..`` + final norm + LM head (only at label positions) from any hidden
    states. Everything below ``start`` must stay unchanged while the Tail is used.
    """

    def __init__(self, model: nn.Module, batch: Encoded, start: int) -> None:
        self.model = model
        _, self.layers = decoder_layers(model)
        self.start = start
        self.norm = final_norm(model)
        self.head = model.get_output_embeddings()
        self.mask = batch.labels != IGNORE
        self.labels = batch.labels[self.mask]
        self.hidden, self.kwargs = self._capture(batch)

    def subset(self, rows: torch.Tensor) -> Tail:
        """The same Tail restricted to sequences ``rows`` (a 1-D index): hidden states, labels and
        every call argument batched over sequences are indexed; shared ones (rotary tables) kept."""
        n = self.hidden.shape[0]
        part = object.__new__(Tail)
        part.model, part.layers, part.start, part.norm, part.head = self.model, self.layers, self.start, self.norm, self.head
        part.mask = self.mask[rows]
        part.labels = batch_labels(self, rows)
        part.hidden = self.hidden[rows]
        part.kwargs = {k: _rows_of(v, rows, n) for k, v in self.kwargs.items()}
        return part

    @torch.no_grad()
    def _capture(self, batch: Encoded) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.start >= len(self.layers):  # start after the last layer: the final norm's input
            saved: dict[str, Any] = {}

            def grab_norm(module: nn.Module, args: tuple) -> None:
                saved["hidden"] = args[0]
                raise _Stop

            handle = self.norm.register_forward_pre_hook(grab_norm)
            self._forward(batch, handle)
            return saved["hidden"], {}
        saved = {}

        def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
            saved["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            saved["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _Stop

        handle = self.layers[self.start].register_forward_pre_hook(grab, with_kwargs=True)
        self._forward(batch, handle)
        return saved["hidden"], saved["kwargs"]

    def _forward(self, batch: Encoded, handle: Any) -> None:
        try:
            self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()

    def target_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits at the label positions, ``(n_targets, vocab)``, from layer ``start``'s input."""
        h = hidden
        for layer in self.layers[self.start:]:
            out = layer(h, **self.kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return self.head(self.norm(h[self.mask])).float()

    def token_nll(self, hidden: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every label token, flat in label order."""
        return F.cross_entropy(self.target_logits(hidden), self.labels, reduction="none")

    def per_row(self, values: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        """Flat per-token values -> one value per sequence (mean or sum over its label tokens)."""
        rows = self.mask.nonzero()[:, 0]
        total = torch.zeros(self.mask.shape[0], dtype=values.dtype, device=values.device).index_add_(0, rows, values)
        return total / self.mask.sum(1).clamp(min=1) if reduce == "mean" else total


def batch_labels(tail: Tail, rows: torch.Tensor) -> torch.Tensor:
    """The flat label tokens of sequences ``rows`` of ``tail``, in label order."""
    owner = tail.mask.nonzero()[:, 0]
    keep = torch.isin(owner, rows.to(owner.device))
    return tail.labels[keep]


def _rows_of(value: Any, rows: torch.Tensor, n: int) -> Any:
    """``value`` indexed by sequence when it is batched over the ``n`` sequences (tensors, tuples of them)."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() > 0 and value.shape[0] == n and n > 1 else value
    if isinstance(value, tuple):
        return tuple(_rows_of(v, rows, n) for v in value)
    return value


@torch.no_grad()
def module_io_at(model: nn.Module, batch: Encoded, names: Sequence[str], positions: torch.Tensor,
                 stop_after: int | None = None, hidden_after: int | None = None) -> dict[str, torch.Tensor]:
    """Inputs of modules ``names`` at one position per sequence, ``(B, d_in)`` each; with
    ``hidden_after=R`` also decoder layer R's output there (key ``"hidden"``). The forward stops
    after layer ``stop_after`` (default: the deepest layer needed)."""
    _, layers = decoder_layers(model)
    rows = torch.arange(batch.input_ids.shape[0], device=positions.device)
    out: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def grab(module: nn.Module, args: tuple, name: str = name) -> None:
            out[name] = args[0][rows, positions].float()
        handles.append(model.get_submodule(name).register_forward_pre_hook(grab))
    if hidden_after is not None:
        def grab_hidden(module: nn.Module, args: tuple, output: Any) -> None:
            h = output[0] if isinstance(output, tuple) else output
            out["hidden"] = h[rows, positions].float()
        handles.append(layers[hidden_after].register_forward_hook(grab_hidden))
    last = stop_after if stop_after is not None else max(
        [hidden_after or 0] + [int(re.search(r"\.(\d+)\.", n).group(1)) for n in names])

    def stop(module: nn.Module, args: tuple, output: Any) -> None:
        raise _Stop

    handles.append(layers[last].register_forward_hook(stop))
    try:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return out


def frozen(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    """Turn off ``requires_grad`` everywhere; returns what to restore with :func:`unfreeze`."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    return saved


def unfreeze(saved: list[tuple[nn.Parameter, bool]]) -> None:
    for p, flag in saved:
        p.requires_grad_(flag)
