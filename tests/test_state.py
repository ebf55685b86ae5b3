"""Saved sessions: exact resume, crash-safe saves, fingerprint refusal, deltas/merge, revert, log."""

import copy
import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ultraedit
from ultraedit import EditConfig, UltraEditor
from ultraedit import session as st
from ultraedit.session import files as st_files, lock as st_lock, store

from tiny import random_turn, tiny_model

LR = 1e-3  # large enough that every turn depends visibly on the weights left by earlier turns
TESTS = Path(__file__).parent



def run_turns(editor, seeds):
    for seed in seeds:
        editor.edit_tokens(random_turn(seed, requests=10, batch_size=5))


def edited_weights(editor):
    return {n: m.weight.detach().clone() for n, m in editor.modules.items()}


def normalizer_states(editor):
    """The editor's lifelong statistics: normalizers by shape, and the stages' states (the key memory)."""
    states = {s: {k: v.clone() for k, v in n.state_dict().items()} for s, n in editor.normalizers.items()}
    states["stages"] = {name: {k: t.clone() for k, t in state.items()} for name, state in editor.stage_states().items()}
    return states


def assert_same_weights(editor, expected):
    for name, module in editor.modules.items():
        assert torch.equal(module.weight, expected[name]), f"{name} differs"


def assert_same_stats(editor, expected):
    for shape, norm in editor.normalizers.items():
        for key, value in norm.state_dict().items():
            assert torch.equal(value, expected[shape][key]), f"normalizer {shape} {key} differs"
    states = editor.stage_states()
    assert states.keys() == expected["stages"].keys()
    for name, state in states.items():
        assert state.keys() == expected["stages"][name].keys()
        for key, value in state.items():
            assert torch.equal(value, expected["stages"][name][key]), f"{name} state {key} differs"


@pytest.mark.parametrize(
    "arch,dtype", [("llama", torch.float32), ("llama", torch.bfloat16), ("gpt2", torch.float32)]
)
def test_resume_equals_one_process(tmp_path, arch, dtype):
    base = tiny_model(arch, dtype=dtype)
    fresh = copy.deepcopy(base)
    config = EditConfig(lr=LR)
    one = UltraEditor(base, config)
    run_turns(one, [10, 11])
    one.save(tmp_path / "s")
    run_turns(one, [12, 13])

    resumed = UltraEditor.load(fresh, tmp_path / "s")
    assert resumed.config.to_dict() == {**config.to_dict(), "modules": list(one.modules)}
    assert (resumed.turns, resumed.edits) == (2, 20)
    run_turns(resumed, [12, 13])
    assert (resumed.turns, resumed.edits) == (one.turns, one.edits) == (4, 40)
    # Exact, not merely <= 1e-6: the state holds W_now - W_base, not a sum of rounded turn shifts.
    assert_same_weights(resumed, edited_weights(one))
    assert_same_stats(resumed, normalizer_states(one))
    for name, module in one.modules.items():  # the run really moved the weights
        assert float((module.weight.detach().float() - resumed.session.base[name].float()).norm()) > 0


def test_delta_in_model_dtype_is_half_size_and_close(tmp_path):
    model = tiny_model("llama", dtype=torch.bfloat16)
    fresh = copy.deepcopy(model)
    editor = UltraEditor(model, EditConfig(lr=LR))
    run_turns(editor, [1, 2])
    full = editor.save(tmp_path / "f32")
    half = editor.save(tmp_path / "bf16", delta_dtype="model")
    assert (half / store.DELTA).stat().st_size < 0.6 * (full / store.DELTA).stat().st_size
    loaded = UltraEditor.load(fresh, tmp_path / "bf16")
    for name, module in editor.modules.items():
        diff = (loaded.modules[name].weight.detach().float() - module.weight.detach().float()).norm()
        assert float(diff) <= 1e-2 * float(module.weight.detach().float().norm())


_EXPECTED = {}


