"""ultraedit: lifelong knowledge editing of Hugging Face causal LMs (UltraEdit, arXiv 2505.14679).

Quick start::

    import ultraedit
    config = ultraedit.configuration("recommended", model).config   # or ultraedit.EditConfig(): the authors'
    editor = ultraedit.UltraEditor(model, config, tokenizer=tokenizer)
    editor.edit([ultraedit.EditRequest("The CEO of Acme is", "Jane Doe"), ...])  # one turn
"""

from .config import EditConfig, Runtime
from .configs import resolve as configuration
from .core.batching import EditError, EditRequest, tokenize_pair
from .core.normalizer import LifelongNormalizer
from .core.presets import PRESETS, Preset, resolve_modules
from .core.solver import ridge_solve, target_values
from .core.turn import faithful_turn
from .datasets import DatasetError, read_requests
from .editor import UltraEditor
from .evaluation import score_pairs
from .report import PendingTurn, TurnReport
from .session import FingerprintError, RevertReport, StateError, apply_delta, merge
from .stages import (
    GenericConfig,
    MemoryConfig,
    NeighboursConfig,
    OutliersConfig,
    ParaphraseConfig,
    RefineConfig,
    SearchConfig,
    SubjectConfig,
)

__version__ = "0.2.0"

__all__ = [
    "DatasetError", "EditConfig", "EditError", "EditRequest", "FingerprintError", "GenericConfig", "LifelongNormalizer",
    "MemoryConfig", "NeighboursConfig", "OutliersConfig", "PRESETS", "ParaphraseConfig", "PendingTurn", "Preset",
    "RefineConfig", "RevertReport", "Runtime", "SearchConfig", "StateError", "SubjectConfig", "TurnReport",
    "UltraEditor", "apply_delta", "configuration", "faithful_turn", "merge", "read_requests", "resolve_modules",
    "ridge_solve", "score_pairs", "target_values", "tokenize_pair",
]
