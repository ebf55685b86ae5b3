"""Dataset loaders: each published format on its fixture, errors, skipping, streaming memory."""

from __future__ import annotations

import gc
import gzip
import io
import json
import sys
import tracemalloc
from pathlib import Path

import pytest

from ultraedit.core.batching import EditRequest
from ultraedit.datasets import DATASET_FORMATS, DatasetError, detect_format, parse_record, read_requests

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
import make_fixtures  # noqa: E402


def raw(name: str) -> list[dict]:
    text = (FIXTURES / name).read_text()
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def test_fixtures_are_what_the_generator_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(make_fixtures, "HERE", tmp_path)
    make_fixtures.main()
    for path in tmp_path.iterdir():
        assert path.read_bytes() == (FIXTURES / path.name).read_bytes(), path.name


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("zsre_eval.json", "zsre"),
        ("zsre_mend.json", "zsre"),
        ("counterfact.json", "counterfact"),
        ("fever_eval.json", "fever"),
        ("wikibigedit_eval.json", "wikibigedit"),
        ("ultraeditbench.json", "ultraeditbench"),
        ("requests.jsonl", "jsonl"),
    ],
)
def test_auto_detects_every_fixture(name, fmt):
    reader = read_requests(FIXTURES / name)
    requests = list(reader)
    assert reader.format == fmt
    assert len(requests) == len(raw(name)) == reader.read
    assert reader.skipped == 0
    assert all(isinstance(r, EditRequest) for r in requests)
    # an explicit format reads the same requests
    assert list(read_requests(FIXTURES / name, fmt)) == requests


def test_zsre_mapping():
    records = raw("zsre_eval.json")
    requests = list(read_requests(FIXTURES / "zsre_eval.json", "zsre"))
    for rec, req in zip(records, requests):
        assert req.prompt == rec["src"]
        assert req.target == rec["ans"]
        assert req.rephrases == (rec["rephrase"],)
        assert rec["loc"].startswith("nq question: ")
        assert req.locality == ((rec["loc"] + "?", rec["loc_ans"]),)
        assert req.extra.get("target_true") == (rec["answers"][0] if rec.get("answers") else None)
    # EasyEdit's copy names the new answer ``alt``
    mend = raw("zsre_mend.json")
    assert [r.target for r in read_requests(FIXTURES / "zsre_mend.json")] == [r["alt"] for r in mend]


def test_zsre_prefers_ans_over_alt():
    rec = dict(raw("zsre_mend.json")[0], ans="Newtown")
    assert rec["alt"] != "Newtown"
    assert parse_record(rec, "zsre").target == "Newtown"


def test_counterfact_mapping():
    records = raw("counterfact.json")
    requests = list(read_requests(FIXTURES / "counterfact.json"))
    for rec, req in zip(records, requests):
        rw = rec["requested_rewrite"]
        assert req.prompt == rw["prompt"].format(rw["subject"])
        assert req.target == rw["target_new"]["str"]
        assert req.rephrases == tuple(rec["paraphrase_prompts"])
        assert req.locality == tuple((p, rw["target_true"]["str"]) for p in rec["neighborhood_prompts"])
        assert req.id == str(rec["case_id"])
        assert req.extra["target_true"] == rw["target_true"]["str"]
    assert requests[0].prompt == "The mother tongue of Arlen Voss is"


def test_fever_rephrase_is_a_seeded_choice():
    records = raw("fever_eval.json")
    a = list(read_requests(FIXTURES / "fever_eval.json", seed=0))
    b = list(read_requests(FIXTURES / "fever_eval.json", seed=0))
    c = list(read_requests(FIXTURES / "fever_eval.json", seed=1))
    assert [r.rephrases for r in a] == [r.rephrases for r in b]
    assert [r.rephrases for r in a] != [r.rephrases for r in c]
    for rec, req in zip(records, a):
        assert req.prompt == rec["prompt"] and req.target == rec["alt"] in ("SUPPORTS", "REFUTES")
        assert len(req.rephrases) == 1 and req.rephrases[0] in rec["equiv_prompt"]
        assert req.locality == ((rec["unrel_prompt"], rec["unrel_ans"]),)
        assert req.extra["equiv_prompts"] == tuple(rec["equiv_prompt"])


