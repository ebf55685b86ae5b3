"""Sessions and results saved by earlier versions: their flat ``EditConfig`` fields, mapped to the
nested form. A removed option that was on is refused by name, with the reason it was removed
(the measurements are in ``docs/research-log.md``); one left at its off value is dropped."""

from __future__ import annotations

from typing import Any

#: Options measurement rejected: ``field -> (its off value, why it was removed)``.
REMOVED: dict[str, tuple[Any, str]] = {
    "prefixes": (0, "context prefixes tripled the edit time for GS +0.02 on ZsRE 500 and cost retention; "
                    "the model's own paraphrases (EditConfig.paraphrases) do this better"),
    "subject_steps": (0, "subject-first steps moved ZsRE along the same GS/retention line and cost the demo's "
                         "same-subject facts; paraphrases reach a higher GS at a higher retention"),
    "subject_kl": (0.0, "the essence KL term changed the demo's locality by at most one probe for 1.3-1.7x "
                        "the search time"),
    "subject_contexts": (0, "context copies in the subject search cost CounterFact retention (0.839 -> 0.742) "
                            "for GS +0.03 at about 3x the time"),
    "subject_stop": ("loss", "the argmax stop gave back GS for retention on the same line as the search clamp"),
    "subject_preserve": (1.0, "the retention gain over five turns did not last twenty (CounterFact 2,000: "
                              "retention 0.858 against 0.870)"),
}

_RUNTIME = ("forward_batch_size", "dtype", "solver")
_KEPT = ("modules", "preset", "lr", "ridge", "capture_batch_size", "normalizer", "lr_scale")
_FLAT = {"refine_steps", "preserve", "preserve_text", "memory", "confidence", "neighbours", "neighbour_weight",
         "paraphrases", "subject_keys", "subject_depth", "key_outliers", "subject_optimise", "subject_lr",
         "subject_decay", "subject_clamp", "preserve_base", *_RUNTIME, *REMOVED}


_SHARED = {"memory", "neighbours", "paraphrases"}  # flat numbers then, sub-configs now


def is_flat(data: dict[str, Any]) -> bool:
    """Whether ``data`` is an earlier version's flat form."""
    return bool((_FLAT - _SHARED) & set(data)) or any(
        isinstance(data.get(k), (int, float)) and not isinstance(data.get(k), bool) for k in _SHARED)


#: Where each flat field went.
RENAMED = {
    "forward_batch_size": "runtime.forward_batch_size", "dtype": "runtime.dtype", "solver": "runtime.solver",
    "refine_steps": "refine.steps", "confidence": "refine.confidence", "preserve": "generic.weight",
    "preserve_text": "generic.text", "preserve_base": "generic.pull_back", "memory": "memory.weight",
    "neighbours": "neighbours.count", "neighbour_weight": "neighbours.weight", "paraphrases": "paraphrases.count",
    "key_outliers": "outliers.ratio", "subject_keys": "subject.weight", "subject_depth": "subject.depth",
    "subject_optimise": "subject.search.steps", "subject_lr": "subject.search.lr",
    "subject_decay": "subject.search.decay", "subject_clamp": "subject.search.clamp",
}


def nested(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` in the nested form (returned as is when it already is)."""
    if not is_flat(data):
        return dict(data)
    flat = dict(data)
    _refuse_mixed(flat)
    for name, (off, why) in REMOVED.items():
        value = flat.pop(name, off)
        if value != off:
            raise ValueError(f"EditConfig option {name}={value!r} was removed: {why} (docs/research-log.md)")
    out = {k: flat.pop(k) for k in _KEPT if k in flat}
    runtime = {k: flat.pop(k) for k in _RUNTIME if k in flat}
    if runtime:
        out["runtime"] = runtime
    out.update(_stages(flat))
    leftover = sorted(set(flat) - _FLAT)
    if leftover:
        raise ValueError(f"unknown EditConfig fields: {leftover}")
    return out


def _refuse_mixed(flat: dict[str, Any]) -> None:
    """Flat fields beside nested sub-configs: name the removed option, or where a flat field went."""
    if not any(isinstance(v, dict) or k == "runtime" for k, v in flat.items()):
        return
    for name, (off, why) in REMOVED.items():
        if name in flat:
            raise ValueError(f"EditConfig option {name} was removed: {why} (docs/research-log.md)")
    old = sorted(k for k in flat if k in RENAMED and not isinstance(flat[k], dict))
    raise ValueError(f"EditConfig field {old[0]} is an earlier version's; it is now {RENAMED[old[0]]}")


def _stages(flat: dict[str, Any]) -> dict[str, Any]:
    get = flat.get
    out: dict[str, Any] = {}
    if get("refine_steps", 1) > 1:
        out["refine"] = {"steps": get("refine_steps"), "confidence": get("confidence", 0.0)}
    if get("preserve", 0.0) + get("preserve_base", 0.0) > 0:
        text = get("preserve_text", "package")
        if text == "both":
            raise ValueError("EditConfig option preserve_text='both' was removed: it cost ES and the demo's "
                             "locality for retention the pull-back (generic.pull_back) gives (docs/research-log.md)")
        out["generic"] = {"weight": get("preserve", 0.0), "text": text, "pull_back": get("preserve_base", 0.0)}
    if get("memory", 0.0) > 0:
        out["memory"] = {"weight": get("memory")}
    if get("neighbours", 0) > 0 and get("neighbour_weight", 1.0) > 0:
        out["neighbours"] = {"count": get("neighbours"), "weight": get("neighbour_weight", 1.0)}
    if get("paraphrases", 0) > 0:
        out["paraphrases"] = {"count": get("paraphrases")}
    if get("key_outliers", 0.0) > 0:
        out["outliers"] = {"ratio": get("key_outliers")}
    keys, depth, search = get("subject_keys", 0.0), get("subject_depth", 0.0), get("subject_optimise", 0)
    if keys > 0:
        out["subject"] = {"weight": keys, "depth": depth, "search": None if search <= 0 else {
            "steps": search, "lr": get("subject_lr", 2.0), "decay": get("subject_decay", 0.5),
            "clamp": get("subject_clamp", 0.75)}}
    elif depth > 0 or search > 0:
        raise ValueError("EditConfig subject_depth / subject_optimise without subject_keys edit nothing at the "
                         "subject; this combination is no longer accepted (use subject={...})")
    return out
