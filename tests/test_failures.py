"""No silent failure (issue 12): every way a turn, a save or a load can fail leaves the model,
the editor and the state directory as they were, and says so."""

import pytest
import torch

from ultraedit import EditConfig, EditError, UltraEditor

from tiny import random_turn, tiny_model

LR = 1e-3


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"


def hooks_left(model):
    return [name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


# ------------------------------------------------------------------ 8. hooks never leak

@pytest.mark.parametrize("where", ["last edit module", "an mlp"])
def test_failed_hook_registration_leaves_no_hook(monkeypatch, where):
    model = tiny_model("llama")
    editor = UltraEditor(model, EditConfig(lr=LR))
    if where == "last edit module":
        victim = list(editor.modules.values())[-1]
        method = "register_forward_hook"
    else:
        victim = model.model.layers[2].mlp
        method = "register_forward_pre_hook"

    def refuse(*args, **kwargs):
        raise RuntimeError("simulated failure while registering a hook")

    monkeypatch.setattr(victim, method, refuse)
    with pytest.raises(RuntimeError, match="simulated failure"):
        editor.edit_tokens(random_turn(0))
    assert hooks_left(model) == []
    assert editor.turns == 0


# ------------------------------------------------------------------ 1. commit is all or nothing

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("failing_module", [0, 2])
def test_commit_failing_at_kth_module_restores_every_weight(monkeypatch, failing_module, dtype):
    from ultraedit import editor as editor_module

    model = tiny_model("llama", dtype=dtype)
    editor = UltraEditor(model, EditConfig(lr=LR), keep_turn_deltas=1)
    editor.edit_tokens(random_turn(0))
    pending = editor.prepare(random_turn(1))
    before = weights(model)
    stats = {s: {k: v.clone() for k, v in n.state_dict().items()} for s, n in editor.normalizers.items()}
    deltas = {n: d.clone() for n, d in editor.session.delta.items()}
    real, calls = editor_module.write_weight, []

    def failing(module, new):
        calls.append(module)
        if len(calls) == failing_module + 1:
            raise RuntimeError("simulated device error while writing a weight")
        real(module, new)

    monkeypatch.setattr(editor_module, "write_weight", failing)
    with pytest.raises(RuntimeError, match="simulated device error"):
        editor.commit(pending)
    monkeypatch.undo()
    assert_untouched(model, before)
    assert (editor.turns, editor.edits, len(editor.session.undo)) == (1, 20, 1)
    assert editor.session.log_seq == 1
    for shape, norm in editor.normalizers.items():
        for key, value in norm.state_dict().items():
            assert torch.equal(value, stats[shape][key])
    assert all(torch.equal(d, deltas[n]) for n, d in editor.session.delta.items()) and len(deltas) == len(editor.session.delta)
    editor.commit(pending)  # the same pending turn still applies, once
    assert editor.turns == 2


# ------------------------------------------------------------------ 2. a pending turn is bound to its state

def test_pending_turn_prepared_before_a_revert_and_a_commit_is_refused():
    from ultraedit import EditError

    editor = UltraEditor(tiny_model("llama"), EditConfig(lr=LR), keep_turn_deltas=2)
    for seed in range(3):
        editor.edit_tokens(random_turn(seed))
    stale = editor.prepare(random_turn(10))  # prepared as turn 4
    editor.revert_last(1)
    editor.edit_tokens(random_turn(11))  # turn 3 again: the editor is back at turn 3
    before = weights(editor.model)
    stats = {s: n.mean.clone() for s, n in editor.normalizers.items()}
    with pytest.raises(EditError, match="changed since"):
        editor.commit(stale)
    assert_untouched(editor.model, before)
    assert all(torch.equal(n.mean, stats[s]) for s, n in editor.normalizers.items())
    assert editor.turns == 3
    fresh = editor.prepare(random_turn(10))
    editor.commit(fresh)
    assert editor.turns == 4


# ------------------------------------------------------------------ 4. a save completes or changes nothing

def listing(directory):
    return sorted((p.name, p.stat().st_size if p.is_file() else None) for p in directory.iterdir())


def saved_editor(directory, seeds=(1,)):
    editor = UltraEditor(tiny_model("llama"), EditConfig(lr=LR))
    for seed in seeds:
        editor.edit_tokens(random_turn(seed))
    editor.save(directory)
    return editor


def test_a_malformed_edit_log_stops_the_save_before_the_switch(tmp_path):
    from ultraedit import session as st
    from ultraedit.session import store

    directory = tmp_path / "s"
    editor = saved_editor(directory)
    with open(directory / store.LOG, "ab") as f:
        f.write(b"not a record\n")  # a complete line, so not a torn append: real damage
    editor.edit_tokens(random_turn(2))
    before = listing(directory)
    with pytest.raises(st.StateError, match=r"edits.jsonl: the last line is not an edit-log record"):
        editor.save(directory)
    assert listing(directory) == before  # v00000001 is still current; nothing new was written
    assert st.read_state(directory)[0]["turns"] == 1


def test_a_damaged_state_is_reported_not_overwritten(tmp_path):
    from ultraedit import session as st
    from ultraedit.session import store

    directory = tmp_path / "s"
    editor = saved_editor(directory)
    version = directory / (directory / store.CURRENT).read_text().strip()
    (version / store.STATE_JSON).write_text('{"format": "ultraedit-state", "tur')
    before = listing(directory)
    other = UltraEditor(tiny_model("llama"), EditConfig(lr=LR))
    for who in (other, editor):  # neither another session nor the same one writes over it
        with pytest.raises(st.StateError, match=r"state.json is damaged .*not saving over it"):
            who.save(directory)
    assert listing(directory) == before
    with pytest.raises(st.StateError, match="cannot read .*state.json"):
        st.read_state(directory)


def test_an_io_error_after_the_switch_is_a_warning_and_the_next_save_completes_the_log(tmp_path, monkeypatch):
    from ultraedit import session as st
    from ultraedit.session import store

    directory = tmp_path / "s"
    editor = saved_editor(directory)
    editor.edit_tokens(random_turn(2))
    real = store.append_log

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "append_log", disk_full)
    with pytest.warns(st.StateWarning, match="v00000002 is current.*No space left"):
        editor.save(directory)
    monkeypatch.setattr(store, "append_log", real)
    assert st.read_state(directory)[0]["turns"] == 2
    assert [r["turn"] for r in st.read_log(directory)] == [1]
    assert [r["turn"] for r in editor.session.pending_log] == [2]
    editor.save(directory)
    assert [r["turn"] for r in st.read_log(directory)] == [1, 2]


