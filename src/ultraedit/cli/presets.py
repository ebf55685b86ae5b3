"""``ultraedit presets``: the authors' edit-module presets, the named configurations and every option."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from typing import Any


def _presets_command(args: argparse.Namespace) -> int:
    from ..config import EditConfig, Runtime
    from ..configs import describe
    from ..core.presets import DEFAULT_PRESET, PRESETS
    from ..stages import SUB_CONFIGS

    defaults: dict[str, list[str]] = {}
    for model_type, name in DEFAULT_PRESET.items():
        defaults.setdefault(name, []).append(model_type)
    print("Edit-module presets (--preset NAME; the authors' per family, scaled to the model's depth):")
    for name, preset in PRESETS.items():
        ranges = ", ".join(f"layers {a}-{b} {s}" for a, b, s in preset.ranges)
        used = f" [default for {', '.join(defaults[name])}]" if name in defaults else ""
        print(f"  {name:20s} {preset.reference_layers:3d} layers: {ranges}  ({preset.source}){used}")
    print("\nConfigurations (--config NAME, or a JSON file of the same form):")
    for name, description in describe():
        print(f"  {name:24s} {description}")
    print("\nFields (--set KEY=VALUE; a stage is off when null, and setting one of its fields turns it on):")
    for field in dataclasses.fields(EditConfig):
        if field.name in SUB_CONFIGS or field.name == "runtime":
            continue
        print(f"  {field.name:24s} default {field.default!r}")
    for name, kind in {"runtime": Runtime, **SUB_CONFIGS}.items():
        _print_fields(name, kind)
    return 0


def _print_fields(name: str, kind: type) -> None:
    values = ", ".join(f"{f.name}={_default(f)}" for f in dataclasses.fields(kind))
    print(f"  {name + '.*':24s} {values}  ({_summary(kind)})")
    for f in dataclasses.fields(kind):
        if f.default_factory is not dataclasses.MISSING:
            _print_fields(f"{name}.{f.name}", type(f.default_factory()))


def _default(field: dataclasses.Field) -> str:
    if field.default_factory is not dataclasses.MISSING:  # a nested sub-config
        return "{...}"
    return repr(field.default)


def _summary(kind: type) -> str:
    doc = inspect.getdoc(kind) or ""
    return " ".join(doc.split()).replace("``", "")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("presets", help="list the edit-module presets, the named configurations and every option")
    p.set_defaults(func=_presets_command)
