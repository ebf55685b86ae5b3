"""Load test of ``ultraedit serve`` on loopback: N concurrent clients for T seconds while an edit
is posted every few seconds.

Starts ``ultraedit serve`` as a subprocess on 127.0.0.1 (a free port, a fresh state directory),
then runs ``--clients`` threads that each send greedy ``/v1/completions`` back to back (prompts
drawn from the testbed's edit requests), and one editor thread that every ``--edit-every`` seconds
posts ``--edits-per-post`` edits and measures

* ack: POST -> ``GET /v1/edits/{id}`` says applied (the turn is saved and served), polled every 20 ms;
* visible: POST -> a completion of the edited prompt returns from the turn that holds it, and
  whether its answer is the new target (the edit changed the greedy answer).

Reports requests/s, latency p50/p99, errors (any non-200 or transport error), tokens/s and the
edit latencies; writes JSON (``--out``). Bounded: ``--seconds`` of load, at most
``--max-requests`` requests, every request with a 60 s timeout; only 127.0.0.1 is contacted.

    python benchmarks/serve_load.py --model testbed --clients 4 --seconds 30 --edit-every 3 \
        --out benchmarks/results/serve-load-testbed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

SRC = str(Path(__file__).resolve().parents[1] / "src")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def start_server(args: argparse.Namespace, state: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "ultraedit.cli", "serve", "--model", args.model, "--state", str(state),
           "--port", "0", "--turn-size", str(args.turn_size), "--max-concurrent", str(args.max_concurrent),
           "--keep-turn-deltas", "0"]
    if args.lr is not None:
        cmd += ["--lr", str(args.lr)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, line.rsplit(" ", 1)[1].strip()


def fact_requests(n: int) -> list[dict]:
    from ultraedit.testbed import load_requests

    return [{"prompt": r.prompt, "target": r.target, "id": r.id} for r in load_requests(n)]


class Load:
    def __init__(self, url: str, args: argparse.Namespace, prompts: list[str]) -> None:
        self.url, self.args, self.prompts = url, args, prompts
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.tokens = 0
        self.sent = 0
        self.stop_at = 0.0

    def take(self) -> bool:
        with self.lock:
            if time.monotonic() >= self.stop_at or self.sent >= self.args.max_requests:
                return False
            self.sent += 1
            return True

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while self.take():
                body = {"prompt": rng.choice(self.prompts), "max_tokens": self.args.max_tokens, "temperature": 0}
                start = time.perf_counter()
                try:
                    r = http.post("/v1/completions", json=body)
                    ok, what = r.status_code == 200, f"HTTP {r.status_code}"
                except httpx.HTTPError as err:
                    ok, what, r = False, type(err).__name__, None
                elapsed = time.perf_counter() - start
                with self.lock:
                    if ok:
                        self.latencies.append(elapsed)
                        self.tokens += r.json()["usage"]["completion_tokens"]
                    else:
                        self.errors.append(what)


def edit_loop(url: str, args: argparse.Namespace, facts: list[dict], stop_at: float, out: list[dict]) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        k = 0
        next_post = time.monotonic() + args.edit_every
        while next_post + 2 < stop_at and (k + 1) * args.edits_per_post <= len(facts):
            time.sleep(max(0.0, next_post - time.monotonic()))
            batch = facts[k * args.edits_per_post:(k + 1) * args.edits_per_post]
            k += 1
            next_post += args.edit_every
            start = time.perf_counter()
            posted = http.post("/v1/edits", json=batch)
            if posted.status_code != 202:
                out.append({"error": f"HTTP {posted.status_code}"})
                continue
            edit_id = posted.json()["id"]
            while (status := http.get(f"/v1/edits/{edit_id}").json())["status"] == "queued":
                time.sleep(0.02)
            ack = time.perf_counter() - start
            record = {"id": edit_id, "status": status["status"], "turn": status.get("turn"), "ack_s": ack}
            if status["status"] == "applied":
                for _ in range(50):  # acknowledged means served: the first probe already sees it
                    reply = http.post("/v1/completions", json={"prompt": batch[0]["prompt"], "max_tokens": 4,
                                                               "temperature": 0}).json()
                    if reply["ultraedit"]["turns"][0] >= status["turn"]:
                        break
                record["visible_s"] = time.perf_counter() - start
                record["answer_is_target"] = reply["choices"][0]["text"].strip() == batch[0]["target"]
            out.append(record)


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="testbed")
    p.add_argument("--lr", type=float, default=None, help="edit step size (testbed default here: 1e-2, visible edits)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--max-requests", type=int, default=20_000)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--edit-every", type=float, default=3.0, help="seconds between edit POSTs (0: no edits)")
    p.add_argument("--edits-per-post", type=int, default=1)
    p.add_argument("--turn-size", type=int, default=100)
    p.add_argument("--max-concurrent", type=int, default=4)
    p.add_argument("--threads", type=int, help="server torch threads")
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args()
    if args.lr is None and args.model == "testbed":
        args.lr = 1e-2

    facts = fact_requests(400)
    random.Random(0).shuffle(facts)
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        proc, url = start_server(args, Path(tmp) / "state")
        startup = time.perf_counter() - began
        try:
            prompts = [f["prompt"] for f in facts[200:]]  # never edited: the load's answers stay comparable
            load = Load(url, args, prompts)
            httpx.post(f"{url}/v1/completions", json={"prompt": prompts[0], "max_tokens": 2}, timeout=60)  # warm-up
            load.stop_at = time.monotonic() + args.seconds
            edits: list[dict] = []
            threads = [threading.Thread(target=load.client, args=(i,)) for i in range(args.clients)]
            if args.edit_every > 0:
                threads.append(threading.Thread(target=edit_loop, args=(url, args, facts[:200], load.stop_at, edits)))
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            metrics_text = httpx.get(f"{url}/metrics", timeout=10).text
        finally:
            proc.terminate()
            proc.wait(30)

    applied = [e for e in edits if e.get("status") == "applied"]
    turn_count = metric(metrics_text, "ultraedit_turn_seconds_count") or 0
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_end": os.getloadavg()},
        "server_startup_s": round(startup, 2),
        "wall_s": round(wall, 2),
        "requests": len(load.latencies) + len(load.errors),
        "errors": len(load.errors),
        "error_kinds": sorted(set(load.errors)),
        "requests_per_s": round(len(load.latencies) / wall, 2),
        "completion_tokens_per_s": round(load.tokens / wall, 1),
        "latency_s": {"p50": percentile(load.latencies, 50), "p99": percentile(load.latencies, 99),
                      "max": max(load.latencies, default=None)},
        "edits": {
            "posted": len(edits), "applied": len(applied),
            "ack_s": {"p50": percentile([e["ack_s"] for e in applied], 50), "max": max((e["ack_s"] for e in applied), default=None)},
            "visible_s": {"p50": percentile([e["visible_s"] for e in applied], 50),
                          "max": max((e["visible_s"] for e in applied), default=None)},
            "answer_is_target": sum(e["answer_is_target"] for e in applied),
            "turn_seconds_mean": (metric(metrics_text, "ultraedit_turn_seconds_sum") or 0) / turn_count if turn_count else None,
        },
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
