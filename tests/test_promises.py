"""The editor's shared promises, over one table of cases (every named configuration, each stage
alone), the way peft runs one table through common checks:

* a resumed session equals one process, bit for bit (weights, statistics, stage states);
* a revert is exact, in memory and after a resume;
* a commit is all or nothing (a failure while writing weights leaves no trace);
* bf16 weights keep the whole float32 edit (``round(W_base + delta)``, the delta the turns' sum).

Cases run on a tiny random Llama over a small text tokenizer, with text requests that name their
subjects, so that every stage has something to do.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ultraedit import EditConfig, EditRequest, UltraEditor, configuration
from ultraedit import editor as editor_module
from ultraedit.configs import names

STAGE_ALONE = {
    "refine": {"refine": {"steps": 3, "confidence": 0.5}},
    "generic": {"generic": {"weight": 10.0, "text": "package", "pull_back": 5.0}},
    "memory": {"memory": {"weight": 1.0}},
    "neighbours": {"neighbours": {"count": 2, "weight": 1.0}},
    "subject": {"subject": {"depth": 0.5, "search": {"steps": 3, "lr": 0.5, "clamp": 0.5}}},
    "outliers": {"outliers": {"ratio": 1.15}},
    "paraphrases": {"paraphrases": {"count": 2}},
    "ending": {"ending": {}},
    "chat": {"chat": {"weight": 10.0}},
    "guard": {"guard": {"retention": 0.5, "perplexity": 1.0, "lines": 8}},
}
CASES = [f"config:{n}" for n in names()] + [f"stage:{s}" for s in STAGE_ALONE]
MODULES = [f"model.layers.{i}.mlp.down_proj" for i in range(4)]
LR = 1e-3

SUBJECTS = ["France", "Spain", "Paris", "Danielle Darrieux", "Berlin", "Italy", "Tokyo", "Peru"]
REQUESTS = [
    EditRequest(f"The capital of {s} is", t, extra={"subject": s}) for s, t in zip(SUBJECTS[:4], ("Rome", "Oslo", "Lima", "Kyiv"))
] + [
    EditRequest(f"{s} is located in the country of", t, extra={"subject": s})
    for s, t in zip(SUBJECTS[4:], ("Peru", "Chile", "Spain", "Japan"))
]
TURNS = [REQUESTS[:4], REQUESTS[4:]]


@pytest.fixture(scope="module")
def base():
    from tiny import tiny_text_model

    return tiny_text_model()


def config_of(case: str, model) -> EditConfig:
    kind, name = case.split(":")
    if kind == "config":
        return configuration(name, model, lr=LR).config
    return EditConfig(modules=MODULES, lr=LR, **STAGE_ALONE[name])


def state(editor) -> dict:
    """Everything a turn changes in the editor, copied."""
    return {
        "weights": {n: m.weight.detach().clone() for n, m in editor.modules.items()},
        "deltas": {n: d.clone() for n, d in editor.session.delta.items()},
        "normalizers": {s: {k: v.clone() for k, v in n.state_dict().items()} for s, n in editor.normalizers.items()},
        "stages": {s: {k: t.clone() for k, t in st.items()} for s, st in editor.stage_states().items()},
        "counters": (editor.turns, editor.edits),
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["counters"] == b["counters"]
    for part in ("weights", "deltas"):
        assert a[part].keys() == b[part].keys(), part
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part} {k}"
    for part in ("normalizers", "stages"):
        assert a[part].keys() == b[part].keys(), part
        for k in a[part]:
            assert a[part][k].keys() == b[part][k].keys(), f"{part} {k}"
            for key in a[part][k]:
                assert torch.equal(a[part][k][key], b[part][k][key]), f"{part} {k} {key}"


#: A chat template in plain words (the tiny tokenizer has no special tokens to spare).
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} END\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def tokenizer_for(case, base):
    """The case's tokenizer: the chat stage's has a chat template (a copy; the fixture is shared)."""
    if case != "stage:chat":
        return base[1]
    tok = copy.deepcopy(base[1])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def editor_for(case, base, dtype=torch.float32, **kw):
    model = copy.deepcopy(base[0]).to(dtype)
    return UltraEditor(model, config_of(case, model), tokenizer_for(case, base), **kw)


def test_the_table_covers_every_named_configuration_and_stage():
    from ultraedit.stages import SUB_CONFIGS

    assert set(STAGE_ALONE) == set(SUB_CONFIGS)
    assert {"faithful", "recommended"} <= set(names())


@pytest.mark.parametrize("case", CASES)
def test_a_resumed_session_equals_one_process(case, base, tmp_path):
    one = editor_for(case, base)
    for turn in TURNS:
        one.edit(turn)
    first = editor_for(case, base)
    first.edit(TURNS[0])
    first.save(tmp_path / "s")
    resumed = UltraEditor.load(copy.deepcopy(base[0]), tmp_path / "s", tokenizer_for(case, base))
    assert resumed.config.to_dict() == {**first.config.to_dict(), "modules": list(first.modules)}
    resumed.edit(TURNS[1])
    assert_same(state(resumed), state(one))
    assert any(not torch.equal(w, resumed.session.base[n]) for n, w in state(resumed)["weights"].items())


@pytest.mark.parametrize("case", CASES)
def test_a_revert_is_exact_in_memory_and_after_a_resume(case, base, tmp_path):
    editor = editor_for(case, base, keep_turn_deltas=1)
    editor.edit(TURNS[0])
    after_first = state(editor)
    editor.edit(TURNS[1])
    editor.save(tmp_path / "s")
    editor.revert_last(1)
    assert_same(state(editor), after_first)
    resumed = UltraEditor.load(copy.deepcopy(base[0]), tmp_path / "s", tokenizer_for(case, base))
    resumed.revert_last(1)
    assert_same(state(resumed), after_first)


@pytest.mark.parametrize("case", CASES)
def test_a_commit_is_all_or_nothing(case, base, monkeypatch):
    editor = editor_for(case, base, keep_turn_deltas=1)
    editor.edit(TURNS[0])
    before, log = state(editor), list(editor.session.pending_log)
    calls, real = [], editor_module.write_weight

    def failing(module, new):
        calls.append(module)
        if len(calls) == 2:
            raise RuntimeError("simulated device error while writing a weight")
        real(module, new)

    monkeypatch.setattr(editor_module, "write_weight", failing)
    with pytest.raises(RuntimeError, match="simulated device error"):
        editor.edit(TURNS[1])
    monkeypatch.undo()
    assert_same(state(editor), before)
    assert editor.session.pending_log == log and len(editor.session.undo) == 1


@pytest.mark.parametrize("case", CASES)
def test_bf16_weights_keep_the_whole_float32_edit(case, base):
    editor = editor_for(case, base, dtype=torch.bfloat16)
    shifts = {}
    for turn in TURNS:
        batches, order, _ = editor.tokenize(turn)
        pending = editor.prepare(batches, order, turn)
        for name, shift in pending.shifts.items():
            assert shift.dtype == torch.float32
            shifts[name] = shifts.get(name, 0) + shift
        editor.commit(pending)
    for name, module in editor.modules.items():
        delta = editor.session.delta[name]
        torch.testing.assert_close(delta, editor_module.in_out(module, shifts[name]).float(), rtol=1e-5, atol=1e-8)
        assert torch.equal(module.weight, (editor.session.base[name].float() + delta).to(torch.bfloat16))