def _expected_after(turns):
    """(weights, statistics) of an uninterrupted run of ``turns`` turns (seeds 20, 21, ...)."""
    if turns not in _EXPECTED:
        editor = UltraEditor(tiny_model("llama"), EditConfig(lr=LR))
        run_turns(editor, [20 + t for t in range(turns)])
        _EXPECTED[turns] = edited_weights(editor), normalizer_states(editor)
    return _EXPECTED[turns]


@pytest.mark.parametrize("stage", st_files.SAVE_STAGES)
def test_failure_at_any_save_stage_leaves_old_or_new_state(tmp_path, monkeypatch, stage):
    directory = tmp_path / "s"
    editor = UltraEditor(tiny_model("llama"), EditConfig(lr=LR))
    run_turns(editor, [20, 21])
    editor.save(directory)
    run_turns(editor, [22])

    def crash(name):
        if name == stage:
            raise RuntimeError(f"simulated crash at {name}")

    monkeypatch.setattr(store, "checkpoint", crash)
    monkeypatch.setattr(st_files, "checkpoint", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        editor.save(directory)
    monkeypatch.undo()

    loaded = UltraEditor.load(tiny_model("llama"), directory)
    new = stage in ("log", "cleanup")  # CURRENT already names the new version
    assert loaded.turns == (3 if new else 2)
    weights, stats = _expected_after(loaded.turns)
    assert_same_weights(loaded, weights)
    assert_same_stats(loaded, stats)
    # The next save completes the edit log: every turn exactly once, in order.
    run_turns(loaded, [22 + (loaded.turns - 2)])
    loaded.save(directory)
    records = list(st.read_log(directory))
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert [r["turn"] for r in records] == ([1, 2, 3, 4] if new else [1, 2, 3])
    current = (directory / store.CURRENT).read_text().strip()
    assert sorted(p.name for p in directory.iterdir()) == sorted([".lock", "CURRENT", "edits.jsonl", current])


KILLED_AT = {"delta": 2, "rename": 2, "current": 2, "log": 3, "cleanup": 3}  # stage -> turns the state holds

KILLED_AT_EVERY_STAGE = textwrap.dedent(
    """
    import os, shutil, sys
    sys.path.insert(0, {tests!r})
    from tiny import random_turn, tiny_model
    from ultraedit import EditConfig, UltraEditor
    stages = {stages!r}
    editor = UltraEditor(tiny_model("llama"), EditConfig(lr={lr!r}))
    for seed in (20, 21):
        editor.edit_tokens(random_turn(seed, requests=10, batch_size=5))
    editor.save(os.path.join({root!r}, "two-turns"))
    for stage in stages:  # the same saved session in one directory per stage
        shutil.copytree(os.path.join({root!r}, "two-turns"), os.path.join({root!r}, stage))
    editor.edit_tokens(random_turn(22, requests=10, batch_size=5))
    children = []
    for stage in stages:  # one forked saver per stage: the import above is paid once
        pid = os.fork()
        if pid == 0:
            os.environ["ULTRAEDIT_SAVE_PAUSE"] = stage
            editor.save(os.path.join({root!r}, stage))
            os._exit(0)
        print(stage, pid, flush=True)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    """
)


def test_process_killed_at_every_stage_of_a_save(tmp_path):
    """A saver killed with SIGKILL where its save pauses, at every stage: the state is the old or
    the new one, complete, and the next save tidies up and completes the edit log."""
    script = KILLED_AT_EVERY_STAGE.format(tests=str(TESTS), lr=LR, root=str(tmp_path), stages=list(KILLED_AT))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    killed = set()
    try:
        pids = dict(proc.stdout.readline().split() for _ in KILLED_AT)
        for line in proc.stderr:
            if line.startswith("ultraedit-save-paused"):
                stage = line.split()[1]
                os.kill(int(pids[stage]), signal.SIGKILL)
                killed.add(stage)
                if killed == set(KILLED_AT):
                    break
        assert killed == set(KILLED_AT), f"savers that never paused: {set(KILLED_AT) - killed}"
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait(timeout=60)
    for stage, turns in KILLED_AT.items():
        directory = tmp_path / stage
        if stage in ("delta", "rename"):  # a half-written (or unnamed) version lies in a temp dir, ignored by readers
            assert any(p.name.startswith(".tmp-") for p in directory.iterdir()), stage
        loaded = UltraEditor.load(tiny_model("llama"), directory)
        assert loaded.turns == turns, stage
        assert_same_weights(loaded, _expected_after(turns)[0])
        assert_same_stats(loaded, _expected_after(turns)[1])
        loaded.save(directory)
        current = (directory / store.CURRENT).read_text().strip()
        assert sorted(p.name for p in directory.iterdir()) == sorted([".lock", "CURRENT", "edits.jsonl", current]), stage
        assert [r["turn"] for r in st.read_log(directory)] == list(range(1, turns + 1)), stage


def test_fingerprint_refuses_another_base_model(tmp_path):
    editor = UltraEditor(tiny_model("llama", seed=0), EditConfig(lr=LR))
    run_turns(editor, [1])
    editor.save(tmp_path / "s")

    with pytest.raises(st.FingerprintError, match="original weights of the edit modules differ"):
        UltraEditor.load(tiny_model("llama", seed=1), tmp_path / "s")
    with pytest.raises(st.FingerprintError, match="architecture: state has 'LlamaForCausalLM', model is 'GPT2LMHeadModel'"):
        UltraEditor.load(tiny_model("gpt2"), tmp_path / "s")
    with pytest.raises(st.FingerprintError, match=r"shape \[128, 64\], state has \[64, 32\]"):
        UltraEditor.load(tiny_model("llama", hidden=64), tmp_path / "s")
    with pytest.raises(st.FingerprintError, match="dtype bfloat16, state has float32"):
        UltraEditor.load(tiny_model("llama", dtype=torch.bfloat16), tmp_path / "s")
    with pytest.raises(st.FingerprintError, match="different base model"):
        ultraedit.apply_delta(tiny_model("llama", seed=1), tmp_path / "s")
    already = tiny_model("llama")
    ultraedit.apply_delta(already, tmp_path / "s")
    with pytest.raises(st.FingerprintError, match="already edited"):  # applying twice is refused
        ultraedit.apply_delta(already, tmp_path / "s")
    # strict=False: the same checkpoint in another dtype (shapes still checked)
    half = tiny_model("llama", dtype=torch.bfloat16)
    ultraedit.apply_delta(half, tmp_path / "s", strict=False)
    for name, module in editor.modules.items():
        torch.testing.assert_close(half.get_submodule(name).weight.float(), module.weight, rtol=0.02, atol=0.02)
    with pytest.raises(st.StateError, match="no saved state"):
        UltraEditor.load(tiny_model("llama"), tmp_path / "nothing-here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_delta_and_merge_round_trip(tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    editor = UltraEditor(tiny_model("llama", dtype=dtype), EditConfig(lr=LR))
    run_turns(editor, [5, 6, 7])
    version = editor.save(tmp_path / "s")
    # The delta is the size of the edit modules (float32), not of the model.
    module_bytes = sum(m.weight.numel() * 4 for m in editor.modules.values())
    assert module_bytes <= (version / store.DELTA).stat().st_size <= module_bytes + 4096
    model_bytes = sum(p.numel() * 4 for p in editor.model.parameters())
    assert (version / store.DELTA).stat().st_size < model_bytes / 5

    applied = tiny_model("llama", dtype=dtype)
    meta = ultraedit.apply_delta(applied, tmp_path / "s")
    assert (meta["turns"], meta["edits"]) == (3, 30)
    for key, value in editor.model.state_dict().items():
        assert torch.equal(applied.state_dict()[key], value), key

    out = ultraedit.merge(tiny_model("llama", dtype=dtype), tmp_path / "s", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    for key, value in editor.model.state_dict().items():
        assert torch.equal(merged.state_dict()[key], value), key
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    # from_pretrained keeps the rotary inv_freq buffer in float32 where tiny_model(...).to(bf16)
    # rounds it, so compare the merged weights in a twin built like the editor's model (bit-exact),
    # and the merged model itself within rounding.
    twin = tiny_model("llama", dtype=dtype)
    twin.load_state_dict(merged.state_dict())
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, editor.model(ids).logits)
        torch.testing.assert_close(merged(ids).logits, editor.model(ids).logits, rtol=0.02, atol=0.02)
    assert json.loads((out / "ultraedit_merge.json").read_text())["edits"] == 30


@pytest.mark.parametrize("dtype,memory", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, {"weight": 1.0})])
def test_revert_last_is_exact(tmp_path, dtype, memory):
    """Weights and statistics (normalizers; with ``memory``, the key memory too) after a revert are
    bit for bit those before the reverted turns, also after a save and load."""
    editor = UltraEditor(tiny_model("llama", dtype=dtype), EditConfig(lr=LR, memory=memory), keep_turn_deltas=2)
    run_turns(editor, [30, 31])
    after_two, stats_two = edited_weights(editor), normalizer_states(editor)
    run_turns(editor, [32])
    after_three, stats_three = edited_weights(editor), normalizer_states(editor)
    run_turns(editor, [33])
    editor.save(tmp_path / "s")  # the two undo snapshots are saved too

    report = editor.revert_last(1)
    assert (report.reverted_turns, report.turns, report.edits, report.edits_removed) == ([4], 3, 30, 10)
    assert_same_weights(editor, after_three)
    assert_same_stats(editor, stats_three)
    editor.revert_last(1)
    assert_same_weights(editor, after_two)
    assert_same_stats(editor, stats_two)
    with pytest.raises(st.StateError, match="only the last 0 are kept"):
        editor.revert_last(1)
    # Continuing after a revert is the same as never having applied the reverted turns.
    run_turns(editor, [34])
    never = UltraEditor(tiny_model("llama", dtype=dtype), EditConfig(lr=LR, memory=memory))
    run_turns(never, [30, 31, 34])
    assert_same_weights(editor, edited_weights(never))

    resumed = UltraEditor.load(tiny_model("llama", dtype=dtype), tmp_path / "s")
    assert [s.turn for s in resumed.session.undo] == [3, 4]
    resumed.revert_last(2)
    assert resumed.turns == 2 and resumed.edits == 20
    assert_same_weights(resumed, after_two)
    assert_same_stats(resumed, stats_two)
    resumed.save(tmp_path / "s")
    assert st.info(tmp_path / "s")["turns"] == 2
    events = [r["event"] for r in st.read_log(tmp_path / "s")]
    assert events == ["turn"] * 4 + ["revert"]

    plain = UltraEditor(tiny_model("llama"), EditConfig(lr=LR))
    run_turns(plain, [1])
    with pytest.raises(st.StateError, match="keep_turn_deltas=0"):
        plain.revert_last(1)


