"""Saved editing sessions: the in-memory session (:mod:`.memory`), its atomic state on disk
(:mod:`.store`), the edit log, the writer's lock, the base model's fingerprint.

Sessions never import the editor: :func:`save` reads an editor through :class:`.store.Saveable`, and
:meth:`ultraedit.UltraEditor.load` reads a state through :func:`.store.open_saved` and
:func:`.store.read_contents`.
"""

from .files import FingerprintError, StateError, StateWarning
from .identity import fingerprint
from .lock import session_lock
from .log import read_log
from .memory import EditSession, RevertReport, Snapshot, UndoEntry
from .store import apply_delta, has_state, info, merge, read_state, save

__all__ = [
    "EditSession", "FingerprintError", "RevertReport", "Snapshot", "StateError", "StateWarning", "UndoEntry",
    "apply_delta", "fingerprint", "has_state", "info", "merge", "read_log", "read_state", "save", "session_lock",
]
