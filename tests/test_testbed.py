"""The built-in knowledge testbed: world generator, shipped model and files, demo, training script."""

from __future__ import annotations

import gzip
import json
import math
import re

import pytest
import torch

from ultraedit import EditConfig, score_pairs
from ultraedit.datasets import read_requests
from ultraedit.core.presets import PRESETS, resolve_modules
from ultraedit.testbed import (
    TESTBED_MODULES,
    counterfact_path,
    facts_path,
    load_requests,
    load_testbed,
    requests_path,
    zsre_path,
)
from ultraedit.testbed.world import RELATIONS, WorldConfig, generate_world, split_world, write_datasets

SMALL = WorldConfig(seed=3, people=60, cities=20, countries=6, companies=12, languages=5)


@pytest.fixture(scope="module")
def testbed():
    return load_testbed()


@pytest.fixture(scope="module")
def world():
    return generate_world()


def test_world_is_deterministic_and_seeded():
    a, b = generate_world(SMALL), generate_world(SMALL)
    assert a.facts == b.facts and a.entities == b.entities
    other = generate_world(WorldConfig(**{**SMALL.to_dict(), "seed": 4}))
    assert other.facts != a.facts
    sa, sb = split_world(a), split_world(b)
    assert sa.edits == sb.edits and sa.locality == sb.locality and sa.neighbors == sb.neighbors


def test_world_shape(world):
    assert len(world.relations) == 12
    names = [n for kind in ("person", "city", "country", "company", "language") for n in world.entities[kind]]
    assert len(names) == len(set(names)) >= 2000  # a few thousand distinct invented entities
    # one fact per (subject, relation), subject and object of the relation's types
    keys = [(f.subject, f.relation) for f in world.facts]
    assert len(keys) == len(set(keys))
    for f in world.facts[::97]:
        rel = world.relation(f.relation)
        assert f.subject in world.entities[rel.subject_kind] and f.object in world.entities[rel.object_kind]
    # answers are shared, as in real knowledge: the most common city is the birthplace of many
    born = [f.object for f in world.facts if f.relation == "P19"]
    assert max(born.count(c) for c in set(born)) >= 20


def test_heldout_templates_are_new_wordings_of_trained_words():
    word = re.compile(r"[A-Za-z]+")
    trained = {w for r in RELATIONS for t in r.train_templates for w in word.findall(t.replace("{}", ""))}
    for r in RELATIONS:
        assert len(r.train_templates) >= 4 and len(r.held_out) >= 2
        assert not set(r.held_out) & set(r.train_templates)
        for t in r.held_out:
            assert set(word.findall(t.replace("{}", ""))) <= trained, t


def test_split_edits_and_locality(world):
    split = split_world(world)
    locality = set(split.locality)
    assert len(split.edits) >= 10_000  # enough for the 10,000-edit run
    edited = [fact for fact, _ in split.edits]
    assert not locality & set(edited)
    assert len(locality) + len(edited) == len(world.facts)
    for (fact, new), neighbors, other in list(zip(split.edits, split.neighbors, split.others))[::53]:
        rel = world.relation(fact.relation)
        assert new != fact.object and new in world.entities[rel.object_kind]
        assert neighbors, "every edited fact has a never-edited neighbour with the same true answer"
        for g in neighbors:
            assert g in locality and g.relation == fact.relation and g.object == fact.object and g.subject != fact.subject
        assert other in locality and other.relation != fact.relation


def test_written_files_match_the_generator_and_every_loader_reads_them(tmp_path):
    w = generate_world(SMALL)
    split = split_world(w)
    paths = write_datasets(w, split, tmp_path)
    first = json.loads(gzip.open(paths["requests"], "rt").readline())
    fact, new = split.edits[0]
    assert first["target"] == new and fact.subject in first["prompt"]
    assert all(fact.subject in p for p in first["rephrases"])
    for kind, fmt in (("requests", "jsonl"), ("zsre", "zsre"), ("counterfact", "counterfact")):
        with read_requests(paths[kind], format="auto") as reader:
            got = list(reader)
        assert reader.format == fmt and len(got) == len(split.edits)
        assert [r.target for r in got] == [new for _, new in split.edits]
        assert all(r.rephrases and r.locality for r in got)
    # the same seed writes the same bytes
    again = write_datasets(w, split, tmp_path / "again")
    for kind in paths:
        assert paths[kind].read_bytes() == again[kind].read_bytes(), kind


def test_shipped_files_are_the_generators_output(world):
    split = split_world(world)
    shipped = load_requests(50)
    assert [r.target for r in shipped] == [new for _, new in split.edits[:50]]
    assert [r.prompt for r in shipped] == [f.prompt(world.relation(f.relation).statements[0]) for f, _ in split.edits[:50]]
    with gzip.open(facts_path(), "rt") as fh:
        facts = [json.loads(line) for line in fh]
    assert [(f["subject"], f["relation"], f["object"]) for f in facts] == [(f.subject, f.relation, f.object) for f in world.facts]
    for path in (zsre_path(), counterfact_path()):
        with read_requests(path) as reader:
            assert sum(1 for _ in reader) == len(split.edits)