# ------------------------------------------------------------------ 5. load checks everything before applying

def rewrite_safetensors(path, drop=(), change=None):
    from safetensors.torch import load_file, save_file

    tensors = {k: v for k, v in load_file(path).items() if k not in drop}
    if change:
        tensors.update(change)
    save_file(tensors, path)


def current_version(directory):
    from ultraedit.session import store

    return directory / (directory / store.CURRENT).read_text().strip()


@pytest.mark.parametrize(
    "damage", ["undo key", "normalizer key", "normalizer shape", "state.json field", "fingerprint field", "delta shape"]
)
def test_a_damaged_state_fails_to_load_with_the_file_named_and_the_model_untouched(tmp_path, damage):
    import json

    from ultraedit import session as st
    from ultraedit.session import identity, store

    directory = tmp_path / "s"
    editor = UltraEditor(tiny_model("llama"), EditConfig(lr=LR), keep_turn_deltas=1)
    editor.edit_tokens(random_turn(1))
    editor.save(directory)
    version = current_version(directory)
    name = next(iter(editor.modules))
    undo = next(version.glob("undo-*.safetensors"))
    if damage == "undo key":
        rewrite_safetensors(undo, drop=[f"w/{name}"])
        where = rf"{undo.name}: cannot read 'w/{name}'"
    elif damage == "normalizer key":
        rewrite_safetensors(version / store.NORMALIZERS, drop=["32x64.var"])
        where = r"normalizers.safetensors: cannot read '32x64.var'"
    elif damage == "normalizer shape":
        rewrite_safetensors(version / store.NORMALIZERS, change={"32x64.mean": torch.zeros(5)})
        where = r"normalizers.safetensors: '32x64.mean' has shape \(5,\), expected \(96,\)"
    elif damage == "state.json field":
        meta = json.loads((version / store.STATE_JSON).read_text())
        del meta["turns"]
        (version / store.STATE_JSON).write_text(json.dumps(meta))
        where = r"state.json: incomplete state, missing \['turns'\]"
    elif damage == "fingerprint field":
        meta = json.loads((version / store.STATE_JSON).read_text())
        del meta["fingerprint"]["modules"][name]["shape"]
        (version / store.STATE_JSON).write_text(json.dumps(meta))
        where = r"state.json: incomplete state, missing \['fingerprint.modules \(shape, dtype\)/weights_sha256'\]"
    else:
        rewrite_safetensors(version / store.DELTA, change={name: torch.zeros(3, 3)})
        where = rf"delta.safetensors: shift of '{name}' has shape \(3, 3\)"
    model = tiny_model("llama")
    before = weights(model)
    with pytest.raises(st.StateError, match=where):
        UltraEditor.load(model, directory)
    assert_untouched(model, before)
    assert not hasattr(model, identity.APPLIED)


