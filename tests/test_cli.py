"""The ``ultraedit edit/ask/info/merge`` commands end to end, on a tiny model saved to a temp dir."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ultraedit import EditConfig, EditRequest, UltraEditor
from ultraedit import session as st
from ultraedit.cli import main
from ultraedit.generation import generate_answers

from tiny import VOCAB, tiny_model

LR = "1e-3"
WORDS = [f"w{i}" for i in range(VOCAB - 4)]



def make_checkpoint(path, seed=0):
    """A tiny Llama and a word-level tokenizer (ids 4.. = w0..), saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    tk.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )
    tiny_model("llama", seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_records(n, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def words(lo, hi):
        k = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=gen))

    return [{"id": f"e{i}", "prompt": words(3, 7), "target": words(1, 3)} for i in range(n)]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model")


@pytest.fixture(scope="module")
def records():
    return make_records(25)


def load_base(ckpt):
    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def python_run(ckpt, records, turn_size=10):
    """The same session through the Python API, in one process."""
    editor = UltraEditor(load_base(ckpt), EditConfig(lr=float(LR)), AutoTokenizer.from_pretrained(ckpt))
    for start in range(0, len(records), turn_size):
        editor.edit([EditRequest(r["prompt"], r["target"], id=r["id"]) for r in records[start : start + turn_size]])
    return editor


def edited_model(ckpt, state):
    model = load_base(ckpt)
    st.apply_delta(model, state)
    return model


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def edit(ckpt, edits, state, *extra):
    return main(["edit", "--model", str(ckpt), "--edits", str(edits), "--state", str(state),
                 "--turn-size", "10", "--lr", LR, "--config", "faithful", "--quiet", *extra])