def test_shipped_model_loads_offline_and_knows_its_facts(testbed, world, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = testbed
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    assert isinstance(model, LlamaForCausalLM) and isinstance(tokenizer, PreTrainedTokenizerFast)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    # answers are one to three tokens
    objects = {f.object for f in world.facts}
    assert max(len(tokenizer(" " + o, add_special_tokens=False)["input_ids"]) for o in objects) <= 3
    g = torch.Generator().manual_seed(0)
    train = world.training_pairs()
    sample = [train[i] for i in torch.randint(len(train), (400,), generator=g).tolist()]
    acc = score_pairs(model, tokenizer, sample)["accuracy"]
    assert sum(acc) / len(acc) >= 0.93, "the shipped model must know the facts it was trained on"
    held = world.heldout_pairs()
    sample = [held[i] for i in torch.randint(len(held), (400,), generator=g).tolist()]
    acc = score_pairs(model, tokenizer, sample)["accuracy"]
    assert sum(acc) / len(acc) >= 0.5, "held-out paraphrases should mostly be answered"
    # a model of random weights of the same shape knows nothing: the check above can fail
    torch.manual_seed(0)
    blank = type(model)(model.config).eval()
    acc = score_pairs(blank, tokenizer, sample[:100])["accuracy"]
    assert sum(acc) / len(acc) < 0.2


def test_testbed_preset_matches_config(testbed):
    model, _ = testbed
    assert resolve_modules(model, "testbed") == TESTBED_MODULES
    assert PRESETS["testbed"].reference_layers == model.config.num_hidden_layers


def test_the_demo_shows_its_edits_taking_effect(capsys, tmp_path):
    """``ultraedit demo --model testbed`` (the fully offline path), as a user runs it: the edits it
    makes take effect (ES >= 0.90) and the untouched facts mostly stay (locality >= 0.85)."""
    from ultraedit.cli import main

    assert main(["demo", "--model", "testbed", "--show", "2", "--quiet", "--json", str(tmp_path / "d.json")]) == 0
    out = capsys.readouterr().out
    for key in ("Efficacy (ES)", "Generalization (GS)", "Locality (LS)", "before", "untouched", "rephrase"):
        assert key in out
    scores = __import__("json").loads((tmp_path / "d.json").read_text())
    assert scores["configuration"] == "testbed" and scores["edits"] == 100
    assert scores["efficacy_before"] < 0.05 and scores["efficacy"] >= 0.90
    assert scores["locality_before"] == 1.0 and scores["locality"] >= 0.85
    assert re.search(r"^edit .* ok$", out, re.M)  # a shown edit took effect under greedy generation


def test_edit_and_score_uses_the_real_editor(testbed):
    from ultraedit.demo import edit_and_score

    model, tokenizer = load_testbed()  # a fresh copy: this test edits it
    requests = load_requests(40)
    edited = model.get_submodule(TESTBED_MODULES[-1])
    weights = edited.weight.clone()
    strong = EditConfig(modules=TESTBED_MODULES, lr=2e-2)
    scores = edit_and_score(model, tokenizer, requests, strong, turn_size=20, progress=False)
    assert scores["turns"] == 2 and scores["edits"] == 40
    assert scores["efficacy_before"] < 0.1 and scores["efficacy"] >= scores["efficacy_before"] + 0.2
    assert scores["locality_before"] >= 0.9  # the unedited model knows its locality facts
    assert not torch.equal(weights, edited.weight)
    # the authors' lr (tuned for hidden size 4096) barely moves this small model
    model, tokenizer = load_testbed()
    weak = edit_and_score(model, tokenizer, requests, EditConfig(modules=TESTBED_MODULES, lr=1e-6),
                          turn_size=20, progress=False)
    assert weak["efficacy"] < scores["efficacy"] - 0.1


def test_training_script_writes_a_loadable_testbed(tmp_path):
    from ultraedit.testbed.train import ModelConfig, TrainConfig, train_testbed

    config = TrainConfig(steps=40, batch_size=64, eval_every=20, eval_pairs=64, world=SMALL,
                         model=ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, vocab_size=1500))
    summary = train_testbed(tmp_path, config, progress=False)
    assert summary["history"][-1]["step"] == 40 and summary["weights_bytes"] > 0
    losses = [h["loss"] for h in summary["history"]]
    # it learns: below a uniform guess over the vocabulary (ln 1500 = 7.31), and falling (seeded: 6.78 -> 6.29)
    assert losses[0] < math.log(1500) and losses[-1] < losses[0] - 0.2, losses
    model, tokenizer = load_testbed(data_dir=tmp_path)
    assert model.config.hidden_size == 32 and model.model.embed_tokens.weight.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert requests_path(tmp_path).is_file()
    # seeded: the same config trains the same weights
    again = train_testbed(tmp_path / "again", config, progress=False)
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()
    assert again["history"] == summary["history"]
