"""The lifelong editing benchmark: ``ultraedit bench`` and :func:`run` (:mod:`.runner`), what a run is
(:mod:`.config`) and its reports (:mod:`.report`)."""

from ..methods import METHODS, register_method
from .config import (
    DATASETS,
    METRIC_NAMES,
    PAPER_RESULTS,
    RUN_ERRORS,
    BenchConfig,
    BenchError,
    EditMethod,
    UltraEditMethod,
    paper_reference,
)
from .report import markdown, plot_curve
from .runner import PERPLEXITY_TEXT, model_fingerprint, run

__all__ = [
    "BenchConfig", "BenchError", "DATASETS", "EditMethod", "METHODS", "METRIC_NAMES", "PAPER_RESULTS",
    "PERPLEXITY_TEXT", "RUN_ERRORS", "UltraEditMethod", "markdown", "model_fingerprint", "paper_reference",
    "plot_curve", "register_method", "run",
]