def test_edit_info_ask_merge_end_to_end(tmp_path, ckpt, records, capsys):
    edits = write_jsonl(tmp_path / "edits.jsonl", records)
    assert edit(ckpt, edits, tmp_path / "s") == 0
    assert "applied 25 edits in 3 turns" in capsys.readouterr().out
    reference = python_run(ckpt, records)
    assert_same_model(edited_model(ckpt, tmp_path / "s"), reference.model)

    log = list(st.read_log(tmp_path / "s"))
    assert [r["turn"] for r in log] == [1, 2, 3] and [r["requests"] for r in log] == [10, 10, 5]
    assert [e["id"] for r in log for e in r["edits"]] == [r["id"] for r in records]
    assert log[0]["edits"][0]["prompt"] == records[0]["prompt"]

    assert edit(ckpt, edits, tmp_path / "s") == 0  # finished: running again applies nothing
    assert "already applied" in capsys.readouterr().out
    assert st.info(tmp_path / "s")["edits"] == 25

    assert main(["info", "--state", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "25 in 3 turns" in out and "LlamaForCausalLM" in out and "model.layers.3.mlp.up_proj" in out
    assert reference.session.fingerprint()["weights_sha256"] in out
    assert main(["info", "--state", str(tmp_path / "s"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["turns"] == 3 and data["files"]["delta.safetensors"] > 0

    prompts = [records[0]["prompt"], records[24]["prompt"]]
    assert main(["ask", "--model", str(ckpt), "--state", str(tmp_path / "s"), "--compare",
                 "--max-new-tokens", "6", *prompts]) == 0
    out = capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    before = generate_answers(load_base(ckpt), tokenizer, prompts, max_new_tokens=6)
    after = generate_answers(reference.model, tokenizer, prompts, max_new_tokens=6)
    for p, b, a in zip(prompts, before, after):
        assert f"prompt: {p}\n  before: {b}\n  after:  {a}" in out
    assert before != after

    out_dir = tmp_path / "merged"
    assert main(["merge", "--model", str(ckpt), "--state", str(tmp_path / "s"), "--out", str(out_dir)]) == 0
    assert_same_model(load_base(out_dir), reference.model)
    assert AutoTokenizer.from_pretrained(out_dir)("w1 w2")["input_ids"] == [1, 5, 6]
    assert main(["merge", "--model", str(ckpt), "--state", str(tmp_path / "s"), "--out", str(out_dir)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_ctrl_c_stops_after_the_turn_and_the_same_command_resumes(tmp_path, ckpt, records, monkeypatch, capsys):
    edits = write_jsonl(tmp_path / "edits.jsonl", records)
    real_edit = UltraEditor.edit

    def edit_then_ctrl_c(self, requests):
        report = real_edit(self, requests)
        signal.raise_signal(signal.SIGINT)  # the user presses Ctrl-C during the first turn
        return report

    monkeypatch.setattr(UltraEditor, "edit", edit_then_ctrl_c)
    assert edit(ckpt, edits, tmp_path / "s") == 130
    assert "stopping after this turn" in capsys.readouterr().err
    assert st.info(tmp_path / "s")["turns"] == 1
    monkeypatch.undo()
    assert edit(ckpt, edits, tmp_path / "s", "--max-turns", "1") == 0
    assert st.info(tmp_path / "s")["turns"] == 2
    assert edit(ckpt, edits, tmp_path / "s") == 0
    assert "resuming" in capsys.readouterr().err
    assert_same_model(edited_model(ckpt, tmp_path / "s"), python_run(ckpt, records).model)
    assert [r["turn"] for r in st.read_log(tmp_path / "s")] == [1, 2, 3]


def test_crash_mid_save_then_resume_applies_each_turn_once(tmp_path, ckpt, records):
    edits = write_jsonl(tmp_path / "edits.jsonl", records)
    assert edit(ckpt, edits, tmp_path / "s", "--max-turns", "1") == 0
    # Killed while saving turn 2, after the state switch and before the log append.
    cmd = [sys.executable, "-m", "ultraedit.cli", "edit", "--config", "faithful", "--model", str(ckpt), "--edits", str(edits),
           "--state", str(tmp_path / "s"), "--turn-size", "10", "--lr", LR, "--quiet"]
    env = {**os.environ, "ULTRAEDIT_SAVE_PAUSE": "log", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stderr:
            if line.startswith("ultraedit-save-paused"):
                proc.send_signal(signal.SIGKILL)
                break
        else:
            pytest.fail("the edit command never reached the save")
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert st.info(tmp_path / "s")["turns"] == 2
    assert [r["turn"] for r in st.read_log(tmp_path / "s")] == [1]
    assert edit(ckpt, edits, tmp_path / "s") == 0
    assert st.info(tmp_path / "s")["edits"] == 25
    assert [r["turn"] for r in st.read_log(tmp_path / "s")] == [1, 2, 3]
    assert_same_model(edited_model(ckpt, tmp_path / "s"), python_run(ckpt, records).model)


def test_malformed_record_stops_before_its_turn(tmp_path, ckpt, records, capsys):
    bad = list(records)
    bad[12] = {"id": "bad", "prompt": "w1 w2 w3"}  # line 13: no target
    edits = write_jsonl(tmp_path / "edits.jsonl", bad)
    assert edit(ckpt, edits, tmp_path / "s") == 2
    err = capsys.readouterr().err
    assert str(edits) in err and "line 13" in err and "'target'" in err and "nothing from the turn" in err
    info = st.info(tmp_path / "s")
    assert (info["turns"], info["edits"]) == (1, 10)  # records 11-20 share a turn with the bad one

    # Same command with --skip-invalid: resumes after record 10, rejects the bad one once.
    assert edit(ckpt, edits, tmp_path / "s", "--skip-invalid") == 0
    assert "1 invalid records skipped" in capsys.readouterr().out
    rejects = (tmp_path / "s" / "rejects-edits.jsonl").read_text().splitlines()
    assert len(rejects) == 1 and json.loads(rejects[0])["index"] == 13
    assert st.info(tmp_path / "s")["edits"] == 24
    good = [r for i, r in enumerate(bad) if i != 12]
    assert_same_model(edited_model(ckpt, tmp_path / "s"), python_run(ckpt, good).model)


def test_skip_invalid_from_the_start_and_resume_keeps_rejects_once(tmp_path, ckpt, records, capsys):
    lines = [json.dumps(r) for r in records[:12]] + ["{not json", json.dumps({"prompt": 5, "target": "w1"})]
    lines += [json.dumps(r) for r in records[12:]]
    edits = write_jsonl(tmp_path / "edits.jsonl", lines)
    assert edit(ckpt, edits, tmp_path / "s", "--skip-invalid", "--max-turns", "2") == 0
    # Resuming without --skip-invalid: the bad records are behind us, so they are no error now.
    assert edit(ckpt, edits, tmp_path / "s") == 0
    rejects = [json.loads(x) for x in (tmp_path / "s" / "rejects-edits.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rejects] == [13, 14] and rejects[1]["field"] == "prompt"
    info = st.info(tmp_path / "s")
    assert (info["turns"], info["edits"]) == (3, 25)
    assert info["extra"]["cli"]["inputs"][0]["rejected"] == 2


def test_published_field_names_are_accepted(tmp_path, ckpt, records):
    zsre = [{"src": r["prompt"], "ans": r["target"], "rephrase": r["prompt"], "loc": "nq question: w1 w2",
             "loc_ans": "w3"} for r in records[:10]]
    (tmp_path / "zsre.json").write_text(json.dumps(zsre))
    assert edit(ckpt, tmp_path / "zsre.json", tmp_path / "s") == 0
    cf = [{"case_id": i, "requested_rewrite": {"prompt": "{} w5 w6", "subject": r["prompt"],
                                               "target_new": {"str": r["target"]}, "target_true": {"str": "w9"}},
           "paraphrase_prompts": [], "neighborhood_prompts": []} for i, r in enumerate(records[10:20])]
    (tmp_path / "cf.json").write_text(json.dumps(cf))
    assert edit(ckpt, tmp_path / "cf.json", tmp_path / "s") == 0  # a new file continues the session
    log = list(st.read_log(tmp_path / "s"))
    assert [r["turn"] for r in log] == [1, 2]
    assert log[1]["edits"][0]["prompt"] == records[10]["prompt"] + " w5 w6"
    assert log[0]["edits"][3]["target"] == records[3]["target"]


def test_revert_command(tmp_path, ckpt, records, capsys):
    edits = write_jsonl(tmp_path / "edits.jsonl", records)
    assert edit(ckpt, edits, tmp_path / "s", "--keep-turn-deltas", "2") == 0
    assert main(["revert", "--model", str(ckpt), "--state", str(tmp_path / "s"), "--turns", "2"]) == 0
    assert "reverted turns 2-3 (15 edits)" in capsys.readouterr().out
    assert (st.info(tmp_path / "s")["turns"], st.info(tmp_path / "s")["edits"]) == (1, 10)
    assert_same_model(edited_model(ckpt, tmp_path / "s"), python_run(ckpt, records[:10]).model)
    assert main(["revert", "--model", str(ckpt), "--state", str(tmp_path / "s")]) == 2
    assert "only the last 0 are kept" in capsys.readouterr().err


def test_refusals(tmp_path, ckpt, records, capsys):
    edits = write_jsonl(tmp_path / "edits.jsonl", records[:10])
    assert edit(ckpt, edits, tmp_path / "s") == 0
    other = make_checkpoint(tmp_path / "other", seed=1)
    assert edit(other, edits, tmp_path / "s") == 2
    assert "different base model" in capsys.readouterr().err
    assert main(["edit", "--config", "faithful", "--model", str(ckpt), "--edits", str(edits), "--state", str(tmp_path / "s"),
                 "--lr", "1e-4", "--quiet"]) == 2
    assert "differs from the saved state's: lr=0.0001 (saved 0.001)" in capsys.readouterr().err
    assert main(["info", "--state", str(tmp_path / "nothing")]) == 2
    assert "no saved state" in capsys.readouterr().err
    assert edit(ckpt, tmp_path / "missing.jsonl", tmp_path / "t") == 2
    assert "no such file" in capsys.readouterr().err
    tail = write_jsonl(tmp_path / "tail.jsonl", records[:10] + ['{"prompt": "w1", "target": ""}'])
    assert edit(ckpt, tail, tmp_path / "u") == 2  # a bad last record is found before the run ends
    assert "line 11: field 'target'" in capsys.readouterr().err
    assert st.info(tmp_path / "u")["turns"] == 1


def test_edit_on_the_builtin_testbed_uses_its_recommended_config(tmp_path, capsys):
    import gzip

    from ultraedit.configs import load_spec
    from ultraedit.testbed import TESTBED_MODULES, requests_path

    edits = tmp_path / "edits.jsonl"
    with gzip.open(requests_path(), "rt") as src:
        edits.write_text("".join(next(src) for _ in range(12)))
    assert main(["edit", "--model", "testbed", "--edits", str(edits), "--state", str(tmp_path / "s"),
                 "--turn-size", "6", "--quiet"]) == 0
    config = st.read_state(tmp_path / "s")[0]["config"]
    assert config["lr"] == load_spec("testbed")["config"]["lr"] and config["modules"] == TESTBED_MODULES
    capsys.readouterr()
    assert main(["info", "--state", str(tmp_path / "s"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["turns"] == 2 and data["edits"] == 12
