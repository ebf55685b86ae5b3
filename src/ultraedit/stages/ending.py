"""The answer's end (``EditConfig.ending``): teach a sentence end after each target.

UltraEdit writes the target's tokens after the prompt and nothing after them, so greedy decoding
of an edited model says the new answer and then runs on: "Virgo, Virgo, Virgo, ...",
"unmanned aircraft systems (UAS) and ...". Judged by what the model says (the first sentence of
its reply, matched exactly), such an edit is wrong although every target token is right. With
this stage each sequence of a turn is edited with ``text`` (a full stop by default) after its
target: the end becomes part of the target, so refinement counts a request done only when the
model also stops there. A target that already ends with ``text`` is left as it is.

It runs before the chat stage, so the templated copies end the same way (the chat stage's own
``end`` adds the template's end of turn after that). Evaluation still scores the target alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

from ..core.batching import EditRequest
from .base import Stage


@dataclass
class EndingConfig:
    """``text``: what follows each target (a non-empty string without leading space)."""

    text: str = "."

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text or self.text != self.text.lstrip():
            raise ValueError(f"EditConfig.ending.text must be a non-empty string without leading space, got {self.text!r}")


class EndingStage(Stage):
    """Each sequence of a text turn gets ``text`` after its target."""

    name = "ending"

    def contexts(self, tokenizer: Any, sequences: Sequence[EditRequest]) -> tuple[list[EditRequest], list[int]] | None:
        text = self.config.text
        out = [s if s.target.endswith(text) else replace(s, target=s.target + text)
               for s in sequences]
        return out, list(range(len(sequences)))
