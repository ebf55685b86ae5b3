"""``ultraedit serve``: an OpenAI-compatible server whose model is edited live (needs the ``serve``
extra: FastAPI and uvicorn).

:class:`~ultraedit.serve.engine.Engine` owns the model, the editing worker and the state;
:func:`~ultraedit.serve.app.create_app` puts the HTTP API over it.
"""

from .engine import Engine, EngineConfig, ServeError

__all__ = ["Engine", "EngineConfig", "ServeError", "create_app", "Limits"]


def __getattr__(name: str):  # the app needs FastAPI; the engine does not
    if name in ("create_app", "Limits"):
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