def test_undo_snapshots_are_written_once(tmp_path, monkeypatch):
    editor = UltraEditor(tiny_model("llama"), EditConfig(lr=LR), keep_turn_deltas=3)
    written = []
    real = store.write_safetensors

    def counting(path, entries, metadata, stage=None):
        written.append(metadata["content"])
        return real(path, entries, metadata, stage)

    monkeypatch.setattr(store, "write_safetensors", counting)
    for seed in (1, 2, 3, 4):
        run_turns(editor, [seed])
        written.clear()
        editor.save(tmp_path / "s")
        assert written.count("undo") == 1  # the older snapshots are hard-linked from the last version
    files = sorted(p.name for p in (tmp_path / "s" / (tmp_path / "s" / store.CURRENT).read_text().strip()).iterdir())
    assert [f for f in files if f.startswith("undo-")] == [f"undo-{s:010d}.safetensors" for s in (2, 3, 4)]
    resumed = UltraEditor.load(tiny_model("llama"), tmp_path / "s")
    resumed.revert_last(3)
    assert resumed.turns == 1


def test_edit_log_is_append_only_and_repairs_a_torn_line(tmp_path):
    directory = tmp_path / "s"
    editor = UltraEditor(tiny_model("llama"), EditConfig(lr=LR))
    run_turns(editor, [1, 2])
    editor.save(directory)
    with open(directory / store.LOG, "ab") as f:  # a crash in the middle of an append
        f.write(b'{"seq": 3, "event": "tu')
    run_turns(editor, [3])
    editor.save(directory)
    lines = (directory / store.LOG).read_bytes().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == [1, 2, 3] and [r["turn"] for r in records] == [1, 2, 3]
    assert set(records[0]["shift_norms"]) == set(editor.modules) and records[2]["requests"] == 10
    editor.save(directory)  # nothing new: nothing appended
    assert len((directory / store.LOG).read_bytes().splitlines()) == 3