def test_fever_choice_does_not_depend_on_skipped_records(tmp_path):
    records = raw("fever_eval.json")
    broken = [dict(r) for r in records]
    del broken[1]["alt"]
    path = tmp_path / "fever.json"
    path.write_text(json.dumps(broken))
    full = list(read_requests(FIXTURES / "fever_eval.json", seed=3))
    skipped = list(read_requests(path, "fever", seed=3, skip_invalid=True))
    assert skipped == full[:1] + full[2:]


def test_wikibigedit_mapping():
    records = raw("wikibigedit_eval.json")
    requests = list(read_requests(FIXTURES / "wikibigedit_eval.json"))
    assert any("mhop" not in r for r in records) and any("mhop" in r for r in records)
    for rec, req in zip(records, requests):
        assert (req.prompt, req.target) == (rec["update"], rec["ans"])
        assert req.rephrases == (rec["rephrase"],)
        assert req.locality == ((rec["loc"], rec["loc_ans"]),)
        assert req.extra["personas"] == ((rec["personas"], rec["ans"]),)
        assert req.extra["mhop"] == (((rec["mhop"], rec["mhop_ans"]),) if "mhop" in rec else ())


def test_ultraeditbench_and_ours_mapping():
    for rec, req in zip(raw("ultraeditbench.json"), read_requests(FIXTURES / "ultraeditbench.json")):
        assert (req.prompt, req.target, req.rephrases) == (rec["prompt"], rec["ans"], (rec["rephrase_prompt"],))
        assert req.locality == ((rec["loc"], rec["loc_ans"]),)
        assert req.extra["subject"] == rec["subject"]
    for rec, req in zip(raw("requests.jsonl"), read_requests(FIXTURES / "requests.jsonl")):
        assert (req.prompt, req.target, req.id) == (rec["prompt"], rec["target"], rec["id"])
        assert req.rephrases == tuple(rec.get("rephrases", ()))
        assert req.locality == tuple((x["prompt"], x["answer"]) for x in rec.get("locality", ()))


def test_json_lines_and_gzip_containers(tmp_path):
    records = raw("zsre_eval.json")
    expected = list(read_requests(FIXTURES / "zsre_eval.json"))
    lines = tmp_path / "zsre.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert list(read_requests(lines)) == expected
    packed = tmp_path / "zsre.json.gz"
    with gzip.open(packed, "wt") as f:
        json.dump(records, f)
    assert list(read_requests(packed)) == expected
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(records).encode())
    assert list(read_requests(bom)) == expected
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    assert list(read_requests(empty)) == []
    empty.write_text("[]")
    assert list(read_requests(empty)) == []


def test_detect_format():
    assert detect_format(raw("counterfact.json")[0]) == "counterfact"
    assert detect_format({"foo": 1}) is None
    assert detect_format([1]) is None
    assert set(DATASET_FORMATS) == {"jsonl", "zsre", "counterfact", "fever", "wikibigedit", "ultraeditbench"}


# ----------------------------------------------------------------------------- errors
def _write_list(tmp_path: Path, records: list) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def test_missing_field_names_file_record_and_field(tmp_path):
    records = raw("zsre_eval.json")[:6]
    del records[3]["loc_ans"]
    path = _write_list(tmp_path, records)
    reader = read_requests(path)
    got = []
    with pytest.raises(DatasetError) as info:
        for r in reader:
            got.append(r)
    err = info.value
    assert len(got) == 3
    assert (err.path, err.index, err.field) == (str(path), 3, "loc_ans")
    assert str(err) == f"{path}: record 3: field 'loc_ans': missing"
    assert isinstance(err, ValueError)


