"""Generation-based scoring: the normalisation and the stop rule on hand-made cases, batched greedy
decoding against the plain loop (tests/reference.py) on tiny models, contexts, and the scores of a
model that is not edited."""

from __future__ import annotations

import copy

import pytest

from ultraedit.contexts import ContextError, check_contexts, default_contexts, end_of_answer, prompt_ids, render
from ultraedit.core.batching import EditRequest, tokenize_pair
from ultraedit.generation import (
    GenerationTotals,
    evaluate_generation,
    first_sentence,
    generate_answers,
    match,
    normalize_answer,
    request_prompts,
    score_generations,
    stop_ids,
)

from reference import reference_answer
from tiny import tiny_text_model

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def with_template(tok):
    """A copy of the (shared, cached) tiny tokenizer with a chat template."""
    tok = copy.deepcopy(tok)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.mark.parametrize("text, expected", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  an   Apple, a day!  ", "apple day"),
    ("Jean-Luc Picard.", "jean luc picard"),
    ("THE END", "end"),
    ("theatre", "theatre"),  # an article only as a whole word
    ("", ""),
])
def test_normalisation(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    (" Paris. It is big.", "Paris."),
    (" Paris\nBerlin", "Paris"),
    (" 3.5 million people", "3.5 million people"),  # a point inside a number is no sentence end
    (" St. Louis", "St."),  # the rule is the field's: a point then a space ends it
    (" Is it? Yes.", "Is it?"),
    ("\nParis", ""),  # a bare question ended at once
    (" no end", "no end"),
])
def test_stop_rule(text, expected):
    assert first_sentence(text) == expected


@pytest.mark.parametrize("generation, target, exact, first, contains", [
    ("Battle of the Pacific (1776)", "Battle of the Pacific", False, True, True),
    ("battle of pacific", "Battle of the Pacific", True, True, True),
    ("The answer is Paris.", "Paris", False, False, True),
    ("Parisian food", "Paris", False, False, False),  # whole words only
    ("Lyon", "Paris", False, False, False),
])
def test_match_rules(generation, target, exact, first, contains):
    assert match(generation, target, "exact") is exact
    assert match(generation, target, "first_span") is first
    assert match(generation, target, "contains") is contains
    with pytest.raises(ValueError, match="unknown match rule"):
        match(generation, target, "fuzzy")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("context", ["plain", "chat"])
def test_batched_answers_equal_the_plain_greedy_loop(arch, context):
    model, tok = tiny_text_model(arch, seed=2)
    tok = with_template(tok)
    prompts = ["The capital of France is", "Who wrote Dracula?", "What", "Paris is located in the country of"]
    got = generate_answers(model, tok, prompts, context, max_new_tokens=8, batch_size=3)
    stops = stop_ids(model, tok, context)
    for prompt, text in zip(prompts, got):
        assert text == reference_answer(model, tok, prompt_ids(tok, prompt, context), stops, 8), prompt


def test_contexts_render_and_tokenize():
    _, tok = tiny_text_model("llama")
    assert default_contexts(tok) == ["plain"]
    with pytest.raises(ContextError, match="chat template"):
        check_contexts(["plain", "chat"], tok)
    with pytest.raises(ContextError, match="unknown context"):
        check_contexts(["bare"])
    tok = with_template(tok)
    assert default_contexts(tok) == ["plain", "chat"]
    assert check_contexts(["chat", "plain", "chat"], tok) == ["chat", "plain"]
    assert render(tok, "Q?", "chat") == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    assert render(tok, "Q?", "qa") == "Please answer the question:\n\nQ: Q?\nA:"
    assert end_of_answer(tok, "chat") == "<|im_end|>"
    assert end_of_answer(tok, "plain") == "."
    assert prompt_ids(tok, "Q?", "plain") == list(tok("Q?")["input_ids"])
    # a rendered chat prompt is tokenized as it stands; its target follows without a space
    ids, labels = tokenize_pair(tok, render(tok, "Q?", "chat"), "Paris", rendered=True)
    target = list(tok("Paris", add_special_tokens=False)["input_ids"])
    assert ids == prompt_ids(tok, "Q?", "chat") + target[:-1]
    assert [x for x in labels if x != -100] == target


def _requests():
    return [
        EditRequest("The capital of France is", "Lyon", rephrases=("France's capital is",),
                    locality=(("Danielle Darrieux speaks", "French"), ("What", "is"))),
        EditRequest("Who wrote Dracula?", "Bram Stoker", locality=(("The sky is", "blue"),)),
    ]


def test_scoring_arithmetic_on_given_texts():
    requests = _requests()
    prompts, spans = request_prompts(requests)
    assert prompts == ["The capital of France is", "France's capital is", "Danielle Darrieux speaks", "What",
                       "Who wrote Dracula?", "The sky is"]
    assert spans == [("efficacy", 0, 1), ("generalization", 1, 2), ("locality", 2, 4),
                     ("efficacy", 4, 5), ("generalization", 5, 5), ("locality", 5, 6)]
    before = ["Paris.", "Paris.", "French.", "is it", "Bram Stoker wrote it.", "grey"]
    after = ["Lyon, a city.", "Paris.", "French.", "it is", "He was Bram Stoker.", "grey"]
    totals = GenerationTotals("plain")
    score_generations(totals, requests, after, reference=before)
    out = totals.as_dict()
    assert out["efficacy"] == pytest.approx(0.5)  # first span: "lyon city" yes; "he was bram stoker" no
    assert out["first_span"]["efficacy"] == pytest.approx(0.5)
    assert out["exact"]["efficacy"] == 0.0
    assert out["contains"]["efficacy"] == 1.0
    assert out["generalization"] == 0.0 and out["counts"]["generalization_exact"] == 1
    assert out["locality_unchanged"] == pytest.approx((0.5 + 1.0) / 2)
    # right before: "French." and "is it" (starts with "is"); after, "French." still, "it is" not
    assert out["locality_kept"] == pytest.approx(0.5)
    chat = GenerationTotals("chat")
    score_generations(chat, requests, after, reference=before)
    assert chat.as_dict()["efficacy"] == 1.0 and chat.as_dict()["rule"] == "contains"


def test_a_model_that_is_not_edited_scores_its_unedited_numbers():
    model, tok = tiny_text_model("llama", seed=4)
    tok = with_template(tok)
    requests = _requests()
    first, texts = evaluate_generation(model, tok, requests, ["plain", "chat"])
    again, _ = evaluate_generation(model, tok, requests, ["plain", "chat"], reference=texts)
    for context in ("plain", "chat"):
        a, b = first[context].as_dict(), again[context].as_dict()
        assert a["locality_unchanged"] is None and b["locality_unchanged"] == 1.0
        for key in ("efficacy", "generalization", "exact", "first_span", "contains"):
            assert a[key] == b[key]