def test_a_read_error_while_applying_the_delta_restores_the_model(tmp_path, monkeypatch):
    from ultraedit import session as st
    from ultraedit.session import delta as st_delta, store

    directory = tmp_path / "s"
    editor = UltraEditor(tiny_model("llama"), EditConfig(lr=LR))
    editor.edit_tokens(random_turn(1))
    editor.save(directory)
    last = list(editor.modules)[-1]
    real = st_delta.read_tensor

    def failing(handle, path, key, shape=None):
        if path.name == store.DELTA and key == last:
            raise st.StateError(f"{path}: cannot read {key!r} (simulated I/O error)")
        return real(handle, path, key, shape)

    monkeypatch.setattr(st_delta, "read_tensor", failing)
    model = tiny_model("llama")
    before = weights(model)
    for apply in (lambda: UltraEditor.load(model, directory), lambda: st.apply_delta(model, directory)):
        with pytest.raises(st.StateError, match="simulated I/O error"):
            apply()
        assert_untouched(model, before)


# ------------------------------------------------------------------ 6. a delta is never applied twice

def test_apply_delta_twice_is_refused_even_when_not_strict(tmp_path):
    from ultraedit import session as st

    directory = tmp_path / "s"
    editor = UltraEditor(tiny_model("llama"), EditConfig(lr=LR))
    editor.edit_tokens(random_turn(1))
    editor.save(directory)
    model = tiny_model("llama", dtype=torch.bfloat16)
    st.apply_delta(model, directory, strict=False)
    once = weights(model)
    with pytest.raises(st.FingerprintError, match="already edited: it carries the delta of .*s \\(1 turns\\)"):
        st.apply_delta(model, directory, strict=False)
    assert_untouched(model, once)
    loaded = tiny_model("llama")
    UltraEditor.load(loaded, directory)
    with pytest.raises(st.FingerprintError, match="already edited"):
        st.apply_delta(loaded, directory, strict=False)


# ------------------------------------------------------------------ 9. CLI: one line per user error, bugs keep tracebacks

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from test_cli import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model")


@pytest.mark.parametrize("option,message", [
    (["--preset", "nope"], r"--preset 'nope' is unknown; known: "),
    (["--lr", "-1"], r"configuration 'recommended': EditConfig.lr must be a positive finite number, got -1.0"),
    (["--set", "ridge=0"], r"configuration 'recommended': EditConfig.ridge must be a positive finite number"),
    (["--set", "capture_batch_size=0"], r"EditConfig.capture_batch_size must be a positive int"),
    (["--set", "refine.steps=0"], r"EditConfig.refine.steps must be a positive int, got 0"),
    (["--set", "subject.serch=1"], r"unknown EditConfig.subject fields: \['serch'\]"),
    (["--set", "prefixes=2"], r"EditConfig option prefixes was removed: context prefixes"),
    (["--set", "refine_steps=3"], r"EditConfig field refine_steps is an earlier version.s; it is now refine.steps"),
    (["--config", "nope"], r"--config 'nope': not a named configuration \(faithful, recommended"),
    (["--set", "refine"], r"--set expects KEY=VALUE"),
    (["--keep-turn-deltas", "-1"], r"--keep-turn-deltas must be >= 0, got -1"),
    (["--modules", "model.layers.9.mlp.up_proj"], r"edit module 'model.layers.9.mlp.up_proj' does not exist"),
])
def test_edit_option_errors_are_one_line_and_exit_2(tmp_path, checkpoint, capsys, option, message):
    from test_cli import make_records, write_jsonl

    from ultraedit.cli import main

    edits = write_jsonl(tmp_path / "e.jsonl", make_records(3))
    code = main(["edit", "--model", str(checkpoint), "--edits", str(edits), "--state", str(tmp_path / "s"),
                 "--quiet", *option])
    err = capsys.readouterr().err
    assert code == 2
    ours = [line for line in err.splitlines() if "ultraedit" in line or "Traceback" in line]  # (not the loading bar)
    assert len(ours) == 1 and ours[0].startswith("ultraedit edit: error: "), err
    assert __import__("re").search(message, ours[0]), err
    assert not (tmp_path / "s" / "CURRENT").exists()


