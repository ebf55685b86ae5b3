"""``ultraedit serve`` over real HTTP on 127.0.0.1, on the shipped testbed model.

Each server runs uvicorn in a thread on a free loopback port (the crash test runs the CLI in a
subprocess and kills it with SIGKILL). Edits use lr 1e-2, where one edit flips the greedy answer
of the facts below to their new target.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402

from ultraedit import EditConfig, UltraEditor  # noqa: E402
from ultraedit.models import load_model  # noqa: E402
from ultraedit.serve import Engine, EngineConfig  # noqa: E402
from ultraedit.serve.app import Limits, create_app  # noqa: E402
from ultraedit.serve.generation import SamplingParams, pick_token, sample_ids, stop_token_ids, stream_text  # noqa: E402
from ultraedit.serve.journal import JOURNAL, reconcile  # noqa: E402
from ultraedit.serve.rwlock import RWLock  # noqa: E402
from ultraedit.testbed import TESTBED_MODULES, load_requests  # noqa: E402

LR = 1e-2
API_KEY, EDIT_KEY = "sk-api-7f3a9c", "sk-edit-b41d2e"
FLIPS = [9, 11, 14, 16]  # testbed requests whose greedy answer becomes the target after a one-edit turn
EDIT_FIELDS = {"modules": list(TESTBED_MODULES), "lr": LR}
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def facts():
    requests = load_requests(20)
    return [requests[i] for i in FLIPS]


def record(request, **extra):
    return {"prompt": request.prompt, "target": request.target, "id": request.id, **extra}


@contextmanager
def serving(state, *, keep=3, turn_size=10, limits=None, edit_fields=EDIT_FIELDS):
    """An engine on a fresh testbed model and uvicorn on a free loopback port; yields a client."""
    model, tokenizer = load_model("testbed", "cpu", "auto")
    engine = Engine(model, tokenizer, EngineConfig(state=state, model_name="testbed", turn_size=turn_size,
                                                   keep_turn_deltas=keep, edit_fields=edit_fields))
    engine.start(timeout=60)
    limits = limits or Limits(api_key=API_KEY, edit_key=EDIT_KEY)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, limits), log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {EDIT_KEY}"}, timeout=30)
    client.engine = engine
    try:
        yield client
    finally:
        client.close()
        server.should_exit = True
        thread.join(15)
        engine.stop(30)
        sock.close()


def complete(client, prompt, **kw):
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def answer(client, prompt):
    return complete(client, prompt)["choices"][0]["text"].strip()


def wait_resolved(client, edit_id, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/v1/edits/{edit_id}").json()
        if status["status"] != "queued":
            return status
        time.sleep(0.05)
    raise AssertionError(f"edit {edit_id} still queued after {timeout} s")


def stream_text_of(client, path, body):
    """Concatenated text of an SSE response, its chunks, and whether it ended with [DONE]."""
    chunks, done = [], False
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunks.append(json.loads(line[6:]))
    texts = [c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content") or ""
             for c in chunks if c["choices"]]
    return "".join(texts), chunks, done


# ------------------------------------------------------------------------------------------------
def test_edit_is_served_next_and_revert_restores(tmp_path, facts):
    fact = facts[0]
    with serving(tmp_path / "state") as client:
        before = answer(client, fact.prompt)
        assert before != fact.target
        posted = client.post("/v1/edits", json={"requests": [record(fact)]})
        assert posted.status_code == 202 and posted.json()["status"] == "queued"
        status = wait_resolved(client, posted.json()["id"])
        assert status["status"] == "applied" and status["turn"] == 1
        # acknowledged => already saved and already served
        assert client.get("/v1/state").json()["turns"] == 1
        reply = complete(client, fact.prompt)
        assert reply["choices"][0]["text"].strip() == fact.target
        assert reply["system_fingerprint"] == "ultraedit-turn-1"
        chat = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": fact.prompt}], "max_tokens": 3, "temperature": 0})
        assert chat.json()["choices"][0]["message"]["content"].strip() == fact.target
        text, chunks, done = stream_text_of(client, "/v1/completions", {"prompt": fact.prompt, "max_tokens": 3,
                                                                         "temperature": 0})
        assert done and text.strip() == fact.target and chunks[-1]["choices"][0]["finish_reason"] == "stop"

        reverted = client.post("/v1/edits/revert", json={"turns": 1})
        assert reverted.status_code == 200, reverted.text
        assert reverted.json()["reverted_turns"] == [1] and reverted.json()["edit_ids"] == [status["id"]]
        assert answer(client, fact.prompt) == before
        assert client.get(f"/v1/edits/{status['id']}").json()["status"] == "reverted"
        assert client.get("/v1/state").json()["turns"] == 0
        too_far = client.post("/v1/edits/revert", json={"turns": 1})
        assert too_far.status_code == 409 and "cannot revert" in too_far.json()["error"]["message"]
        metrics = client.get("/metrics").text
        assert "ultraedit_edits_applied_total 1" in metrics and "ultraedit_turns_total 1" in metrics
        assert 'ultraedit_http_requests_total{code="202",route="/v1/edits"} 1' in metrics


def reference_answers(turns, prompts):
    """Greedy answers of the unedited testbed and after each whole turn, computed offline."""
    model, tokenizer = load_model("testbed", "cpu", "auto")
    editor = UltraEditor(model, EditConfig(**EDIT_FIELDS), tokenizer)
    params = SamplingParams(max_tokens=3, temperature=0)
    stops = stop_token_ids(model, tokenizer)

    def answers():
        out = []
        for prompt in prompts:
            ids = sample_ids(model, tokenizer(prompt)["input_ids"], params, stops)
            out.append("".join(d.text for d in stream_text(tokenizer, ids, stops, [], 3)))
        return out

    refs = {0: answers()}
    for number, requests in sorted(turns.items()):
        editor.edit(requests)
        refs[number] = answers()
    return refs


def test_concurrent_generations_see_whole_turns(tmp_path, facts):
    """4 clients generate while 4 turns land: no errors, and every answer is exactly what the
    model gives before any turn or after some whole turn (the turn the server says it used)."""
    prompts = [f.prompt for f in facts]
    with serving(tmp_path / "state", keep=0, turn_size=1) as client:
        stop = threading.Event()

        def generate(worker):
            seen = []
            i = worker
            while not stop.is_set() or len(seen) < 4:
                prompt = prompts[i % len(prompts)]
                if i % 3 == 0:
                    text, chunks, done = stream_text_of(client, "/v1/completions",
                                                        {"prompt": prompt, "max_tokens": 3, "temperature": 0})
                    assert done
                    turn = int(chunks[0]["system_fingerprint"].rsplit("-", 1)[1])
                else:
                    reply = complete(client, prompt)
                    text, turn = reply["choices"][0]["text"], reply["ultraedit"]["turns"][0]
                seen.append((i % len(prompts), turn, text))
                i += 1
            return seen

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(generate, w) for w in range(4)]
            ids = []
            for fact in facts:  # turn_size 1: one turn per POST
                time.sleep(0.3)
                ids.append(client.post("/v1/edits", json=[record(fact)]).json()["id"])
            statuses = [wait_resolved(client, i) for i in ids]
            time.sleep(0.3)
            stop.set()
            seen = [s for f in futures for s in f.result()]  # re-raises any client-side error
    assert all(s["status"] == "applied" for s in statuses)
    turns = {s["turn"]: [facts[k]] for k, s in enumerate(statuses)}
    assert sorted(turns) == [1, 2, 3, 4]
    refs = reference_answers(turns, prompts)
    assert refs[0] != refs[4]  # the edits change the answers being checked
    assert {turn for _, turn, _ in seen} - {0, 1, 2, 3, 4} == set()
    assert len({turn for _, turn, _ in seen}) >= 2
    wrong = [(p, t, text, refs[t][p]) for p, t, text in seen if text != refs[t][p]]
    assert not wrong, wrong[:5]


def test_bad_requests_are_refused_and_nothing_is_applied(tmp_path, facts):
    limits = Limits(api_key=API_KEY, edit_key=EDIT_KEY, max_body_bytes=4096, max_tokens=8)
    with serving(tmp_path / "state", turn_size=3, limits=limits) as client:
        engine = client.engine
        api = {"Authorization": f"Bearer {API_KEY}"}
        # keys: every endpoint needs one; edits need the edit key
        for method, path in [("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/v1/state"),
                             ("POST", "/v1/completions"), ("POST", "/v1/edits")]:
            for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": EDIT_KEY}):
                r = client.request(method, path, headers=headers, json=[record(facts[0])])
                assert r.status_code == 401, (method, path, headers)
                assert API_KEY not in r.text and EDIT_KEY not in r.text
        assert client.get("/v1/models", headers=api).status_code == 200
        r = client.post("/v1/edits", headers=api, json=[record(facts[0])])
        assert r.status_code == 401 and API_KEY not in r.text
        assert client.post("/v1/edits/revert", headers=api, json={"turns": 1}).status_code == 401

        # bodies: index and field named, nothing queued
        bad = [
            (b"{not json", 400, "not valid JSON"),
            ([], 400, "non-empty"),
            ([record(facts[0]), {"prompt": "x"}], 400, "requests[1].target: missing"),
            ([record(facts[0]), {"prompt": "x", "target": "   "}], 400, "requests[1].target"),
            ({"requests": [{"prompt": 3, "target": "y"}]}, 400, "requests[0].prompt"),
            ([record(facts[0], rephrases="oops")], 400, "requests[0].rephrases"),
            ([record(f) for f in facts], 413, "at most 3"),
            ({"requests": [record(facts[0])], "extra": 1}, 400, "unknown fields"),
            ("x" * 5000, 413, "larger than 4096 bytes"),
        ]
        for body, code, words in bad:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = client.post("/v1/edits", content=content, headers={"content-type": "application/json"})
            assert r.status_code == code, (body, r.text)
            assert words in r.json()["error"]["message"], (words, r.text)
        # oversize without a content-length (chunked upload)
        r = client.post("/v1/edits", content=iter([b"[" + b" " * 3000, b" " * 3000 + b"]"]))
        assert r.status_code == 413
        gen_bad = [
            ({"prompt": "a", "max_tokens": 9}, "max_tokens"), ({"prompt": "a", "temperature": 3}, "temperature"),
            ({"prompt": "a", "top_p": 0}, "top_p"), ({"prompt": 5}, "prompt"), ({"prompt": "a", "n": 2}, "n"),
            ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"prompt": "a", "seed": "s"}, "seed"),
        ]
        for body, param in gen_bad:
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        r = client.post("/v1/completions", json={"prompt": "a " * 30, "max_tokens": 8})
        assert r.status_code == 400 and "context of 32 tokens" in r.json()["error"]["message"]
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a " * 28}]})
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] <= 32  # default max_tokens cut to fit
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user"}]})
        assert r.status_code == 400 and "messages[0].content" in r.json()["error"]["message"]
        assert client.get("/v1/edits/edit-nope").status_code == 404
        assert client.post("/v1/edits/revert", json={"turns": 0}).status_code == 400

        time.sleep(0.3)
        assert engine.queued_requests() == 0 and engine.submissions == {}
        assert client.get("/v1/state").json()["turns"] == 0
        assert engine.metrics.value("ultraedit_edits_submitted_total") == 0
        assert not (tmp_path / "state" / JOURNAL).exists() or (tmp_path / "state" / JOURNAL).read_text() == ""
        assert client.get("/health").json()["status"] == "ok"


def test_failed_turn_reports_why_and_changes_nothing(tmp_path, facts):
    with serving(tmp_path / "state", edit_fields={**EDIT_FIELDS, "lr": 1e38}) as client:
        before = answer(client, facts[0].prompt)
        posted = client.post("/v1/edits", json=[record(facts[0])]).json()
        status = wait_resolved(client, posted["id"])
        assert status["status"] == "failed" and "not finite" in status["error"], status
        assert client.get("/v1/state").json()["turns"] == 0 and client.engine.editor.turns == 0
        assert answer(client, facts[0].prompt) == before
        assert "ultraedit_edits_failed_total 1" in client.get("/metrics").text
        assert client.get("/health").json()["status"] == "ok"


def test_resume_refuses_other_hyperparameters(tmp_path):
    from ultraedit.session import StateError

    model, tokenizer = load_model("testbed", "cpu", "auto")
    first = Engine(model, tokenizer, EngineConfig(state=tmp_path / "s", model_name="t", edit_fields=EDIT_FIELDS))
    first.start(timeout=60)
    first.stop(30)
    model, tokenizer = load_model("testbed", "cpu", "auto")
    again = Engine(model, tokenizer, EngineConfig(state=tmp_path / "s", model_name="t", edit_fields=EDIT_FIELDS,
                                                  check_fields={"lr": 5e-3}))
    with pytest.raises(StateError, match="lr=0.005 differs from the saved state's lr=0.01"):
        again.start(timeout=60)
    assert not again.healthy


def test_openai_client_unchanged(tmp_path, facts):
    openai = pytest.importorskip("openai")
    with serving(tmp_path / "state", limits=Limits(api_key=API_KEY)) as client:
        client.headers["Authorization"] = f"Bearer {API_KEY}"  # no edit key on this server: the API key edits
        oa = openai.OpenAI(base_url=f"{str(client.base_url).rstrip('/')}/v1", api_key=API_KEY, max_retries=0, timeout=30)
        assert [m.id for m in oa.models.list().data] == ["testbed"]
        fact = facts[1]
        before = oa.completions.create(model="testbed", prompt=fact.prompt, max_tokens=3, temperature=0)
        assert before.choices[0].text.strip() != fact.target and before.usage.completion_tokens >= 1
        edit = client.post("/v1/edits", json=[record(fact)]).json()
        wait_resolved(client, edit["id"])
        after = oa.completions.create(model="testbed", prompt=fact.prompt, max_tokens=3, temperature=0)
        assert after.choices[0].text.strip() == fact.target
        stream = oa.chat.completions.create(model="testbed", messages=[{"role": "user", "content": fact.prompt}],
                                            max_tokens=3, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip() == fact.target
        a = oa.completions.create(model="testbed", prompt="The", max_tokens=6, temperature=1.0, top_p=0.9, seed=7)
        b = oa.completions.create(model="testbed", prompt="The", max_tokens=6, temperature=1.0, top_p=0.9, seed=7)
        assert a.choices[0].text == b.choices[0].text  # seeded sampling is reproducible
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{str(client.base_url).rstrip('/')}/v1", api_key="wrong", max_retries=0).models.list()


# ------------------------------------------------------------------------------------------------
def start_cli(state, env_extra=None):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env_extra or {})}
    env.pop("ULTRAEDIT_API_KEY", None)
    cmd = [sys.executable, "-m", "ultraedit.cli", "serve", "--model", "testbed", "--state", str(state),
           "--port", "0", "--turn-size", "4", "--threads", "1", "--edit-key", EDIT_KEY]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {proc.stderr.read()[-2000:]}")
    client = httpx.Client(base_url=line.rsplit(" ", 1)[1].strip(), timeout=30,
                          headers={"Authorization": f"Bearer {EDIT_KEY}"})
    return proc, client


def wait_for_stderr(proc, needle, timeout=60):
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if needle in line:
            return
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"never saw {needle!r}: {''.join(lines)[-2000:]}")


def kill9(proc, client):
    client.close()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()
    proc.stderr.close()


def test_kill_9_mid_turn_then_restart(tmp_path, facts):
    """Turn 1 acknowledged; SIGKILL while turn 2 is being saved -> restart serves turn 1 and replays
    edit B; SIGKILL after B's turn is saved but before it is journaled -> the state and B's status
    (recovered from the state) agree."""
    state = tmp_path / "state"
    with serving(state, keep=0) as client:  # turn 1 (acknowledged) in-process
        a = client.post("/v1/edits", json=[record(facts[0])]).json()["id"]
        assert wait_resolved(client, a)["turn"] == 1

    proc, client = start_cli(state, {"ULTRAEDIT_SAVE_PAUSE": "rename"})
    try:
        status = client.get(f"/v1/edits/{a}").json()
        assert (status["status"], status["turn"]) == ("applied", 1)
        b = client.post("/v1/edits", json=[record(facts[1])]).json()["id"]
        wait_for_stderr(proc, "ultraedit-save-paused rename")  # turn 2 computed, its save half-written
        assert client.get(f"/v1/edits/{b}").json()["status"] == "queued"
        assert client.get("/health").json()["turn"] == 1
    finally:
        kill9(proc, client)

    proc, client = start_cli(state, {"ULTRAEDIT_SAVE_PAUSE": "cleanup"})
    try:
        assert client.get("/health").json()["turn"] == 1  # the last acknowledged turn
        status = client.get(f"/v1/edits/{b}").json()
        assert status["status"] == "queued" and status["replayed_after_restart"] is True
        assert client.get(f"/v1/edits/{a}").json()["status"] == "applied"
        wait_for_stderr(proc, "ultraedit-save-paused cleanup")  # turn 2 saved, not yet acknowledged
        assert client.get(f"/v1/edits/{b}").json()["status"] == "queued"
    finally:
        kill9(proc, client)

    with serving(state, keep=0) as client:  # the state holds turn 2; B's status comes back from it
        assert client.get("/health").json()["turn"] == 2
        assert client.get(f"/v1/edits/{a}").json()["turn"] == 1
        status = client.get(f"/v1/edits/{b}").json()
        assert (status["status"], status["turn"]) == ("applied", 2)
        assert answer(client, facts[1].prompt) == facts[1].target
        assert answer(client, facts[0].prompt) == facts[0].target
        assert client.engine.queued_requests() == 0
    journal = [json.loads(line) for line in (state / JOURNAL).read_text().splitlines()]
    assert [r["op"] for r in journal] == ["submit", "applied", "submit", "applied"]
    assert journal[-1].get("recovered") is True and journal[-1]["ids"] == [b]


# ------------------------------------------------------------------------------------------------
def test_reconcile_replays_recovers_and_marks_reverts():
    def submit(i, seq):
        return {"op": "submit", "id": i, "seq": seq, "time": "t", "records": [{}]}

    journal = [submit("a", 1), {"op": "applied", "ids": ["a"], "turn": 1, "time": "t"},
               submit("c", 2), {"op": "failed", "ids": ["c"], "error": "boom", "time": "t"}, submit("b", 3)]
    # crash after b's turn was saved, before it was journaled: the state's word counts
    subs, fixes = reconcile(journal, {"recent": [{"turn": 2, "ids": ["b"]}]}, 2)
    assert {k: (s.status, s.turn) for k, s in subs.items()} == {
        "a": ("applied", 1), "c": ("failed", None), "b": ("applied", 2)}
    assert [(f["op"], f["ids"], f["turn"]) for f in fixes] == [("applied", ["b"], 2)]
    # crash before b's turn was saved: b is queued again
    subs, fixes = reconcile(journal, {"recent": [{"turn": 1, "ids": ["a"]}]}, 1)
    assert subs["b"].status == "queued" and fixes == []
    # crash after a revert of turn 2 was saved, before it was journaled
    journal += [{"op": "applied", "ids": ["b"], "turn": 2, "time": "t"}, submit("e", 4)]
    subs, fixes = reconcile(journal, {"recent": [{"turn": 1, "ids": ["a"]}]}, 1)
    assert (subs["b"].status, subs["e"].status, subs["a"].status) == ("reverted", "queued", "applied")
    assert [(f["op"], f["ids"]) for f in fixes] == [("reverted", ["b"])]


def test_stop_strings_and_sampling():
    class Tok:  # one character per token id
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids if i != 0)

    text = "hello world"
    deltas = list(stream_text(Tok(), iter(map(ord, text)), {0}, ["o w"], 50))
    assert "".join(d.text for d in deltas) == "hell" and deltas[-1].finish_reason == "stop"
    deltas = list(stream_text(Tok(), iter(map(ord, "abc")), {0}, [], 3))
    assert "".join(d.text for d in deltas) == "abc" and deltas[-1].finish_reason == "length"
    deltas = list(stream_text(Tok(), iter([ord("a"), 0]), {0}, [], 9))
    assert "".join(d.text for d in deltas) == "a" and deltas[-1].finish_reason == "stop"
    import torch

    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    gen = torch.Generator().manual_seed(0)
    assert pick_token(logits, SamplingParams(1, temperature=0), gen) == 1
    picks = {pick_token(logits, SamplingParams(1, temperature=1.0, top_p=0.5), gen) for _ in range(50)}
    assert picks == {1}  # the nucleus of p=0.5 is the top token alone
    picks = {pick_token(logits, SamplingParams(1, temperature=1.0, top_p=0.99), gen) for _ in range(200)}
    assert picks == {1, 2}


def test_rwlock_writer_waits_for_readers_and_blocks_new_ones():
    lock, events = RWLock(), []
    reading = threading.Event()

    def reader(name, hold):
        with lock.read():
            events.append(f"{name}+")
            reading.set()
            time.sleep(hold)
            events.append(f"{name}-")

    def writer():
        with lock.write():
            events.append("W")

    first = threading.Thread(target=reader, args=("r1", 0.3))
    first.start()
    reading.wait()
    w = threading.Thread(target=writer)
    w.start()
    time.sleep(0.1)
    late = threading.Thread(target=reader, args=("r2", 0))
    late.start()
    for t in (first, w, late):
        t.join(5)
    assert events == ["r1+", "r1-", "W", "r2+", "r2-"]


def test_a_turn_rolled_back_after_a_failed_save_leaves_no_trace():
    """The engine's snapshot (the editor's, with the session's bookkeeping) restores everything a turn
    changes: weights, normalizers, counters, the float32 deltas of bf16 weights, the key memory and
    the edit log; the next turn then computes what a run that never had the failed turn computes."""
    import torch

    requests = load_requests(30)
    config = EditConfig(modules=list(TESTBED_MODULES), lr=LR, memory={"weight": 1.0})
    model, tokenizer = load_model("testbed", "cpu", "bfloat16")
    editor = UltraEditor(model, config, tokenizer)
    editor.edit(requests[:10])
    snapshot = editor.snapshot(bookmark=True)
    editor.edit(requests[10:20])  # then saving it fails
    editor.restore(snapshot)
    assert editor.session.log_seq == 1 and len(editor.session.pending_log) == 1
    editor.edit(requests[20:30])

    twin = UltraEditor(load_model("testbed", "cpu", "bfloat16")[0], config, tokenizer)
    twin.edit(requests[:10])
    twin.edit(requests[20:30])
    assert editor.turns == twin.turns == 2 and editor.edits == twin.edits == 20
    for name in editor.modules:
        assert torch.equal(editor.modules[name].weight, twin.modules[name].weight), name
        assert torch.equal(editor.session.delta[name], twin.session.delta[name]), name
        memory, twins = editor.stage_states()["memory"], twin.stage_states()["memory"]
        assert torch.equal(memory[name], twins[name]), name
