"""The editing methods the benchmark can run, by name: a leaf that imports nothing of ours.

A method is a factory ``(model, tokenizer, bench_config) -> object`` whose object has
``edit(requests)`` (apply one turn in place; may return a report with ``loss``) and ``describe()``
(its hyperparameters, JSON-serialisable, including ``"modules"``). :mod:`ultraedit.bench` registers
UltraEdit itself; :mod:`ultraedit.methods` registers the baselines.
"""

from __future__ import annotations

from typing import Any, Callable

MethodFactory = Callable[[Any, Any, Any], Any]

#: Registered editing methods: name -> factory.
METHODS: dict[str, MethodFactory] = {}


class MethodError(ValueError):
    """A method cannot run as configured (unknown option, a module it cannot edit)."""


def register_method(name: str, factory: MethodFactory) -> None:
    """Make ``ultraedit bench --method name`` available."""
    if not name or not isinstance(name, str):
        raise ValueError("a method needs a non-empty name")
    METHODS[name] = factory