def test_bench_keeps_the_traceback_of_a_bug(tmp_path, monkeypatch):
    from ultraedit.cli import bench as bench_cli
    from ultraedit.cli import main

    def buggy(config):
        return {}["a key the code forgot"]

    monkeypatch.setattr(bench_cli, "run", buggy)
    with pytest.raises(KeyError, match="a key the code forgot"):
        main(["bench", "--out", str(tmp_path / "b"), "--quiet"])


def test_iter_requests_collects_every_files_rejects_and_closes_its_readers(tmp_path, monkeypatch):
    import json

    from ultraedit import datasets

    files = []
    for i in range(2):
        path = tmp_path / f"f{i}.jsonl"
        path.write_text(json.dumps({"prompt": f"p{i}", "target": "t"}) + "\n" + json.dumps({"prompt": f"bad{i}"}) + "\n"
                        + json.dumps({"prompt": f"q{i}", "target": "t"}) + "\n")
        files.append(path)
    opened = []
    real_open = datasets._open_binary
    monkeypatch.setattr(datasets, "_open_binary", lambda p: opened.append(real_open(p)) or opened[-1])
    rejects = tmp_path / "rejects.jsonl"
    requests = list(datasets.iter_requests(files, "jsonl", skip_invalid=True, rejects=rejects))
    assert [r.prompt for r in requests] == ["p0", "q0", "p1", "q1"]
    lines = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["record"]["prompt"], r["field"]) for r in lines] == [("bad0", "target"), ("bad1", "target")]
    assert len(opened) == 2 and all(f.closed for f in opened)
    stream = datasets.iter_requests(files, "jsonl", skip_invalid=True)
    assert next(stream).prompt == "p0"
    stream.close()  # stopped early: the open file is closed too
    assert len(opened) == 3 and opened[-1].closed


# ------------------------------------------------------------------ 10. locking: threads too, and says where it cannot

def test_a_second_writer_thread_is_refused_and_the_lock_is_reentrant_in_its_thread(tmp_path):
    import threading

    from ultraedit import session as st
    from ultraedit.session import lock as st_lock

    directory = tmp_path / "s"
    holding, release, seen = threading.Event(), threading.Event(), {}

    def writer():
        with st.session_lock(directory):
            with st.session_lock(directory):  # re-entrant in the same thread
                holding.set()
                release.wait(30)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert holding.wait(30)
        try:
            with st.session_lock(directory):
                seen["entered"] = True
        except st.StateError as err:
            seen["error"] = str(err)
    finally:
        release.set()
        thread.join(30)
    assert "entered" not in seen and "another thread of this process" in seen["error"]
    with st.session_lock(directory):  # released by its thread: free again
        pass
    assert st_lock._HELD == {}


def test_where_it_cannot_lock_it_says_so(tmp_path, monkeypatch):
    from ultraedit import session as st
    from ultraedit.session import lock as st_lock

    monkeypatch.setattr(st_lock, "fcntl", None)
    with pytest.warns(st.StateWarning, match="cannot lock the state in .*no fcntl file locks"):
        with st.session_lock(tmp_path / "s"):
            pass


# ------------------------------------------------------------------ 7. models split over devices

SPLIT_DEVICES = [
    "cpu",  # the accelerate dispatch path on one device: runs everywhere
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for CPU + cuda")),
]