def test_another_session_is_not_saved_over_a_state(tmp_path):
    first = UltraEditor(tiny_model("llama"), EditConfig(lr=LR))
    run_turns(first, [1])
    first.save(tmp_path / "s")
    other = UltraEditor(tiny_model("llama"), EditConfig(lr=LR))
    with pytest.raises(st.StateError, match="holds another editing session"):
        other.save(tmp_path / "s")
    resumed = UltraEditor.load(tiny_model("llama"), tmp_path / "s")  # the same session continues
    run_turns(resumed, [2])
    resumed.save(tmp_path / "s")
    assert [r["turn"] for r in st.read_log(tmp_path / "s")] == [1, 2]


def test_reader_whose_version_was_just_removed_reads_the_new_one(tmp_path, monkeypatch):
    editor = UltraEditor(tiny_model("llama"), EditConfig(lr=LR))
    run_turns(editor, [1])
    editor.save(tmp_path / "s")
    stale = st.read_state(tmp_path / "s")  # a reader got CURRENT -> v00000001 ...
    run_turns(editor, [2])
    editor.save(tmp_path / "s")  # ... then a writer switched to v00000002 and removed v00000001
    assert not stale[1].exists()
    real, answers = st.read_state, [stale]
    monkeypatch.setattr(st, "read_state", lambda d: answers.pop() if answers else real(d))
    loaded = UltraEditor.load(tiny_model("llama"), tmp_path / "s")
    assert loaded.turns == 2
    assert_same_weights(loaded, edited_weights(editor))


def test_another_writer_is_refused(tmp_path):
    directory = tmp_path / "s"
    directory.mkdir()
    editor = UltraEditor(tiny_model("llama"), EditConfig(lr=LR))
    fd = os.open(directory / st_lock.LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another process would
        with pytest.raises(st.StateError, match="another process"):
            editor.save(directory)
    finally:
        os.close(fd)
    editor.save(directory)
    assert st.has_state(directory)


def test_a_state_with_memory_but_no_memory_file_is_refused(tmp_path):
    editor = UltraEditor(tiny_model("llama"), EditConfig(lr=LR, memory={"weight": 1.0}))
    run_turns(editor, [1])
    editor.save(tmp_path / "s")
    version = tmp_path / "s" / (tmp_path / "s" / store.CURRENT).read_text().strip()
    meta = json.loads((version / store.STATE_JSON).read_text())
    assert store.stage_file("memory") in meta["sizes"]
    del meta["sizes"][store.stage_file("memory")]
    (version / store.STATE_JSON).write_text(json.dumps(meta))
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(st.StateError, match="no memory.safetensors for its 1 turns"):
        UltraEditor.load(model, tmp_path / "s")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
