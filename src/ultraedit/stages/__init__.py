"""Options beyond the paper, one file each: a sub-config and a stage (:mod:`.base` lists the hooks).

Each stays only while a stored, rerunnable result shows it on the best trade-off (``docs/results.md``);
what measurement rejected is gone, with its numbers in ``docs/research-log.md``.

The editor runs the configured stages in :data:`ORDER` (its ridge terms are summed in this order);
refinement (:mod:`.refine`) is the loop of closed-form steps around them.
"""

from __future__ import annotations

from typing import Any

from .base import Rows, Stage, Turn
from .chat import ChatConfig, ChatStage
from .ending import EndingConfig, EndingStage
from .generic import GenericConfig, GenericStage
from .guard import GuardConfig, GuardStage
from .memory import MemoryConfig, MemoryStage
from .neighbours import NeighboursConfig, NeighboursStage
from .outliers import OutliersConfig, OutliersStage
from .paraphrase import ParaphraseConfig, ParaphraseStage
from .refine import RefineConfig
from .subject import SearchConfig, SubjectConfig, SubjectStage

#: The stages in the order the editor calls them: ``(EditConfig field, sub-config, stage)``.
ORDER: tuple[tuple[str, type, type[Stage]], ...] = (
    ("paraphrases", ParaphraseConfig, ParaphraseStage),
    ("ending", EndingConfig, EndingStage),
    ("chat", ChatConfig, ChatStage),
    ("generic", GenericConfig, GenericStage),
    ("memory", MemoryConfig, MemoryStage),
    ("neighbours", NeighboursConfig, NeighboursStage),
    ("subject", SubjectConfig, SubjectStage),
    ("outliers", OutliersConfig, OutliersStage),
    ("guard", GuardConfig, GuardStage),
)

#: Sub-config classes by ``EditConfig`` field (refinement included).
SUB_CONFIGS: dict[str, type] = {"refine": RefineConfig, **{name: cfg for name, cfg, _ in ORDER}}


def build(config: Any) -> list[Stage]:
    """The stages an :class:`ultraedit.EditConfig` asks for, in :data:`ORDER`."""
    return [stage(getattr(config, name)) for name, _, stage in ORDER if getattr(config, name) is not None]


__all__ = [
    "ORDER", "SUB_CONFIGS", "ChatConfig", "EndingConfig", "GenericConfig", "GuardConfig", "MemoryConfig", "NeighboursConfig", "OutliersConfig",
    "ParaphraseConfig", "RefineConfig", "Rows", "SearchConfig", "Stage", "SubjectConfig", "Turn", "build",
]
