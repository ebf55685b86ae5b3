"""Soak test of crash safety (not CI): a long lifelong run killed with SIGKILL at random points.

A worker process edits a tiny random Llama turn after turn (turn t's requests are seeded by t),
saving the state after every turn. This script kills it with SIGKILL at a random instant about
every ``--kill-every`` turns (inside a turn, inside a save, between them), restarts it (it resumes
from the saved state), and at the end compares the state with that of an uninterrupted run of the
same turns: the delta, the statistics and the counters must be equal bit for bit (float32), the
edit log must hold every turn exactly once, in order, and no temporary file may be left.

    python benchmarks/soak.py --turns 1000 --kill-every 50 --out benchmarks/results/soak-1000-turns.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


# ------------------------------------------------------------------ worker

def tiny_llama():
    import torch
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return T.AutoModelForCausalLM.from_config(config).eval()


def turn_batches(turn: int):
    """Turn ``turn``'s minibatches: 10 random requests (prompts 3-8 tokens, targets 1-3), 2 minibatches."""
    import torch

    from ultraedit.core.batching import collate

    gen = torch.Generator().manual_seed(turn)
    examples = []
    for _ in range(10):
        p, t = int(torch.randint(3, 9, (1,), generator=gen)), int(torch.randint(1, 4, (1,), generator=gen))
        prompt = torch.randint(3, 97, (p,), generator=gen).tolist()
        target = torch.randint(3, 97, (t,), generator=gen).tolist()
        examples.append((prompt + target[:-1], [-100] * (p - 1) + target))
    return [collate(examples[i : i + 5], 0) for i in (0, 5)]


def worker(directory: Path, turns: int, save_every: int) -> None:
    import torch

    from ultraedit import EditConfig, UltraEditor
    from ultraedit.session import has_state

    torch.set_num_threads(1)
    model = tiny_llama()
    if has_state(directory):
        editor = UltraEditor.load(model, directory)
    else:
        editor = UltraEditor(model, EditConfig(lr=1e-3))
    print(f"started {editor.turns}", flush=True)
    while editor.turns < turns:
        editor.edit_tokens(turn_batches(editor.turns + 1))
        if editor.turns % save_every == 0 or editor.turns == turns:
            editor.save(directory)
            print(f"saved {editor.turns}", flush=True)


# ------------------------------------------------------------------ driver

def start(directory: Path, turns: int, save_every: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(HERE), "--worker", str(directory), "--turns", str(turns), "--save-every", str(save_every)],
        stdout=subprocess.PIPE, text=True, env=env,
    )


def interrupted_run(directory: Path, turns: int, kill_every: int, rng: random.Random) -> dict:
    kills, restarts = [], 0
    while True:
        proc = start(directory, turns, 1)
        target = rng.randint(max(1, kill_every // 2), kill_every * 3 // 2)  # saves in this life before the kill
        saved_here, stamps, resumed_at = 0, [], None
        for line in proc.stdout:
            kind, number = line.split()
            if kind == "started":
                resumed_at = int(number)
                continue
            saved_here += 1
            stamps.append(time.perf_counter())
            if saved_here >= target and int(number) < turns:
                per_turn = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
                delay = rng.uniform(0, 1.5 * per_turn)  # a random instant in the next turn or its save
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                kills.append({"after_saved_turn": int(number), "delay_s": round(delay, 4)})
                break
        proc.wait()
        if proc.returncode == 0:
            return {"kills": kills, "restarts": restarts}
        if proc.returncode != -signal.SIGKILL:
            raise SystemExit(f"the worker failed (exit {proc.returncode}) after resuming at turn {resumed_at}")
        restarts += 1


def compare(interrupted: Path, uninterrupted: Path) -> dict:
    from safetensors.torch import load_file

    from ultraedit.session import lock, read_log, read_state, store

    meta_a, version_a = read_state(interrupted)
    meta_b, version_b = read_state(uninterrupted)
    equal = {}
    for name in (store.DELTA, store.NORMALIZERS):
        a, b = load_file(version_a / name), load_file(version_b / name)
        equal[name] = sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()) for k in a)
    equal["exact fixes"] = (version_a / store.EXACT).exists() == (version_b / store.EXACT).exists()
    equal["counters"] = (meta_a["turns"], meta_a["edits"]) == (meta_b["turns"], meta_b["edits"])
    log = list(read_log(interrupted))
    leftovers = sorted(p.name for p in interrupted.iterdir() if p.name not in (store.CURRENT, store.LOG, lock.LOCK, version_a.name))
    return {
        "bit_exact": equal,
        "log_turns_once_in_order": [r["turn"] for r in log] == list(range(1, meta_a["turns"] + 1))
        and [r["seq"] for r in log] == list(range(1, len(log) + 1)),
        "leftover_files": leftovers,
        "turns": meta_a["turns"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--kill-every", type=int, default=50, help="about how many turns between kills")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the result JSON here")
    parser.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--save-every", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker), args.turns, args.save_every)
        return
    began = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="ultraedit-soak-"))
    try:
        run = interrupted_run(root / "killed", args.turns, args.kill_every, random.Random(args.seed))
        reference = start(root / "reference", args.turns, args.turns)
        reference.communicate()
        if reference.returncode != 0:
            raise SystemExit(f"the uninterrupted run failed (exit {reference.returncode})")
        result = {"turns": args.turns, "kill_every": args.kill_every, "seed": args.seed,
                  "kills": len(run["kills"]), "kill_points": run["kills"], **compare(root / "killed", root / "reference")}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["ok"] = all(result["bit_exact"].values()) and result["log_turns_once_in_order"] and not result["leftover_files"]
    result["seconds"] = round(time.perf_counter() - began, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if not result["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
