"""The answer's end (``EditConfig.ending``): what a turn edits, with and without the chat stage, and
that an edited tiny model stops where it was taught to."""

from __future__ import annotations

import pytest
from test_chat import REQUESTS, chat_model, sequences
from tiny import tiny_text_model

from ultraedit import EditConfig, EditRequest, UltraEditor
from ultraedit.contexts import prompt_ids


def plain_pair(tok, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    ids = tok(" " + answer, add_special_tokens=False)["input_ids"]
    return tok(prompt)["input_ids"] + ids[:-1], ids


def test_each_target_is_edited_with_the_end_after_it():
    model, tok = tiny_text_model("llama", seed=1)
    requests = REQUESTS + [EditRequest("The motto ends with", "Go.")]
    got = sequences(UltraEditor(model, EditConfig(ending={}), tokenizer=tok).tokenize(requests)[0])
    wanted = [plain_pair(tok, r.prompt, r.target if r.target.endswith(".") else r.target + ".") for r in requests]
    assert sorted(got) == sorted(wanted)


def test_the_chat_copies_end_the_same_way():
    model, tok = chat_model()
    editor = UltraEditor(model, EditConfig(ending={"text": "!"}, chat={"weight": 0.0}), tokenizer=tok)
    got = sequences(editor.tokenize(REQUESTS)[0])
    wanted = []
    for r in REQUESTS:
        wanted.append(plain_pair(tok, r.prompt, r.target + "!"))
        answer = tok(r.target + "!", add_special_tokens=False)["input_ids"]
        wanted.append((prompt_ids(tok, r.prompt, "chat") + answer[:-1], answer))
    assert sorted(got) == sorted(wanted)


@pytest.mark.parametrize("text", ["", " .", 3])
def test_a_bad_end_is_refused_naming_the_field(text):
    with pytest.raises(ValueError, match="ending.text"):
        EditConfig(ending={"text": text})


@pytest.mark.parametrize("ending", [None, {}])
def test_an_edited_model_stops_after_the_answer_only_when_taught(ending):
    from ultraedit.generation import generate_answers

    model, tok = tiny_text_model("llama", seed=1)
    config = EditConfig(lr=0.1, ending=ending, refine={"steps": 5, "confidence": 0.0})
    UltraEditor(model, config, tokenizer=tok).edit(REQUESTS)
    said = generate_answers(model, tok, [r.prompt for r in REQUESTS], "plain", max_new_tokens=8)
    assert all(s.startswith(r.target) for s, r in zip(said, REQUESTS))
    assert (said == [r.target + "." for r in REQUESTS]) == (ending is not None), said
