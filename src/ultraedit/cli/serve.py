"""``ultraedit serve``: the model over HTTP (OpenAI-compatible), edited live (:mod:`ultraedit.serve`)."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Any

from .common import CliError, check_resumed, config_args, load_model, model_args, reporting, resolve_config, state_dtype

API_KEY_ENV = "ULTRAEDIT_API_KEY"
EDIT_KEY_ENV = "ULTRAEDIT_EDIT_KEY"


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise CliError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    sock.listen(128)
    return sock


def _limits(args: argparse.Namespace) -> Any:
    from ..serve.app import Limits

    for flag in ("max_body_bytes", "max_tokens", "max_prompt_tokens", "max_concurrent", "turn_size", "max_queue"):
        if getattr(args, flag) < 1:
            raise CliError(f"--{flag.replace('_', '-')} must be >= 1")
    return Limits(
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        edit_key=args.edit_key or os.environ.get(EDIT_KEY_ENV) or None,
        max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens,
        default_max_tokens=min(16, args.max_tokens), max_prompt_tokens=args.max_prompt_tokens,
        max_concurrent=args.max_concurrent,
    )


def _engine_config(args: argparse.Namespace, model: Any) -> Any:
    from ..serve.engine import EngineConfig
    from ..session import has_state, read_state

    if has_state(args.state):
        check_resumed(read_state(args.state)[0]["config"], args, model)
        fields = None
    else:
        fields = resolve_config(args, model).to_dict()
    return EngineConfig(
        state=args.state, model_name=args.served_name or args.model, turn_size=args.turn_size,
        keep_turn_deltas=args.keep_turn_deltas, edit_fields=fields, max_queue=args.max_queue,
    )


@reporting
def _serve_command(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve.app import create_app
        from ..serve.engine import Engine
    except ImportError as err:
        raise CliError(f"serving needs FastAPI and uvicorn: pip install 'ultraedit[serve]' ({err})") from None
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    limits = _limits(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not limits.api_key:
        print(f"ultraedit serve: warning: listening on {args.host} without --api-key: anyone who reaches it can "
              "generate AND edit the model", file=sys.stderr)
    sock = _bind(args.host, args.port)
    dtype = args.dtype if args.dtype != "auto" else (state_dtype(args.state) or "auto")
    model, tokenizer = load_model(args.model, args.device, dtype)
    engine = Engine(model, tokenizer, _engine_config(args, model))
    engine.start()
    app = create_app(engine, limits)
    host, port = sock.getsockname()[:2]
    print(f"ultraedit serve: {args.model} (state {args.state}, turn {engine.served_turn}, "
          f"{engine.queued_requests()} queued edit requests replayed) on http://{host}:{port}", flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level == "debug",
                            timeout_graceful_shutdown=10)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
    return 0


def add_parsers(sub: Any) -> None:
    """Register ``serve``."""
    p = sub.add_parser(
        "serve", help="serve the model over HTTP (OpenAI-compatible) and edit it live",
        description="OpenAI-compatible /v1/completions and /v1/chat/completions on the model as edited so far, "
        "plus POST /v1/edits (queued, applied in turns by one worker, each turn saved to --state before it "
        "is served), GET /v1/edits/{id}, POST /v1/edits/revert, GET /v1/state, /health and /metrics. "
        "A restart with the same --state resumes exactly and replays edits that were queued but not applied.",
    )
    model_args(p)
    p.add_argument("--state", required=True, metavar="DIR", help="state directory (created, or resumed)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port, printed)")
    p.add_argument("--api-key", help=f"bearer token every request must carry (or env {API_KEY_ENV})")
    p.add_argument("--edit-key", help=f"bearer token for /v1/edits* (or env {EDIT_KEY_ENV}); it also opens the rest")
    p.add_argument("--served-name", help="model id reported by /v1/models (default: --model)")
    p.add_argument("--turn-size", type=int, default=100, help="most edit requests per turn, and per POST (default 100)")
    p.add_argument("--keep-turn-deltas", type=int, metavar="K",
                   help="keep the last K turns revertible (POST /v1/edits/revert); default: the state's, else 0")
    config_args(p, new=" of a NEW state")
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens one request may generate (default 512)")
    p.add_argument("--max-prompt-tokens", type=int, default=4096, help="longest prompt in tokens (default 4096)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--max-concurrent", type=int, default=4, help="generations running at once (default 4)")
    p.add_argument("--max-queue", type=int, default=10_000, help="queued edit requests before 429 (default 10000)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_serve_command)
