"""ultraedit: lifelong knowledge editing of Hugging Face causal LMs (UltraEdit, arXiv 2505.14679).

Quick start::

    import ultraedit
    editor = ultraedit.UltraEditor(model, ultraedit.EditConfig(), tokenizer=tokenizer)
    editor.edit([ultraedit.EditRequest("The CEO of Acme is", "Jane Doe"), ...])  # one turn
"""

from .batching import EditError, EditRequest, tokenize_pair
from .datasets import DatasetError, read_requests
from .editor import EditConfig, PendingTurn, TurnReport, UltraEditor
from .evaluation import score_pairs
from .normalizer import LifelongNormalizer
from .presets import PRESETS, Preset, resolve_modules
from .solver import ridge_solve, target_values
from .state import FingerprintError, RevertReport, StateError, apply_delta, merge

__version__ = "0.1.0"

__all__ = [
    "DatasetError",
    "EditConfig",
    "EditError",
    "EditRequest",
    "FingerprintError",
    "LifelongNormalizer",
    "PRESETS",
    "PendingTurn",
    "Preset",
    "RevertReport",
    "StateError",
    "TurnReport",
    "UltraEditor",
    "apply_delta",
    "merge",
    "read_requests",
    "resolve_modules",
    "ridge_solve",
    "score_pairs",
    "target_values",
    "tokenize_pair",
]
