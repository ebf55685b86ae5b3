"""Model anatomy: where a causal LM keeps its layers, how deep it is, and the forward-call details
every part of the package shares (frozen parameters, the KV-cache keyword, the context length)."""

from __future__ import annotations

import inspect
import re
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

#: Suffixes of a decoder layer's MLP output projection (Llama/Qwen2/Mistral/Phi-3/Gemma-3, GPT-J, GPT-2).
MLP_OUTPUTS = ("mlp.down_proj", "mlp.fc_out", "mlp.c_proj")


def text_config(model: nn.Module) -> Any:
    """The model's text config (multimodal configs nest it)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers(model: nn.Module) -> int:
    """Number of decoder layers from the model's (text) config."""
    config = text_config(model)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell the layer count of {type(model).__name__} from its config")


def layer_index(module_name: str) -> int:
    """The decoder layer of a module given by dotted name: its first number (``model.layers.14.mlp.down_proj``
    -> 14, ``transformer.h.3.mlp.c_proj`` -> 3); -1 when it has none."""
    match = re.search(r"\.(\d+)(?:\.|$)", module_name)
    return int(match.group(1)) if match else -1


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream (the input embeddings' width)."""
    return model.get_input_embeddings().weight.shape[1]


def context_length(model: nn.Module) -> int | None:
    """The most positions the model was built for (``max_position_embeddings``), if it says."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(dotted name, ModuleList)`` of the model's decoder layers (the list as long as the config says)."""
    depth = num_layers(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth and re.search(r"(^|\.)(layers|h)$", name):
            return name, module
    raise ValueError(f"cannot find the {depth} decoder layers of {type(model).__name__}")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last decoder layer and the LM head."""
    prefix, _ = decoder_layers(model)
    parent = model.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else model
    for attr in ("norm", "ln_f", "final_layernorm"):
        module = getattr(parent, attr, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"cannot find the final norm of {type(model).__name__}")


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Every parameter ``requires_grad=False`` and eval mode (no dropout) for the duration."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


#: How much ``writes_residual`` scales the module's output by in its second pass.
_SCALE = 8


@torch.no_grad()
def writes_residual(model: nn.Module, name: str) -> bool | None:
    """Whether module ``name``'s output joins the residual stream as it is, not through a norm
    (Gemma-2/3 normalise the MLP's and the attention's output before adding it). Measured with two
    forward passes of four tokens, the second with the module's output times 8: it joins as it is
    when the input of a norm in its decoder layer, or the layer's output, moves by exactly that
    change (within 10%, for rounding) without being the module's output itself. ``None`` for a
    model without weights (on the meta device)."""
    _, layers = decoder_layers(model)
    module, layer = model.get_submodule(name), layers[layer_index(name)]
    device = model.get_input_embeddings().weight.device
    if device.type == "meta":
        return None
    points = [m for m in layer.modules() if type(m).__name__.endswith("Norm")]
    seen: list[list[torch.Tensor]] = []
    outs: list[torch.Tensor] = []

    def scale(_m: nn.Module, _a: tuple, out: torch.Tensor) -> torch.Tensor:
        outs.append(out.float())
        return out * _SCALE if len(outs) == 2 else out

    def record(_m: nn.Module, args: tuple, out: Any = None) -> None:
        x = args[0] if out is None else (out[0] if isinstance(out, tuple) else out)
        seen[-1].append(x.float())

    handles = [module.register_forward_hook(scale), layer.register_forward_hook(record)]
    handles += [m.register_forward_pre_hook(record) for m in points]
    try:
        with frozen(model):
            for _ in range(2):
                seen.append([])
                model(input_ids=torch.arange(1, 5, device=device)[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    change = outs[1] * (_SCALE - 1)
    return any(_moved_by(before, after, change, outs[0]) for before, after in zip(*seen))


def _moved_by(before: torch.Tensor, after: torch.Tensor, change: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether ``after - before`` is ``change`` (within 10%) at a point that is not ``out`` itself."""
    if before.shape != change.shape:
        return False
    itself = (before - out).norm() <= 1e-3 * before.norm()
    miss = (after - before - change).norm()
    return bool(not itself and miss.isfinite() and miss <= 0.1 * change.norm())


def cache_kwarg(model: nn.Module, output: Any) -> dict[str, Any]:
    """The KV cache of ``output`` as the keyword ``model.forward`` takes (``cache`` in
    transformers >= 5.x, ``past_key_values`` before)."""
    if "cache" in inspect.signature(model.forward).parameters:
        return {"cache": output["cache"]}
    return {"past_key_values": output["past_key_values"]}
