"""The model's own rewordings (``EditConfig.paraphrases``): sampling against a plain reference on
tiny models of every architecture, the filter, seeding, and the editor's use of them."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

from ultraedit import EditConfig, EditRequest, UltraEditor
from ultraedit.stages.common import request_seed, with_copies
from ultraedit.stages.paraphrase import SHOTS, _shots_cache, draw, paraphrases, query, sample, usable
from ultraedit.core.presets import resolve_modules

from reference_stages import reference_continuation
from tiny import ARCHS, text_tokenizer, tiny_config


def _model(arch: str, tok, newline_boost: float = 0.0):
    """A tiny random model over ``tok``'s vocabulary; ``newline_boost`` raises the newline token's
    output row so that some samples end early."""
    config = tiny_config(arch)
    config.vocab_size = len(tok)
    if hasattr(config, "n_positions"):  # GPT-2/GPT-J: room for the few-shot prompt
        config.n_positions = 512
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    if newline_boost:
        newline = tok.convert_tokens_to_ids("Ċ")
        with torch.no_grad():
            head = model.get_output_embeddings().weight
            head[newline] = head[newline] + newline_boost * head.mean(0) / head.mean(0).norm()
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prefix_sampling_matches_a_plain_uncached_loop(arch):
    """Sampling behind the few-shot prompt's shared KV cache, several queries of different lengths
    padded in the middle, several samples each, equals sampling each alone with full forwards."""
    tok = text_tokenizer()
    model = _model(arch, tok, newline_boost=30.0)
    prefix = _shots_cache(model, tok)
    queries = [query("The capital of France is"), query("Who wrote the novel Dracula, and when?"), query("Spain")]
    seeds = [11 * i + 3 for i in range(len(queries) * 3)]
    got = sample(model, tok, prefix, queries, seeds, samples=3, temperature=0.7, top_p=0.9, max_new_tokens=6)
    want = [reference_continuation(model, tok, prefix.ids[0].tolist() + tok(q, add_special_tokens=False)["input_ids"],
                                   seeds[i], 0.7, 0.9, 6)
            for i, q in enumerate(q for q in queries for _ in range(3))]
    assert got == want
    assert len({len(tok(t)["input_ids"]) for t in got}) > 1  # some samples stopped early, some did not


def test_draw_is_nucleus_sampling_by_inversion():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    # top_p 0.7: tokens {0, 1} (mass 0.8) in row 0; cumulative 0.625, 1.0
    assert draw(probs, 0.7, torch.tensor([0.6, 0.0])).tolist() == [0, 3]
    assert draw(probs, 0.7, torch.tensor([0.63, 0.99])).tolist() == [1, 2]
    assert draw(probs, 0.01, torch.tensor([0.99, 0.99])).tolist() == [0, 3]  # at least one token
    assert draw(probs, 1.0, torch.tensor([0.999, 0.96])).tolist() == [3, 0]


@pytest.mark.parametrize("sample_text, kept", [
    (" Which city is the capital of France?\nSentence: more", "Which city is the capital of France?"),
    (" France's capital is", "France's capital is"),
    (" the capital of france is:", None),  # the prompt again
    (" The capital is", None),  # no subject
    (" The capital of France is Paris.", None),  # a statement
    (" Which city is Peru's capital, like France's?", None),  # echoes an example
    (" France " + "and more " * 20, None),  # a ramble
])
def test_usable_keeps_rewordings_that_name_the_subject_and_state_no_answer(sample_text, kept):
    assert usable("The capital of France is", "France", sample_text) == kept


def test_paraphrases_are_seeded_by_the_request_and_skip_requests_without_a_subject():
    """A request gets the same rewordings alone or with others; the real filter rejects a tiny
    random model's text, so its samples are checked through ``sample`` with the request's seeds."""
    tok = text_tokenizer()
    model = _model("llama", tok)
    prefix = _shots_cache(model, tok)
    requests = [EditRequest("The capital of France is", "Rome", extra={"subject": "France"}),
                EditRequest("Danielle Darrieux speaks", "Dutch", extra={"subject": "Danielle Darrieux"})]
    seeds = [request_seed(requests[1]) + k for k in range(2)]
    alone = sample(model, tok, prefix, [query(requests[1].prompt)], seeds, samples=2, temperature=0.7, top_p=0.9,
                   max_new_tokens=5)
    both = sample(model, tok, prefix, [query(r.prompt) for r in requests],
                  [request_seed(requests[0]) + k for k in range(2)] + seeds, samples=2, temperature=0.7, top_p=0.9,
                  max_new_tokens=5)
    assert both[2:] == alone
    no_subject = [EditRequest("No subject here is", "given")]
    assert paraphrases(model, tok, no_subject, 2) == [[]] and paraphrases(model, tok, requests, 0) == [[], []]


def test_shots_end_each_example_with_a_blank_line_and_query_opens_the_next():
    assert SHOTS.endswith("\n\n") and query("X is").startswith("Sentence: X is\n")


@pytest.fixture(scope="module")
def smollm2():
    from ultraedit.models import ModelError, load_model

    try:
        return load_model("smollm2-135m", "cpu")
    except ModelError as err:
        pytest.skip(f"the built-in real model cannot be had here: {err}")


def test_a_turn_with_paraphrases_edits_the_real_models_rewordings_as_copies(smollm2):
    """On SmolLM2-135M: the rewordings name the subject, and the turn equals a plain turn over the
    requests and those rewordings given as requests."""
    model, tok = smollm2
    requests = [EditRequest("What is the capital city of Kenya?", "Lusaka", extra={"subject": "Kenya"}),
                EditRequest("Which company makes the iPhone?", "Nokia", extra={"subject": "iPhone"})]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    reworded = paraphrases(model, tok, requests, 2)
    assert reworded == paraphrases(model, tok, requests, 2)  # seeded
    assert any(reworded) and all(r.extra["subject"] in line for r, lines in zip(requests, reworded) for line in lines)
    names = resolve_modules(model)[-2:]
    twin = copy.deepcopy(model)
    try:
        report = UltraEditor(model, EditConfig(modules=names, lr=1e-4, paraphrases={"count": 2}), tokenizer=tok).edit(requests)
        assert report.requests == 2 and report.paraphrases == sum(map(len, reworded))
        UltraEditor(twin, EditConfig(modules=names, lr=1e-4), tokenizer=tok).edit(with_copies(requests, reworded)[0])
        for n in names:
            assert torch.equal(model.get_submodule(n).weight, twin.get_submodule(n).weight)
    finally:
        model.load_state_dict(saved)


def test_paraphrases_must_be_a_positive_int():
    with pytest.raises(ValueError, match=r"EditConfig.paraphrases.count must be a positive int, got -1"):
        EditConfig(paraphrases={"count": -1})
    with pytest.raises(ValueError, match="paraphrases.count"):
        EditConfig(paraphrases={"count": 1.5})


def test_a_model_too_short_for_the_few_shot_prompt_gets_one_clear_error_and_no_change():
    from ultraedit import EditError

    tok = text_tokenizer()
    config = tiny_config("gpt2")  # 128 positions: less than the few-shot prompt
    config.vocab_size = len(tok)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = UltraEditor(model, EditConfig(modules=resolve_modules(model), paraphrases={"count": 1}), tokenizer=tok)
    requests = [EditRequest("The capital of France is", "Rome", extra={"subject": "France"})]
    with pytest.raises(EditError, match=r"paraphrases: .* need \d+ positions, but the model has 128"):
        editor.edit(requests)
    assert editor.turns == 0 and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
