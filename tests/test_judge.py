"""The optional judge: reading verdicts, and a real round trip through ``ultraedit serve``'s chat
endpoint (the testbed model is no grader: its replies are counted as unreadable, not guessed)."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import pytest
from tiny import tiny_text_model

from ultraedit.core.batching import EditRequest
from ultraedit.judge import PROMPT, Judge, JudgeError, verdict


@pytest.mark.parametrize("reply, expected", [
    ("CORRECT", True), ("correct.", True), ("**INCORRECT**", False), (" Incorrect, because", False),
    ("The answer is correct", None), ("", None),
])
def test_verdicts_are_read_from_the_first_word(reply, expected):
    assert verdict(reply) is expected


def test_an_unreachable_judge_is_one_clear_error():
    with pytest.raises(JudgeError, match="judge at http://127.0.0.1:9"):
        Judge("http://127.0.0.1:9/v1", model="m", timeout=2).grade("q", "a", "a")


@contextmanager
def tiny_server(tmp_path):
    """``ultraedit serve``'s app on a tiny random model (its context holds the judging prompt) and
    uvicorn on a free loopback port; yields the server's root address."""
    import uvicorn

    from ultraedit.serve.app import Limits, create_app
    from ultraedit.serve.engine import Engine, EngineConfig

    model, tok = tiny_text_model("llama", seed=0)
    engine = Engine(model, tok, EngineConfig(state=tmp_path / "s", model_name="tiny-judge"))
    engine.start(timeout=60)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, Limits()), log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        engine.stop(30)
        sock.close()


def test_a_judge_round_trip_through_the_package_server(tmp_path):
    pytest.importorskip("uvicorn")
    with tiny_server(tmp_path) as url:
        judge = Judge(url + "/v1")
        assert judge.model == "tiny-judge"
        requests = [EditRequest("Q one", "A", rephrases=("Q two",), locality=(("L", "x"),))]
        verdicts = judge.grade_requests(requests, ["A", "B", "x"])
    assert len(verdicts) == 3 and verdicts[2] is None
    described = judge.describe()
    assert described["asked"] == 2 and described["prompt"] == PROMPT
    assert described["unreadable"] == sum(v is None for v in verdicts[:2])