@pytest.mark.parametrize(
    "mutate, field, problem",
    [
        (lambda r: r["requested_rewrite"]["target_new"].update(str=""), "requested_rewrite.target_new.str", "non-empty"),
        (lambda r: r["requested_rewrite"].update(prompt="The tongue is"), "requested_rewrite.prompt", "placeholder"),
        (lambda r: r["paraphrase_prompts"].__setitem__(1, 7), "paraphrase_prompts[1]", "non-empty string"),
        (lambda r: r.update(neighborhood_prompts="x"), "neighborhood_prompts", "list of strings"),
        (lambda r: r["requested_rewrite"].pop("target_true"), "requested_rewrite.target_true", "missing"),
    ],
)
def test_counterfact_field_errors(tmp_path, mutate, field, problem):
    records = raw("counterfact.json")[:3]
    mutate(records[2])
    with pytest.raises(DatasetError, match=problem) as info:
        list(read_requests(_write_list(tmp_path, records), "counterfact"))
    assert (info.value.index, info.value.field) == (2, field)


def test_jsonl_errors_name_the_line(tmp_path):
    lines = (FIXTURES / "requests.jsonl").read_text().splitlines()
    lines.insert(2, "")  # blank lines are skipped but still counted as lines
    lines[4] = json.dumps({"prompt": "A", "target": "B", "locality": [{"prompt": "C"}]})
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as info:
        list(read_requests(path))
    assert str(info.value) == f"{path}: line 5: field 'locality[0].answer': missing"


def test_wrong_explicit_format_is_a_clear_error():
    with pytest.raises(DatasetError, match=r"record 0: field 'src': missing"):
        list(read_requests(FIXTURES / "ultraeditbench.json", "zsre"))


def test_undetectable_format_and_bad_arguments(tmp_path):
    path = _write_list(tmp_path, [{"question": "q", "answer": "a"}])
    with pytest.raises(DatasetError, match=r"record 0: cannot tell the dataset format from the fields \['answer', 'question'\]"):
        list(read_requests(path))
    with pytest.raises(ValueError, match="unknown dataset format 'squad'"):
        read_requests(path, "squad")
    with pytest.raises(DatasetError, match="no such file"):
        read_requests(tmp_path / "missing.json")
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text('{\n  "data": []\n}\n')  # an object around the list is not a published layout
    with pytest.raises(DatasetError, match=r"line 1: malformed JSON .*JSON list of records or JSON Lines"):
        list(read_requests(wrapped))


def test_skip_invalid_counts_and_writes_rejects(tmp_path):
    records = raw("ultraeditbench.json")[:10]
    records[1]["ans"] = ["a", "list"]
    del records[4]["loc"]
    records[7] = "not an object"
    path = _write_list(tmp_path, records)
    rejects = tmp_path / "rejects.jsonl"
    reader = read_requests(path, skip_invalid=True, rejects=rejects)
    requests = list(reader)
    assert len(requests) == 7 and reader.skipped == 3 and reader.read == 10
    assert [r.prompt for r in requests] == [records[i]["prompt"] for i in (0, 2, 3, 5, 6, 8, 9)]
    lines = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert [(x["index"], x["unit"], x["field"]) for x in lines] == [(1, "record", "ans"), (4, "record", "loc"), (7, "record", None)]
    assert lines[1]["record"]["prompt"] == records[4]["prompt"]
    assert "must be a string" in lines[0]["error"]
    assert len(reader.errors) == 3 and f"{path}: record 4: field 'loc': missing" == reader.errors[1]


