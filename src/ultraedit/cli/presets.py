"""``ultraedit presets``: the edit-module presets per model family."""

from __future__ import annotations

import argparse
from typing import Any


def _presets_command(args: argparse.Namespace) -> int:
    from ..presets import DEFAULT_PRESET, PRESETS

    defaults: dict[str, list[str]] = {}
    for model_type, name in DEFAULT_PRESET.items():
        defaults.setdefault(name, []).append(model_type)
    for name, preset in PRESETS.items():
        ranges = ", ".join(f"layers {a}-{b} {s}" for a, b, s in preset.ranges)
        used = f" [default for {', '.join(defaults[name])}]" if name in defaults else ""
        print(f"{name:22s} {preset.reference_layers:3d} layers: {ranges}  ({preset.source}){used}")
    from ..editor import options_summary
    from ..presets import MLP_OUTPUTS, RECOMMENDED_LAYERS

    first, last, reference = RECOMMENDED_LAYERS
    outputs = ", ".join(MLP_OUTPUTS)
    print(f"{'recommended':22s} {reference:3d} layers: layers {first}-{last} of the MLP output projection ({outputs}),"
          " scaled to the depth  (ultraedit; EditConfig.recommended; the family preset where their d_in x d_in"
          " statistics would exceed 2 GiB, e.g. Llama-3-8B)")
    print()
    print(options_summary())
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("presets", help="list the edit-module presets per model family and the editing options")
    p.set_defaults(func=_presets_command)
