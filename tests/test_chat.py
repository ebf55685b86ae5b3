"""Edits through the chat template (``EditConfig.chat``): the sequences a turn edits, their
tokenization, the unrelated replies' keys against a plain computation, and an idle stage."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import tiny_text_model

from ultraedit import EditConfig, EditRequest, UltraEditor
from ultraedit.contexts import end_of_answer, prompt_ids
from ultraedit.core.batching import IGNORE
from ultraedit.core.presets import resolve_modules
from ultraedit.texts import package_text

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REQUESTS = [EditRequest("The capital of France is", "Rome", extra={"subject": "France"}),
            EditRequest("Danielle Darrieux speaks", "Dutch")]


def chat_model(arch: str = "llama"):
    model, tok = tiny_text_model(arch, seed=1)
    tok = copy.deepcopy(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    model.resize_token_embeddings(len(tok))
    tok.chat_template = CHAT_TEMPLATE
    return model, tok


def sequences(batches):
    """The (input ids, label ids) of every real row, as lists."""
    out = []
    for b in batches:
        for ids, mask, labels in zip(b["input_ids"], b["attention_mask"], b["labels"]):
            n = int(mask.sum())
            out.append((ids[:n].tolist(), [x for x in labels[:n].tolist() if x != IGNORE]))
    return out


@pytest.mark.parametrize("plain", [True, False])
@pytest.mark.parametrize("with_end", [True, False])
def test_a_turn_edits_each_request_through_the_template(plain, with_end):
    model, tok = chat_model()
    editor = UltraEditor(model, EditConfig(chat={"plain": plain, "end": with_end, "weight": 0.0}), tokenizer=tok)
    batches, owners, extra = editor.tokenize(REQUESTS)
    got = sequences(batches)
    end = tok(end_of_answer(tok, "chat"), add_special_tokens=False)["input_ids"]
    assert end == [tok.convert_tokens_to_ids("<|im_end|>")]
    end = end if with_end else []
    wanted = []
    for request in REQUESTS:
        answer = tok(request.target, add_special_tokens=False)["input_ids"] + end
        wanted.append((prompt_ids(tok, request.prompt, "chat") + answer[:-1], answer))
        if plain:
            answer = tok(" " + request.target, add_special_tokens=False)["input_ids"]
            wanted.append((tok(request.prompt)["input_ids"] + answer[:-1], answer))
    assert sorted(got) == sorted(wanted)
    assert sorted(owners) == sorted([0, 1] * (2 if plain else 1))
    assert extra == (2 if plain else 0)


def test_the_subject_is_found_inside_the_rendered_prompt():
    model, tok = chat_model()
    editor = UltraEditor(model, EditConfig(chat={"weight": 0.0}, subject={"depth": 0.5, "search": None}), tokenizer=tok)
    batches, owners, _ = editor.tokenize(REQUESTS[:1])
    for b in batches:
        for ids, index in zip(b["input_ids"], b["subject_index"]):
            text = tok.decode(ids[: int(index) + 1])
            assert text.rstrip().endswith("France"), text


def test_without_a_chat_template_the_stage_is_idle_and_says_so():
    model, tok = tiny_text_model("llama", seed=1)
    alone = UltraEditor(copy.deepcopy(model), EditConfig(), tokenizer=tok).tokenize(REQUESTS)
    editor = UltraEditor(model, EditConfig(chat={}), tokenizer=tok)
    with_stage = editor.tokenize(REQUESTS)
    assert sequences(alone[0]) == sequences(with_stage[0])
    report = editor.edit(REQUESTS)
    assert report.stages["chat"] == {"idle": "the tokenizer has no chat template"}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_conversation_keys_match_a_plain_one_conversation_at_a_time_computation(arch):
    model, tok = chat_model(arch)
    editor = UltraEditor(model, EditConfig(chat={"weight": 5.0}), tokenizer=tok)
    ours = next(s for s in editor.stages if s.name == "chat").moments
    names = resolve_modules(model)
    inputs = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda mod, args, out, n=n: inputs.__setitem__(n, args[0][0])) for n in names]
    sums = {n: 0 for n in names}
    lines = package_text("generic.txt")
    count = 0
    with torch.no_grad():
        for i, line in enumerate(lines):
            text = tok.apply_chat_template(
                [{"role": "user", "content": line}, {"role": "assistant", "content": lines[(i + 1) % len(lines)]}],
                tokenize=False)
            assert text.startswith("<|im_start|>user\n" + line) and text.endswith("<|im_end|>\n")
            model(input_ids=torch.tensor([tok(text, add_special_tokens=False)["input_ids"]]))
            for n in names:
                k = inputs[n].double()
                sums[n] = sums[n] + k.T @ k
            count += k.shape[0]
    for h in handles:
        h.remove()
    for n in names:
        torch.testing.assert_close(ours[n].double(), sums[n] / count, rtol=1e-4, atol=1e-6)
