"""Baseline editing methods in the benchmark's harness (``ultraedit bench --method NAME``).

* ``ft``: FT-M, Adam fine-tuning of one MLP output projection on the target tokens (:mod:`.ft`);
* ``memit``: MEMIT's multi-layer closed-form edit with key statistics of generic text (:mod:`.memit`);
* ``alphaedit``: MEMIT's update projected onto the null space of preserved keys, sequential (:mod:`.alphaedit`);
* ``grace``: a key-value codebook adaptor with deferral radii at one layer (:mod:`.grace`);
* ``wise``: a side memory of one MLP output projection with activation routing, shards and TIES
  merging (:mod:`.wise`).

Each module holds one method; importing this package registers them (:mod:`.registry`).
Their hyperparameters default to the published configurations (each ``describe()`` names its
source) and are changed with ``--method-option KEY=VALUE``.
"""

from __future__ import annotations

from .alphaedit import AlphaEditMethod
from .ft import FTMethod
from .grace import GraceMethod
from .memit import MEMITMethod
from .registry import METHODS, MethodError, register_method
from .wise import WiseMethod

BASELINES = {
    "ft": FTMethod.from_bench,
    "memit": MEMITMethod.from_bench,
    "alphaedit": AlphaEditMethod.from_bench,
    "grace": GraceMethod.from_bench,
    "wise": WiseMethod.from_bench,
}

for _name, _factory in BASELINES.items():
    register_method(_name, _factory)

__all__ = ["BASELINES", "METHODS", "register_method", "AlphaEditMethod", "FTMethod", "GraceMethod", "MEMITMethod", "MethodError", "WiseMethod"]
