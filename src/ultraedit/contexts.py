"""How a question reaches the model: the contexts edits are scored (and made) in.

A *context* turns a prompt into the text the model reads and says how the answer follows it:

========  ===========================================================  ===========================
context   what the model reads                                         the answer
========  ===========================================================  ===========================
``plain``  the prompt, with the tokenizer's special tokens (the method's)  ``" " + answer``
``qa``     ``"Please answer the question:\\n\\nQ: {prompt}\\nA:"``          ``" " + answer``
``chat``   the model's chat template, the prompt as the user turn and      ``answer`` (no space)
           the assistant turn opened
========  ===========================================================  ===========================

``plain`` is the authors' teacher-forced layout (:func:`ultraedit.core.batching.tokenize_pair`);
``qa`` is the instruction "The Mirage of Model Editing" (arXiv 2502.11177) asks through; ``chat``
is how an instruct model is asked by ``ultraedit serve``'s chat endpoint and every chat client.
A rendered chat text already holds its special tokens, so it is tokenized without adding any.
"""

from __future__ import annotations

from typing import Any

CONTEXTS: tuple[str, ...] = ("plain", "qa", "chat")
QA_TEMPLATE = "Please answer the question:\n\nQ: {prompt}\nA:"
#: A sentence end: what the plain and qa contexts' answers are followed by.
SENTENCE_END = "."


class ContextError(ValueError):
    """A context that cannot be used with this tokenizer (e.g. ``chat`` without a chat template)."""


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def default_contexts(tokenizer: Any) -> list[str]:
    """``plain``, and ``chat`` where the tokenizer has a chat template."""
    return ["plain", "chat"] if has_chat_template(tokenizer) else ["plain"]


def check_contexts(contexts: list[str], tokenizer: Any | None = None) -> list[str]:
    """``contexts`` without repeats, each known (and ``chat`` only with a chat template when a tokenizer is given)."""
    out: list[str] = []
    for context in contexts:
        if context not in CONTEXTS:
            raise ContextError(f"unknown context {context!r}; choose from {', '.join(CONTEXTS)}")
        if context == "chat" and tokenizer is not None and not has_chat_template(tokenizer):
            raise ContextError("context 'chat' needs a tokenizer with a chat template; this model has none")
        if context not in out:
            out.append(context)
    if not out:
        raise ContextError("at least one context is needed")
    return out


def render(tokenizer: Any, prompt: str, context: str) -> str:
    """The text the model reads for ``prompt`` in ``context`` (special tokens included for ``chat``)."""
    if context == "plain":
        return prompt
    if context == "qa":
        return QA_TEMPLATE.format(prompt=prompt)
    if context == "chat":
        if not has_chat_template(tokenizer):
            raise ContextError("context 'chat' needs a tokenizer with a chat template; this model has none")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    raise ContextError(f"unknown context {context!r}; choose from {', '.join(CONTEXTS)}")


def prompt_ids(tokenizer: Any, prompt: str, context: str) -> list[int]:
    """Token ids of ``prompt`` rendered in ``context`` (special tokens added only outside ``chat``)."""
    return list(tokenizer(render(tokenizer, prompt, context), add_special_tokens=context != "chat")["input_ids"])


def answer_text(answer: str, context: str) -> str:
    """How ``answer`` follows the rendered prompt: after a space, except at the start of a chat turn."""
    return answer if context == "chat" else " " + answer


def end_of_answer(tokenizer: Any, context: str) -> str:
    """The text that ends an answer in ``context``: the chat template's end of turn (what it writes
    right after an assistant message), else a sentence end."""
    if context != "chat":
        return SENTENCE_END
    marker = "\u2063ANSWER\u2063"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": marker}], tokenize=False)
    after = text.split(marker, 1)[1] if marker in text else ""
    end = after.split("\n", 1)[0]
    if not end:
        eos = getattr(tokenizer, "eos_token", None)
        if not eos:
            raise ContextError("the chat template writes nothing after an assistant message and there is no EOS token")
        end = eos
    return end


__all__ = ["CONTEXTS", "QA_TEMPLATE", "ContextError", "answer_text", "check_contexts", "default_contexts",
           "end_of_answer", "has_chat_template", "prompt_ids", "render"]