@pytest.mark.parametrize("second", SPLIT_DEVICES)
def test_a_model_split_over_devices_edits_like_one_on_a_single_device(second):
    """Layers 0-1 on the CPU, layers 2-3, the final norm and the LM head on ``second``
    (``accelerate.dispatch_model`` with the CPU as main device, so the CPU layers stay resident rather
    than offloaded): logits come from ``second`` while inputs, labels and the lower edit modules stay
    on the CPU."""
    accelerate = pytest.importorskip("accelerate")
    names = ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj", "model.layers.3.mlp.down_proj"]
    single = UltraEditor(tiny_model("llama"), EditConfig(modules=names, lr=LR))
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "cpu", "model.layers.2": second, "model.layers.3": second,
                  "model.norm": second, "lm_head": second}
    model = accelerate.dispatch_model(tiny_model("llama"), device_map=device_map, main_device="cpu")
    split = UltraEditor(model, EditConfig(modules=names, lr=LR))
    assert split.modules[names[-1]].weight.device.type == second
    for seed in range(2):
        batches = random_turn(seed)
        single.edit_tokens(batches)
        split.edit_tokens(batches)
    for name in names:
        torch.testing.assert_close(split.modules[name].weight.cpu(), single.modules[name].weight, rtol=1e-4, atol=1e-6)
    for shape, norm in split.normalizers.items():
        torch.testing.assert_close(norm.mean.cpu(), single.normalizers[shape].mean, rtol=1e-4, atol=1e-6)


def test_an_offloaded_edit_module_is_refused_with_a_reason():
    """accelerate's offload (``device_map`` with ``"cpu"`` layers beside a GPU, ``cpu_offload``) leaves
    weights on the meta device and streams them in per forward: they cannot be edited in place, so
    the editor says so by name before anything is read or changed."""
    accelerate = pytest.importorskip("accelerate")
    model = accelerate.cpu_offload(tiny_model("llama"), execution_device="cpu")
    name = "model.layers.1.mlp.up_proj"
    assert model.get_submodule(name).weight.device.type == "meta"
    with pytest.raises(EditError, match=r"'model.layers.1.mlp.up_proj' has its weight offloaded .*main_device='cpu'"):
        UltraEditor(model, EditConfig(modules=[name], lr=LR))


# ------------------------------------------------------------------ paths no test covered before

@pytest.mark.parametrize("solver", ["primal", "dual"])
def test_welford_float64_and_each_solver_match_the_reference_end_to_end(solver):
    import copy

    from reference import reference_turn
    from ultraedit.core.presets import resolve_modules

    model = tiny_model("llama")
    ref_model = copy.deepcopy(model)
    names = resolve_modules(model)
    base = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    editor = UltraEditor(model, EditConfig(modules=names, lr=LR, normalizer="welford", runtime={"dtype": "float64", "solver": solver}))
    ref_norms = {}
    for seed in range(3):
        batches = random_turn(200 + seed)
        editor.edit_tokens(batches)
        reference_turn(ref_model, names, batches, ref_norms, lr=LR, formula="welford")
    assert all(norm.dtype == torch.float64 and norm.formula == "welford" for norm in editor.normalizers.values())
    for shape, norm in editor.normalizers.items():
        torch.testing.assert_close(norm.var, ref_norms[shape].var, rtol=1e-4, atol=1e-9)
    for n in names:
        ours = model.get_submodule(n).weight.detach() - base[n]
        ref = ref_model.get_submodule(n).weight.detach() - base[n]
        assert float((ours - ref).norm() / ref.norm()) <= 1e-4, n


def test_exact_fixes_reproduce_float32_weights_no_float32_delta_can(tmp_path):
    """A float32 weight that moved from 1e30 to 1.0: no float32 delta added to 1e30 gives 1.0, so
    the saved state carries the exact value in exact.safetensors, and load/apply_delta use it."""
    from ultraedit import session as st
    from ultraedit.session import store

    def base_model():
        model = tiny_model("llama")
        with torch.no_grad():
            model.model.layers[3].mlp.up_proj.weight[0, 0] = 1e30
        return model

    editor = UltraEditor(base_model(), EditConfig(lr=LR))
    editor.edit_tokens(random_turn(1))
    with torch.no_grad():
        editor.modules["model.layers.3.mlp.up_proj"].weight[0, 0] = 1.0
    version = editor.save(tmp_path / "s")
    assert (version / store.EXACT).exists()
    expected = {n: m.weight.detach().clone() for n, m in editor.modules.items()}
    loaded = UltraEditor.load(base_model(), tmp_path / "s")
    applied = base_model()
    st.apply_delta(applied, tmp_path / "s")
    for name in expected:
        assert torch.equal(loaded.modules[name].weight, expected[name]), name
        assert torch.equal(applied.get_submodule(name).weight, expected[name]), name
