"""An optional judge of generations: any OpenAI-compatible chat endpoint grades CORRECT/INCORRECT.

Exact and first-span matching (:mod:`ultraedit.generation`) never depend on it; the judge adds a
column for answers that say the target in other words. It is asked once per generation with
:data:`PROMPT` (stored in the results), at temperature 0, and its first word is read; a reply that
is neither verdict counts as none (reported). ``ultraedit serve`` of another model is such an
endpoint; so is any hosted one (``OPENAI_API_KEY`` or ``ULTRAEDIT_JUDGE_KEY`` is sent as the bearer
token when set).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any, Sequence

from .core.batching import EditRequest

PROMPT = (
    "You grade answers to questions against a gold answer.\n"
    "Question: {question}\nGold answer: {target}\nPredicted answer: {answer}\n"
    "Is the predicted answer correct: does it state the gold answer (a fuller wording or extra detail is "
    "fine; a different answer, a hedge or no answer is not)? Reply with one word: CORRECT or INCORRECT."
)


def verdict(reply: str) -> bool | None:
    """A judge's reply read: its first word CORRECT -> ``True``, INCORRECT -> ``False``, else ``None``."""
    word = (reply.strip().split() or [""])[0].strip(".,:;!*\"'`").upper()
    return word == "CORRECT" if word in ("CORRECT", "INCORRECT") else None


class JudgeError(RuntimeError):
    """The judge's endpoint cannot be reached or answers in a form that cannot be read."""


class Judge:
    """Grades generations through the chat endpoint at ``url`` (a server root, ``.../v1`` or the full
    ``.../chat/completions`` address); ``model``: the name sent (default: the first the server lists)."""

    def __init__(self, url: str, model: str | None = None, timeout: float = 60.0) -> None:
        base = url.rstrip("/")
        for tail in ("/chat/completions", "/v1"):
            base = base.removesuffix(tail)
        self.base, self.timeout = base, timeout
        self.key = os.environ.get("ULTRAEDIT_JUDGE_KEY") or os.environ.get("OPENAI_API_KEY")
        self.model = model or self._first_model()
        self.asked = self.unreadable = 0

    def _request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:300]
            raise JudgeError(f"judge at {self.base}{path}: HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as err:
            raise JudgeError(f"judge at {self.base}{path}: {err}") from None

    def _first_model(self) -> str:
        listed = self._request("/v1/models")
        try:
            return str(listed["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"judge at {self.base}/v1/models lists no model; pass a model name") from None

    def grade(self, question: str, target: str, answer: str) -> bool | None:
        """``True`` for CORRECT, ``False`` for INCORRECT, ``None`` when the reply is neither."""
        body = {"model": self.model, "temperature": 0, "max_tokens": 4,
                "messages": [{"role": "user", "content": PROMPT.format(question=question, target=target, answer=answer)}]}
        reply = self._request("/v1/chat/completions", body)
        self.asked += 1
        try:
            text = str(reply["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"judge at {self.base}: a reply without choices[0].message.content") from None
        said = verdict(text)
        self.unreadable += said is None
        return said

    def grade_requests(self, requests: Sequence[EditRequest], texts: Sequence[str]) -> list[bool | None]:
        """Verdicts on the edit prompts' and rephrases' generations (``None`` for locality prompts), in
        :func:`ultraedit.generation.request_prompts` order."""
        verdicts: list[bool | None] = []
        position = 0
        for request in requests:
            for question in (request.prompt, *request.rephrases):
                verdicts.append(self.grade(question, request.target, texts[position]))
                position += 1
            verdicts.extend([None] * len(request.locality))
            position += len(request.locality)
        return verdicts

    def describe(self) -> dict[str, Any]:
        return {"url": self.base, "model": self.model, "prompt": PROMPT, "asked": self.asked,
                "unreadable": self.unreadable}


__all__ = ["PROMPT", "Judge", "JudgeError", "verdict"]
