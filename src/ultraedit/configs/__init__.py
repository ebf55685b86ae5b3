"""Named configurations as data (``faithful``, ``recommended``, measured trades), and how a command
line's ``--config``, ``--modules``, ``--preset``, ``--lr`` and ``--set`` become one :class:`EditConfig`.

A named configuration is a JSON file in this folder (or any path given to ``--config``)::

    {"description": "...", "extends": "NAME",            # optional: start from another one
     "config": {EditConfig fields, nested},               # what it sets
     "select": {"suffixes": [...], "layers": [first, last], "reference_layers": L,
                "max_statistics_bytes": B},               # optional: its edit modules, by rule
     "fallback": {"why": "...", "config": {...}}}          # optional: where the rule does not fit

``select`` picks the first of ``suffixes`` the model has, over ``layers`` of a ``reference_layers``-deep
model scaled to the model's depth; when the model has none of them, or their ``d_in x d_in`` float32
statistics (two per module) would exceed ``max_statistics_bytes``, the family's preset modules are
edited instead, with ``fallback.config`` on top. Modules the user names (``--modules``/``--preset``)
replace the rule. Then every stage that cannot apply to the modules (the subject stage with no module
below its split, say) is left out, and :func:`resolve` says so in one line each.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ..config import EditConfig
from ..core.presets import Preset, resolve_modules
from ..core.weights import module_shape
from ..stages import ORDER

DEFAULT = "recommended"


class ConfigError(ValueError):
    """A named configuration or an override cannot be used (one line naming the file or key)."""


def names() -> list[str]:
    """The named configurations that ship with the package."""
    return sorted(p.name[: -len(".json")] for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))


def default_for(model_spec: str) -> str:
    """The configuration a command uses when not told: ``testbed`` for the built-in testbed, else ``recommended``."""
    return "testbed" if model_spec == "testbed" else DEFAULT


def load_spec(name: str) -> dict[str, Any]:
    """A named configuration (or a JSON file's), with ``extends`` followed."""
    return _load(name, seen=())


def _load(name: str, seen: tuple[str, ...]) -> dict[str, Any]:
    if name in seen:
        raise ConfigError(f"configuration {name!r} extends itself ({' -> '.join((*seen, name))})")
    path = Path(name)
    if name in names():
        where = f"configuration {name!r}"
        text = resources.files(__name__).joinpath(f"{name}.json").read_text(encoding="utf-8")
    elif path.suffix == ".json" and path.is_file():
        where, text = str(path), path.read_text(encoding="utf-8")
    else:
        raise ConfigError(f"--config {name!r}: not a named configuration ({', '.join(names())}) or a .json file")
    try:
        spec = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"{where}: not JSON ({err})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("config", {}), dict):
        raise ConfigError(f"{where}: expected an object with a 'config' object")
    unknown = sorted(set(spec) - {"description", "extends", "config", "select", "fallback"})
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}")
    if "extends" in spec:
        parent = _load(spec["extends"], (*seen, name))
        merged = {**parent, **{k: v for k, v in spec.items() if k not in ("config", "extends")}}
        merged["config"] = _merge(parent.get("config", {}), spec.get("config", {}))
        spec = merged
    spec.setdefault("config", {})
    spec["name"] = name
    return spec


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_set(item: str) -> tuple[list[str], Any]:
    """``"refine.steps=3"`` -> ``(["refine", "steps"], 3)``; the value is JSON when it parses (numbers,
    ``true``, ``null``, ``{...}``), else the text as given."""
    key, sep, raw = item.partition("=")
    path = [part.strip() for part in key.split(".")]
    if not sep or not all(path):
        raise ConfigError(f"--set expects KEY=VALUE with a dotted key (e.g. refine.steps=3), got {item!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw.strip()
    return path, value


def apply_sets(config: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """``config`` (EditConfig fields, nested) with each ``--set KEY=VALUE`` applied in order; setting a
    field of a stage that is off turns it on with its defaults (``subject.search.clamp=0.6``);
    ``STAGE=null`` turns it off."""
    out = copy.deepcopy(config)
    for item in sets:
        path, value = parse_set(item)
        node = out
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return out


@dataclass
class Resolved:
    """A configuration made concrete for one model: the :class:`EditConfig` and what was adapted."""

    config: EditConfig
    name: str
    notes: list[str] = field(default_factory=list)


def resolve(
    name: str, model: nn.Module, *, modules: Sequence[str] | None = None, preset: str | None = None,
    lr: float | None = None, sets: Sequence[str] = (), **fields: Any,
) -> Resolved:
    """The :class:`EditConfig` of configuration ``name`` for ``model``, with the options given explicitly
    (``None`` = not given) on top: ``modules`` or ``preset`` replace its module rule, ``lr`` its step,
    ``sets`` are ``--set`` overrides, ``fields`` more top-level fields (``capture_batch_size``...).
    Stages that cannot apply to the modules are left out, each with a note."""
    spec = load_spec(name)
    data = copy.deepcopy(spec["config"])
    notes: list[str] = []
    if modules is not None or preset is not None:
        data.pop("preset", None)
        data["modules"], data["preset"] = (list(modules) if modules is not None else None), preset
    elif "select" in spec:
        chosen = _select(model, spec["select"])
        if chosen is None:
            fallback = spec.get("fallback") or {}
            data = _merge(data, fallback.get("config", {}))
            notes.append(f"{spec['name']}: {fallback.get('why', 'the family preset modules')}")
        else:
            data["modules"] = chosen
    config = _build(spec, data, lr, sets, fields)
    return Resolved(_applicable(config, model, notes), spec["name"], notes)


def check(name: str, *, lr: float | None = None, sets: Sequence[str] = (), **fields: Any) -> EditConfig:
    """Configuration ``name`` with ``lr``, ``sets`` and ``fields`` on top, checked before any model is
    loaded (its modules are left to :func:`resolve`); :class:`ConfigError` naming the first bad value."""
    spec = load_spec(name)
    return _build(spec, copy.deepcopy(spec["config"]), lr, sets, fields)


def _build(spec: dict[str, Any], data: dict[str, Any], lr: float | None, sets: Sequence[str],
           fields: dict[str, Any]) -> EditConfig:
    if lr is not None:
        data["lr"] = lr
    data.update({k: v for k, v in fields.items() if v is not None})
    data = apply_sets(data, sets)
    try:
        return EditConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"configuration {spec['name']!r}: {err}") from None


def _select(model: nn.Module, rule: dict[str, Any]) -> list[str] | None:
    """The modules ``rule`` selects on ``model``, or ``None`` where it does not fit (see the module doc)."""
    available = dict(model.named_modules())
    suffixes = [s for s in rule["suffixes"] if any(n.endswith(f".{s}") for n in available)]
    if not suffixes:
        return None
    first, last = rule["layers"]
    try:
        names = resolve_modules(model, Preset("rule", rule["reference_layers"], ((first, last, suffixes[0]),), "rule"))
    except ValueError:  # a layer without that module
        return None
    widths = [module_shape(available[n])[0] for n in names]
    return names if sum(2 * 4 * w * w for w in widths) <= rule["max_statistics_bytes"] else None


def _applicable(config: EditConfig, model: nn.Module, notes: list[str]) -> EditConfig:
    """``config`` without the stages that cannot apply to its modules on ``model`` (a note each)."""
    if not any(getattr(config, stage) is not None for stage, _, _ in ORDER):
        return config
    try:
        names = config.modules if config.modules is not None else resolve_modules(model, config.preset)
    except (KeyError, ValueError):
        return config  # the editor names the problem with the modules
    available = dict(model.named_modules())
    if any(n not in available for n in names):
        return config
    modules = {n: available[n] for n in names}
    for stage_name, _, stage_class in ORDER:
        sub = getattr(config, stage_name)
        if sub is None:
            continue
        adapted, note = stage_class(sub).adapt(model, modules)
        if note is not None:
            setattr(config, stage_name, adapted)
            notes.append(note)
    return config


def describe() -> list[tuple[str, str]]:
    """``(name, description)`` of each named configuration."""
    return [(n, load_spec(n).get("description", "")) for n in names()]


__all__ = ["ConfigError", "DEFAULT", "Resolved", "apply_sets", "check", "default_for", "describe", "load_spec",
           "names", "parse_set", "resolve"]
