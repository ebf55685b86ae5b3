"""The lifelong benchmark end to end on a tiny random model saved with save_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ultraedit import bench
from ultraedit.bench import BenchConfig, BenchError, register_method, run
from ultraedit.cli import bench as cli_bench
from ultraedit.cli import build_parser, main
from ultraedit.datasets import read_requests

from tiny import text_tokenizer, tiny_config

FIXTURES = Path(__file__).resolve().parent / "fixtures"



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    import transformers as T

    tokenizer = text_tokenizer()
    config = tiny_config("llama")
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


ARGS = ["--turns", "2", "--turn-size", "4", "--batch-size", "2", "--lr", "1e-2", "--device", "cpu", "--quiet"]


def test_bench_is_a_subcommand():
    args = build_parser().parse_args(
        ["bench", "--model", "m", "--dataset", "zsre", "--data", "f", "--turns", "3", "--out", "o"]
    )
    assert (args.turn_size, args.batch_size, args.eval_every, args.seed, args.method) == (100, 10, None, 0, "ultraedit")
    assert (args.eval_batch_size, args.eval_max_tokens, args.forward_batch_size) == (64, 16384, 100)
    assert args.func is cli_bench._command and args.config is None and args.sets == []
    options = build_parser().parse_args(["bench", "--model", "m", "--dataset", "zsre", "--turns", "1", "--out", "o",
                                         "--config", "faithful", "--set", "refine.steps=3", "--set", "memory=null"])
    assert options.config == "faithful" and options.sets == ["refine.steps=3", "memory=null"]


def test_end_to_end_cli_writes_results_markdown_and_plot(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    # the recommended lr is relative to what the modules write (0.107); a random MLP writes little: more here
    code = main(["bench", "--model", str(model_dir), "--dataset", "zsre", "--data", str(FIXTURES / "zsre_eval.json"),
                 *ARGS, "--lr", "20", "--eval-every", "1", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("efficacy", "generalization", "specificity"):
        assert isinstance(results[key], float) and 0.0 <= results[key] <= 1.0
    m = results["metrics"]
    assert set(m) >= {"efficacy_exact", "generalization_exact", "specificity_exact", "locality_vs_unedited"}
    assert results["counts"]["efficacy"] == results["counts"]["specificity"] == results["edits"] == 8
    # the edits changed the model that was evaluated: efficacy rose, locality predictions moved
    assert results["efficacy"] > results["unedited"]["efficacy"]
    assert m["locality_vs_unedited"] < 1.0
    assert [(p["turns"], p["edits"]) for p in results["curve"]] == [(1, 4), (2, 8)]
    assert results["curve"][-1]["efficacy"] == results["efficacy"]
    assert len(results["turn_log"]) == 2 and all(t["requests"] == 4 for t in results["turn_log"])
    assert results["edits_per_second"] > 0 and results["peak_memory"]["bytes"] > 0
    assert results["peak_memory"]["kind"] == "rss"
    assert results["model"]["class"] == "LlamaForCausalLM" and len(results["model"]["weights_sha256"]) == 64
    assert results["method"]["name"] == "ultraedit" and results["method"]["capture_batch_size"] == 2
    assert results["method"]["lr"] == 20.0 and results["method"]["modules"] == results["model"]["edit_modules"]
    assert all("guard" in t for t in results["turn_log"])
    assert results["config"]["turns"] == 2 and results["dataset"]["format"] == "zsre"
    md = (out / "results.md").read_text()
    assert f"| Efficacy (token acc.) | {100 * results['unedited']['efficacy']:.2f} | {100 * results['efficacy']:.2f} |" in md
    assert "## Curve" in md
    assert "Damage guard: 0 of 2 turns shrunk" in md
    assert results["paper"] is None and "The paper" not in md  # a tiny model is not in the paper
    assert md in capsys.readouterr().out
    png = (out / "curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # Seeded and deterministic on CPU: the same run through the Python API gives the same numbers.
    again = run(BenchConfig(model=str(model_dir), dataset="zsre", data=str(FIXTURES / "zsre_eval.json"),
                            out=str(tmp_path / "again"), turns=2, turn_size=4, batch_size=2, lr=20.0,
                            eval_every=1, device="cpu", progress=False))
    assert again["metrics"] == results["metrics"] and again["curve"] == results["curve"]
    assert again["unedited"] == results["unedited"] and again["model"] == results["model"]


class _Recorder:
    """A plug-in method that edits nothing and records the turns it is given."""

    calls: list[list[str]] = []

    def __init__(self, model, tokenizer, config):
        self.model = model

    def edit(self, requests):
        _Recorder.calls.append([r.prompt for r in requests])

    def describe(self):
        return {"modules": ["model.layers.0.mlp.up_proj"], "note": "records only"}


def test_method_plugins_get_the_lifelong_sequence(model_dir, tmp_path):
    import transformers as T

    register_method("recorder", _Recorder)
    try:
        _Recorder.calls = []
        requests = list(read_requests(FIXTURES / "requests.jsonl"))
        model = T.AutoModelForCausalLM.from_pretrained(model_dir)
        tokenizer = T.AutoTokenizer.from_pretrained(model_dir)
        results = run(BenchConfig(model="tiny", dataset="jsonl", out=str(tmp_path), turns=3, turn_size=5,
                                  method="recorder", device="cpu", progress=False),
                      model=model, tokenizer=tokenizer, requests=requests)
    finally:
        bench.METHODS.pop("recorder")
    assert _Recorder.calls == [[r.prompt for r in requests[i : i + 5]] for i in (0, 5, 10)]
    # nothing was edited: the final scores are the unedited ones and locality agrees everywhere
    assert results["metrics"]["locality_vs_unedited"] == 1.0
    assert {k: results["metrics"][k] for k in results["unedited"]} == results["unedited"]
    assert results["counts"]["efficacy"] == 15
    assert results["counts"]["generalization"] == sum(1 for r in requests[:15] if r.rephrases)
    # and by generation: the same answers as before editing, every locality answer unchanged
    assert list(results["generation"]) == ["plain"]
    said, before = results["generation"]["plain"], results["generation_unedited"]["plain"]
    for key in ("efficacy", "generalization", "exact", "first_span", "contains"):
        assert said[key] == before[key], key
    assert said["locality_unchanged"] == 1.0 and before["locality_unchanged"] is None
    assert all(e["before"] == e["after"] for e in results["generation_examples"]["plain"])
    assert results["method"] == {"name": "recorder", "modules": ["model.layers.0.mlp.up_proj"], "note": "records only"}


def test_python_api_edits_only_the_edit_modules(model_dir, tmp_path):
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = T.AutoTokenizer.from_pretrained(model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = run(BenchConfig(model="tiny", dataset="counterfact", data=str(FIXTURES / "counterfact.json"),
                              out=str(tmp_path), turns=1, turn_size=3, lr=1e-2, device="cpu", progress=False),
                  model=model, tokenizer=tokenizer)
    changed = {k.removesuffix(".weight") for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(results["model"]["edit_modules"]) and changed
    assert results["counts"]["specificity"] == 3  # neighborhood prompts scored with target_true
    assert results["counts"]["generalization"] == 3


def test_too_little_data_and_bad_records_are_clear_errors(model_dir, tmp_path, capsys):
    data = FIXTURES / "ultraeditbench.json"
    common = ["bench", "--model", str(model_dir), "--dataset", "ultraeditbench", "--device", "cpu", "--quiet"]
    code = main([*common, "--data", str(data), "--turns", "5", "--turn-size", "7", "--out", str(tmp_path / "a")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{data} provides 32 requests; --turns 5 x --turn-size 7 needs 35" in err

    records = json.loads(data.read_text())[:6]
    del records[2]["rephrase_prompt"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    code = main([*common, "--data", str(bad), "--turns", "1", "--turn-size", "5", "--out", str(tmp_path / "b")])
    assert code == 2
    assert f"{bad}: record 2: field 'rephrase_prompt': missing" in capsys.readouterr().err

    out = tmp_path / "c"
    code = main([*common, "--data", str(bad), "--turns", "1", "--turn-size", "5", "--skip-invalid", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]["skipped_invalid"] == 1 and results["counts"]["efficacy"] == 5
    assert json.loads((out / "rejects.jsonl").read_text())["index"] == 2


def test_config_validation():
    with pytest.raises(BenchError, match="needs --data FILE"):
        run(BenchConfig(model="m", dataset="zsre", out="o", turns=1))
    with pytest.raises(BenchError, match="turn_size must be a positive integer"):
        BenchConfig(model="m", dataset="zsre", data="f", out="o", turns=1, turn_size=0)
    with pytest.raises(BenchError, match="eval_max_tokens must be a positive integer or None"):
        BenchConfig(model="m", dataset="zsre", data="f", out="o", turns=1, eval_max_tokens=0)
    with pytest.raises(BenchError, match="unknown method 'rledit'"):
        BenchConfig(model="m", dataset="zsre", data="f", out="o", turns=1, method="rledit")
    with pytest.raises(BenchError, match="unknown dataset"):
        BenchConfig(model="m", dataset="squad", data="f", out="o", turns=1)


def test_the_testbed_model_and_data_run_with_the_testbed_configuration(tmp_path):
    from ultraedit.configs import load_spec
    from ultraedit.testbed import TESTBED_MODULES

    out = tmp_path / "tb"
    no_lr = [a for a in ARGS if a not in ("--lr", "1e-2")]
    assert main(["bench", "--model", "testbed", "--dataset", "testbed", *no_lr, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    method = results["method"]
    assert method["configuration"] == "testbed" and method["modules"] == TESTBED_MODULES
    assert method["lr"] == load_spec("testbed")["config"]["lr"]
    assert results["dataset"]["format"] == "jsonl" and results["dataset"]["path"].endswith("requests.jsonl.gz")
    assert results["model"]["name_or_path"] == "testbed" and results["edits"] == 8


def test_paper_reference_numbers_are_shown_for_the_papers_settings():
    from ultraedit.bench import paper_reference

    ref = paper_reference("zsre", "meta-llama/Meta-Llama-3-8B-Instruct")
    assert ref is not None and ref["edits"] == 20_000 and ref["efficacy"] == pytest.approx(0.9007)
    assert paper_reference("ultraeditbench", "EleutherAI/gpt-j-6b")["specificity"] == pytest.approx(0.7644)
    assert paper_reference("fever", "meta-llama/Meta-Llama-3-8B-Instruct") is None
    assert paper_reference("zsre", "/tmp/tiny") is None



def test_results_name_the_papers_numbers_in_its_setting(model_dir, tmp_path):
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = T.AutoTokenizer.from_pretrained(model_dir)
    label = "meta-llama/Meta-Llama-3-8B-Instruct"  # a label only: the tiny model is what runs
    results = run(BenchConfig(model=label, dataset="zsre", data=str(FIXTURES / "zsre_eval.json"), out=str(tmp_path),
                              turns=1, turn_size=2, device="cpu", progress=False), model=model, tokenizer=tokenizer)
    assert results["paper"]["edits"] == 20_000 and results["paper"]["generalization"] == pytest.approx(0.8736)
    md = (tmp_path / "results.md").read_text()
    assert "after 20,000 edits: Efficacy 90.07, Generalization 87.36, Specificity 49.51." in md


def test_count_check_comes_before_loading_the_model(model_dir, tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the count check")

    from ultraedit.bench import runner

    monkeypatch.setattr(runner, "load_model", no_load)
    config = BenchConfig(model=str(model_dir), dataset="ultraeditbench", data=str(FIXTURES / "ultraeditbench.json"),
                         out=str(tmp_path), turns=5, turn_size=7, device="cpu", progress=False)
    with pytest.raises(BenchError, match="provides 32 requests; --turns 5 x --turn-size 7 needs 35"):
        run(config)


@pytest.mark.parametrize("faithful", [False, True])
def test_results_record_the_configuration_retention_and_perplexity(model_dir, tmp_path, faithful):
    out = tmp_path / "out"
    args = ["bench", "--model", str(model_dir), "--dataset", "zsre", "--data", str(FIXTURES / "zsre_eval.json"),
            "--turns", "1", "--turn-size", "4", "--batch-size", "2", "--device", "cpu", "--quiet", "--out", str(out)]
    assert main(args + (["--config", "faithful"] if faithful else [])) == 0
    results = json.loads((out / "results.json").read_text())
    method = results["method"]
    if faithful:
        assert method["configuration"] == "faithful"
        assert (method["lr"], method["lr_scale"], method["refine"], method["generic"]) == (1e-6, "none", None, None)
    else:
        assert method["configuration"] == "recommended"
        assert method["refine"]["steps"] > 1 and method["generic"]["weight"] > 0 and (method["lr_scale"], method["ridge_scale"]) == ("output", "keys") and method["guard"] is not None
    retention = results["metrics"]["retention"]  # None: the random model knows no locality token
    assert retention is None or 0.0 <= retention <= 1.0
    assert "locality_vs_unedited" in results["metrics"]
    ppl = results["perplexity"]
    assert ppl["before"] > 1 and ppl["after"] > 1
    assert ppl["rise"] == pytest.approx(ppl["after"] / ppl["before"] - 1)
