"""The damage guard (``EditConfig.guard``): a turn that would cost the model more than the budget is
shrunk or refused, says so, and the model it leaves is within the budget, measured independently.

The testbed model knows its fictional world: its locality facts (facts of requests not edited here)
serve as the guard's probes, in place of the package's real-world facts the testbed does not know.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ultraedit import EditConfig, EditRequest, UltraEditor
from ultraedit.evaluation import perplexity, teacher_forced
from ultraedit.stages import guard as guard_module
from ultraedit.stages.guard import GuardWarning
from ultraedit.testbed import TESTBED_MODULES, load_requests, load_testbed

EDITS = load_requests(40)


@pytest.fixture()
def testbed_probes(monkeypatch, tmp_path):
    """The testbed's own facts (of requests 300-500, never edited here) as the guard's candidates."""
    pairs = dict.fromkeys(pair for r in load_requests(500)[300:] for pair in r.locality)
    facts = [{"prompt": p, "answer": a, "subject": p.split(" ")[0], "relation": "testbed"} for p, a in pairs]
    monkeypatch.setattr(guard_module, "known_facts", lambda: facts)
    monkeypatch.setenv("ULTRAEDIT_CACHE", str(tmp_path / "cache"))
    return facts


def guarded(lr, **guard):
    return EditConfig(modules=TESTBED_MODULES, lr=lr, guard={"retention": 0.9, "perplexity": 0.1, **guard})


def independent_cost(model, tok, probes, baseline_model):
    """Retention (token-level) of the probes the unedited model knew, and the perplexity rise, afresh."""
    pairs = [(p["prompt"], p["answer"]) for p in probes]
    known = [pair for pair, right in zip(pairs, teacher_forced(baseline_model, tok, pairs).exact) if right == 1.0]
    now = teacher_forced(model, tok, known)
    tokens = [len(a) for a in now.answers]
    retention = sum(a * n for a, n in zip(now.accuracy, tokens)) / sum(tokens)
    lines = guard_module.package_text(guard_module.TEXT_FILE)[: guard_module.GuardConfig().lines]
    rise = perplexity(model, tok, lines) / perplexity(baseline_model, tok, lines) - 1
    return retention, rise


def test_a_turn_that_would_wreck_the_model_is_shrunk_within_the_budget_and_says_so(testbed_probes):
    model, tok = load_testbed()
    unedited = copy.deepcopy(model)
    wild = copy.deepcopy(model)
    UltraEditor(wild, EditConfig(modules=TESTBED_MODULES, lr=0.05), tok).edit(EDITS)
    retention, rise = independent_cost(wild, tok, testbed_probes[:300], unedited)
    assert retention < 0.9 or rise > 0.1  # unguarded, this turn breaks the budget
    editor = UltraEditor(model, guarded(0.05), tok)
    with pytest.warns(GuardWarning, match="damage guard: the turn would cost"):
        report = editor.edit(EDITS)
    verdict = report.stages["guard"]
    assert 0 < verdict["scale"] < 1 and verdict["tried"][0]["scale"] == 1.0 and len(verdict["tried"]) >= 2
    stage = next(s for s in editor.stages if s.name == "guard")
    measured = [p for p, out in zip(stage.probes, stage.excluded.tolist()) if not out]
    retention, rise = independent_cost(model, tok, measured, unedited)  # after the commit, afresh
    assert retention >= 0.9 and rise <= 0.1
    committed = next(t for t in verdict["tried"] if t["scale"] == verdict["scale"])
    assert retention == pytest.approx(committed["retention"], abs=1e-9)
    assert rise == pytest.approx(committed["perplexity_rise"], rel=1e-4)
    failed = [t["scale"] for t in verdict["tried"] if t["scale"] > verdict["scale"]]
    assert min(failed) - verdict["scale"] == pytest.approx(1 / 2 ** 4)  # the largest share that passes, to 1/16
    for name in TESTBED_MODULES:  # what was committed is the computed shift at that scale
        moved = (model.get_submodule(name).weight - unedited.get_submodule(name).weight).detach().norm()
        assert float(moved) > 0


def test_a_turn_within_the_budget_is_committed_unchanged(testbed_probes):
    model, tok = load_testbed()
    plain = copy.deepcopy(model)
    report = UltraEditor(model, guarded(3e-3), tok).edit(EDITS)
    UltraEditor(plain, EditConfig(modules=TESTBED_MODULES, lr=3e-3), tok).edit(EDITS)
    assert report.stages["guard"]["scale"] == 1.0 and len(report.stages["guard"]["tried"]) == 1
    for name in TESTBED_MODULES:
        assert torch.equal(model.get_submodule(name).weight, plain.get_submodule(name).weight)


def test_a_turn_no_step_of_which_passes_commits_nothing_and_says_so(testbed_probes):
    model, tok = load_testbed()
    before = {n: model.get_submodule(n).weight.detach().clone() for n in TESTBED_MODULES}
    editor = UltraEditor(model, guarded(0.3, retention=1.0, perplexity=0.0, halvings=1), tok)
    with pytest.warns(GuardWarning, match="nothing of it was committed"):
        report = editor.edit(EDITS)
    assert report.stages["guard"]["scale"] == 0.0 and [t["scale"] for t in report.stages["guard"]["tried"]] == [1.0, 0.5]
    assert all(torch.equal(model.get_submodule(n).weight, before[n]) for n in TESTBED_MODULES)
    assert editor.session.pending_log[-1]["stages"]["guard"]["scale"] == 0.0  # in the edit log too


def test_probes_about_an_edited_subject_leave_the_measure_and_this_survives_a_resume(testbed_probes, tmp_path):
    model, tok = load_testbed()
    editor = UltraEditor(model, guarded(3e-3), tok)
    stage = next(s for s in editor.stages if s.name == "guard")
    subject = stage.probes[0]["subject"]
    request = EditRequest(f"{subject} speaks", EDITS[0].target)
    editor.edit([request])
    about = [i for i, p in enumerate(stage.probes) if p["subject"] == subject]
    assert about and all(int(stage.excluded[i]) == 1 for i in about) and int(stage.excluded.sum()) == len(about)
    editor.save(tmp_path / "s")
    resumed = UltraEditor.load(load_testbed()[0], tmp_path / "s", tok)
    assert torch.equal(next(s for s in resumed.stages if s.name == "guard").excluded, stage.excluded)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gptj", "gpt2", "phi3", "gemma3"])
def test_the_default_configuration_edits_every_family_without_blowing_it_up(arch):
    """On a tiny random model of each family, the default (recommended) configuration edits text requests
    with subjects: every weight finite, the held-out perplexity within the guard's budget (measured
    afresh), and each turn's guard verdict in its report."""
    from test_promises import REQUESTS
    from tiny import tiny_text_model

    from ultraedit import configuration

    model, tok = tiny_text_model(arch)
    unedited = copy.deepcopy(model)
    resolved = configuration("recommended", model)
    editor = UltraEditor(model, resolved.config, tok)
    for turn in (REQUESTS[:4], REQUESTS[4:]):
        report = editor.edit(turn)
        assert "guard" in report.stages and report.stages["guard"]["scale"] > 0
    assert all(bool(torch.isfinite(m.weight).all()) for m in editor.modules.values())
    lines = guard_module.package_text(guard_module.TEXT_FILE)[: guard_module.GuardConfig().lines]
    rise = perplexity(model, tok, lines) / perplexity(unedited, tok, lines) - 1
    assert rise <= resolved.config.guard.perplexity + 1e-6
    assert any(not torch.equal(m.weight, unedited.get_submodule(n).weight) for n, m in editor.modules.items())
