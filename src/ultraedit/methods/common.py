"""What the baselines share: where a model's layers and MLP output projections are, the
teacher-forced encoding of a turn with each request's key position, weight updates in
``(d_out, d_in)`` orientation, and :func:`tail_of`, a :class:`~ultraedit.core.tail.Tail` of an encoded turn.

Every baseline here edits (or wraps) the MLP output projection of a decoder layer
(``mlp.down_proj``, GPT-J ``mlp.fc_out``, GPT-2 ``mlp.c_proj``), as the published methods do.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from ..core.anatomy import MLP_OUTPUTS, num_layers
from ..core.anatomy import decoder_layers as _decoder_layers
from ..core.batching import IGNORE, EditRequest, collate, pad_id_of, tokenize_pair
from ..core.tail import StopForward, Tail, run_until
from .registry import MethodError

# --------------------------------------------------------------------------- model anatomy
def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(dotted name, ModuleList)`` of the model's decoder layers (:func:`ultraedit.core.anatomy.decoder_layers`)."""
    try:
        return _decoder_layers(model)
    except ValueError as err:
        raise MethodError(str(err)) from None


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
def tail_of(model: nn.Module, batch: Encoded, start: int) -> Tail:
    """A :class:`~ultraedit.core.tail.Tail` of ``batch`` from decoder layer ``start`` on."""
    return Tail(model, start, batch.input_ids, batch.attention_mask, batch.labels)


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
        raise StopForward

    handles.append(layers[last].register_forward_hook(stop))
    run_until(model, batch.input_ids, batch.attention_mask, *handles)
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
