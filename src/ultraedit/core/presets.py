"""Which linear layers to edit, per model family (the authors' choices, method page).

A preset is a list of ``(first_layer, last_layer, module_suffix)`` ranges stated for the layer count
of the model the authors used. On a model of another depth the ranges are scaled proportionally
(``first * L / L_ref`` rounded down, ``(last + 1) * L / L_ref`` rounded up), so the same preset
serves e.g. Llama-3-8B (32 layers) and a 4-layer test model. Module names are resolved against the
actual model, so ``model.layers.N`` / ``transformer.h.N`` / ``model.language_model.layers.N`` all work.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from torch import nn

from .anatomy import num_layers


@dataclass(frozen=True)
class Preset:
    """Edit modules of one model family.

    Attributes:
        name: preset id (``--preset`` on the command line).
        reference_layers: number of decoder layers of the model the ranges are stated for.
        ranges: ``(first, last, suffix)`` triples, layers inclusive, suffix relative to a layer.
        source: where the choice comes from.
    """

    name: str
    reference_layers: int
    ranges: tuple[tuple[int, int, str], ...]
    source: str

    def layer_ranges(self, num_layers: int) -> list[tuple[int, str]]:
        """``(layer, suffix)`` pairs for a model with ``num_layers`` layers, in layer order."""
        pairs: set[tuple[int, str]] = set()
        for first, last, suffix in self.ranges:
            if num_layers == self.reference_layers:
                lo, hi = first, last
            else:
                scale = num_layers / self.reference_layers
                lo = math.floor(first * scale)
                hi = max(lo, math.ceil((last + 1) * scale) - 1)
            for layer in range(lo, min(hi, num_layers - 1) + 1):
                pairs.add((layer, suffix))
        order = {suffix: i for i, (_, _, suffix) in enumerate(self.ranges)}
        return sorted(pairs, key=lambda p: (p[0], order[p[1]]))


def _p(name: str, ref: int, source: str, *ranges: tuple[int, int, str]) -> Preset:
    return Preset(name, ref, tuple(ranges), source)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _p("llama3", 32, "authors, Llama-3-8B-Instruct (ZsRE, WikiBigEdit, UltraEditBench)",
           (11, 15, "mlp.gate_proj"), (18, 24, "mlp.up_proj")),
        _p("llama3-fever", 32, "authors, Llama-3-8B-Instruct (FEVER)",
           (22, 30, "mlp.gate_proj"), (22, 30, "mlp.up_proj")),
        _p("mistral", 32, "authors, Mistral-7B-v0.3", (29, 30, "mlp.down_proj")),
        _p("gptj", 28, "authors, GPT-J-6B", (18, 26, "mlp.fc_out")),
        _p("gptj-fever", 28, "authors, GPT-J-6B (FEVER)", (25, 26, "mlp.fc_out")),
        _p("gptj-wikibigedit", 28, "authors, GPT-J-6B (WikiBigEdit)", (19, 26, "mlp.fc_out")),
        _p("qwen2.5", 28, "authors, Qwen2.5-7B-Instruct",
           (18, 26, "mlp.up_proj"), (18, 26, "mlp.gate_proj")),
        _p("qwen2.5-wikibigedit", 28, "authors, Qwen2.5-7B-Instruct (WikiBigEdit)",
           (19, 26, "mlp.up_proj"), (19, 26, "mlp.gate_proj")),
        _p("gemma3", 62, "authors, Gemma-3-27B", (52, 60, "mlp.gate_proj"), (52, 60, "mlp.up_proj")),
        _p("phi4", 40, "authors, Phi-4", (30, 38, "mlp.down_proj")),
        # Ours: GPT-J's choice (MLP output projection in the upper-middle third) at GPT-2 depth.
        _p("gpt2", 12, "ultraedit, by analogy with GPT-J", (8, 11, "mlp.c_proj")),
        # Ours: the built-in testbed model (4 layers, hidden 128); its named configuration is "testbed".
        _p("testbed", 4, "ultraedit testbed", (1, 3, "mlp.down_proj")),
    ]
}

#: ``config.model_type`` -> default preset name.
DEFAULT_PRESET: dict[str, str] = {
    "llama": "llama3",
    "qwen2": "qwen2.5",
    "mistral": "mistral",
    "gptj": "gptj",
    "gpt2": "gpt2",
    "phi3": "phi4",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
}


def preset_for(model: nn.Module) -> Preset:
    """The default preset for ``model.config.model_type``; ``KeyError`` naming the known types if none."""
    model_type = model.config.model_type
    if model_type not in DEFAULT_PRESET:
        known = ", ".join(sorted(DEFAULT_PRESET))
        raise KeyError(
            f"no edit-module preset for model_type {model_type!r} (known: {known}); "
            "pass the modules to edit explicitly"
        )
    return PRESETS[DEFAULT_PRESET[model_type]]


def resolve_modules(model: nn.Module, preset: str | Preset | None = None) -> list[str]:
    """Full dotted names of the modules a preset selects on ``model``.

    Args:
        model: a Hugging Face causal LM.
        preset: a preset name from :data:`PRESETS`, a :class:`Preset`, or ``None`` for the default
            of the model's ``model_type``.
    """
    if preset is None:
        preset = preset_for(model)
    elif isinstance(preset, str):
        if preset not in PRESETS:
            raise KeyError(f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
        preset = PRESETS[preset]
    names = [name for name, _ in model.named_modules()]
    resolved = []
    for layer, suffix in preset.layer_ranges(num_layers(model)):
        pattern = re.compile(rf"^(?:.*\.)?{layer}\.{re.escape(suffix)}$")
        matches = [n for n in names if pattern.match(n)]
        if len(matches) != 1:
            found = "none" if not matches else ", ".join(matches)
            raise ValueError(
                f"preset {preset.name!r}: expected one module for layer {layer} '{suffix}', found {found}"
            )
        resolved.append(matches[0])
    return resolved
