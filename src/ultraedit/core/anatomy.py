"""Model anatomy: where a causal LM keeps its layers, how deep it is, and the forward-call details
every part of the package shares (frozen parameters, the KV-cache keyword, the context length)."""

from __future__ import annotations

import inspect
import re
from contextlib import contextmanager
from typing import Any, Iterator

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


def cache_kwarg(model: nn.Module, output: Any) -> dict[str, Any]:
    """The KV cache of ``output`` as the keyword ``model.forward`` takes (``cache`` in
    transformers >= 5.x, ``past_key_values`` before)."""
    if "cache" in inspect.signature(model.forward).parameters:
        return {"cache": output["cache"]}
    return {"past_key_values": output["past_key_values"]}