def test_skip_invalid_jsonl_with_broken_lines_to_a_file_object(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "A", "target": "B"}\n{"prompt": "C", "target": \n{"prompt": "D", "target": "E"}\n')
    with pytest.raises(DatasetError, match=r"line 2: malformed JSON"):
        list(read_requests(path))
    sink = io.StringIO()
    reader = read_requests(path, skip_invalid=True, rejects=sink)
    assert [r.prompt for r in reader] == ["A", "D"]
    entry = json.loads(sink.getvalue())
    assert (entry["index"], entry["unit"]) == (2, "line") and entry["raw"] == '{"prompt": "C", "target": '


def test_broken_json_list_is_fatal_even_when_skipping(tmp_path):
    text = json.dumps(raw("zsre_eval.json")[:5])
    path = tmp_path / "cut.json"
    path.write_text(text[: len(text) * 3 // 4])  # truncated mid-record
    with pytest.raises(DatasetError, match="malformed JSON") as info:
        list(read_requests(path, skip_invalid=True))
    assert info.value.index == 3


# ----------------------------------------------------------------------------- streaming
def _write_big(path: Path, n: int, json_list: bool = True) -> None:
    """``n`` UltraEditBench records, one per line: a published-style JSON list, or JSON Lines."""
    pool = [json.dumps(make_fixtures.ultraeditbench(i)) for i in range(32)]
    with open(path, "w") as f:
        f.write("[\n" if json_list else "")
        for i in range(n):
            if i:
                f.write(",\n" if json_list else "\n")
            f.write(pool[i % 32])
        f.write("\n]\n" if json_list else "\n")


def _status_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def _peak_growth_kb(path: Path, keep: int) -> int:
    """Peak memory growth (KB) while streaming ``path``, holding on to the first ``keep`` requests."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) of this process to its current RSS
        base = _status_kb()["VmRSS"]
        use_rss = True
    except OSError:  # not Linux or not allowed: measure Python allocations instead
        tracemalloc.start()
        use_rss = False
    kept = []
    count = 0
    for request in read_requests(path):
        count += 1
        if count <= keep:
            kept.append(request)
    assert count == 200_000
    if use_rss:
        return _status_kb()["VmHWM"] - base
    peak = tracemalloc.get_traced_memory()[1] // 1024
    tracemalloc.stop()
    return peak


def test_streaming_memory_is_flat_in_the_file_size(tmp_path):
    path = tmp_path / "UltraEditBench_200k.json"
    _write_big(path, 200_000)
    size_kb = path.stat().st_size // 1024
    assert size_kb > 40_000
    list(read_requests(FIXTURES / "ultraeditbench.json"))  # warm up imports and caches
    growth = _peak_growth_kb(path, keep=0)
    # Control: the same measurement sees memory that IS held (20K of the 200K requests).
    held = _peak_growth_kb(path, keep=20_000)
    print(f"file {size_kb} KB; streaming peak growth {growth} KB; holding 20K requests {held} KB")
    assert growth < 8 * 1024, growth
    assert held > 8 * 1024, held
    # the same file as JSON Lines streams too
    lines = tmp_path / "UltraEditBench_200k.jsonl"
    path.unlink()
    _write_big(lines, 200_000, json_list=False)
    growth_lines = _peak_growth_kb(lines, keep=0)
    print(f"JSON Lines: streaming peak growth {growth_lines} KB")
    assert growth_lines < 8 * 1024, growth_lines


FLAT_COUNTERFACT = {
    "case_id": 7, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
    "ground_truth": "French", "subject": "Danielle Darrieux",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
    "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French",
}


def test_flat_counterfact_layout_is_detected_and_read(tmp_path):
    assert detect_format(FLAT_COUNTERFACT) == "counterfact"
    request = parse_record(FLAT_COUNTERFACT, "counterfact")
    assert request == EditRequest(
        "The mother tongue of Danielle Darrieux is", "English",
        ("Where Danielle Darrieux is from, people speak the language of",),
        (("Michel Rocard is a native speaker of", "French"),),
        id="7", extra={"subject": "Danielle Darrieux", "target_true": "French"},
    )
    path = tmp_path / "flat.json"
    path.write_text(json.dumps([FLAT_COUNTERFACT, {**FLAT_COUNTERFACT, "case_id": 8}]))
    reader = read_requests(path)
    assert [r.id for r in reader] == ["7", "8"] and reader.format == "counterfact"


def test_flat_counterfact_without_locality_answer_is_a_clear_error():
    record = {k: v for k, v in FLAT_COUNTERFACT.items() if k != "locality_ground_truth"}
    with pytest.raises(DatasetError, match="locality_ground_truth"):
        parse_record(record, "counterfact")


SHARED_COUNTERFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact-20k.json.gz"


@pytest.mark.skipif(not SHARED_COUNTERFACT.exists(), reason="../shared/data not present")
def test_real_counterfact_slice_reads_in_the_flat_layout():
    reader = read_requests(SHARED_COUNTERFACT, "counterfact")
    first = [r for _, r in zip(range(50), reader)]
    assert len(first) == 50 and all(r.rephrases and len(r.locality) == 1 for r in first)
