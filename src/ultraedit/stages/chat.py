"""Edits that reach the chat template (``EditConfig.chat``).

UltraEdit writes an edit at the positions of ``prompt + " " + target``. An instruct model is asked
through its chat template: the same question sits inside a user turn, after a system prompt, and
the answer opens the assistant turn. Those keys differ from the bare prompt's, and an edit made
only on the bare prompt barely shows there (SmolLM2-135M-Instruct, ZsRE: teacher-forced ES 0.88,
the target in the chat reply 0.14). With this stage each sequence of a turn (the request, and
whatever a stage derived from it, such as the model's own rewordings) is also edited through the
template: the prompt as the user turn, the target as the start of the assistant turn, and with
``end`` the template's end of turn after it (the reply is then the answer alone, but the turn end
taught after the answers also ends unrelated replies early: off by default, see
docs/research-log.md).

Every reply of the template starts at the same few tokens (the assistant turn's opening), so the
keys there share a large common part, and a shift fitted to the edited replies moves every reply
(measured: 50 edits through the template change the reply to 94% of unrelated questions). The
stage therefore also adds, with ``weight``, the second moment ``C`` of the keys of unrelated
conversations through the template (each line of the package's generic text a user turn, the next
line the reply: system prompt, turn markers, both turns and the end of turn) to the ridge, as the
generic stage does for ordinary text:

    dW = (K^T K + lambda I + ... + weight C)^-1 K^T V

A tokenizer without a chat template leaves the stage idle (it says so in the turn's report).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..contexts import end_of_answer, has_chat_template, prompt_ids, render
from ..core.batching import RENDERED, EditRequest, is_rendered, pad_id_of
from ..texts import package_text, right_padded
from .base import Stage, Turn, positive
from .common import key_grams


@dataclass
class ChatConfig:
    """``plain``: keep editing each sequence as written too (``False``: only through the template);
    ``end``: teach the end of turn after the target in the template; ``weight``: of the unrelated
    replies' keys ``C`` in the ridge (0: none)."""

    plain: bool = True
    end: bool = False
    weight: float = 1000.0

    def __post_init__(self) -> None:
        positive("chat", "weight", self.weight, zero=True)
        for name in ("plain", "end"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EditConfig.chat.{name} must be true or false, got {getattr(self, name)!r}")


class ChatStage(Stage):
    """Each text sequence of a turn is also (or only) edited through the tokenizer's chat template."""

    name = "chat"

    def __init__(self, config: ChatConfig) -> None:
        super().__init__(config)
        self.idle = False
        self.moments: dict[str, torch.Tensor] | None = None

    def setup(self, model: nn.Module, tokenizer: Any, modules: dict[str, nn.Module], dtype: torch.dtype) -> None:
        """``C`` on the unedited model: keys at every token of short conversations through the template."""
        if tokenizer is None or not has_chat_template(tokenizer) or self.config.weight <= 0:
            return
        sums, count = key_grams(model, modules, conversation_batches(tokenizer, package_text("generic.txt")), dtype)
        self.moments = {n: (sums[n] / count).to(modules[n].weight.device) for n in modules}

    def ridge(self, turn: Turn, group: list[str]) -> torch.Tensor | None:
        if self.moments is None:
            return None
        return self.config.weight * torch.stack([self.moments[n] for n in group]).to(turn.dtype)

    def contexts(self, tokenizer: Any, sequences: Sequence[EditRequest]) -> tuple[list[EditRequest], list[int]] | None:
        """``(sequences, source)``: what the turn edits instead of ``sequences`` (each from ``sequences[source[j]]``)."""
        self.idle = not has_chat_template(tokenizer)
        if self.idle:
            return None
        end = end_of_answer(tokenizer, "chat") if self.config.end else ""
        out, source = [], []
        if self.config.plain:
            out, source = list(sequences), list(range(len(sequences)))
        for index, request in enumerate(sequences):
            if is_rendered(request):
                continue
            extra = {**(request.extra or {}), RENDERED: True}
            out.append(EditRequest(render(tokenizer, request.prompt, "chat"), request.target + end, id=request.id,
                                   extra=extra))
            source.append(index)
        return out, source

    def report(self, turn: Any) -> Any:
        return {"idle": "the tokenizer has no chat template"} if self.idle else None


def conversation_batches(tokenizer: Any, lines: Sequence[str], batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of conversations through the chat template, each line of ``lines`` a user
    turn answered by the next line, ``positions`` marking every real token (system prompt, turn
    markers, both turns and the end of turn: every key a reply reads or is written at)."""
    encoded = []
    for i, line in enumerate(lines):
        chat = [{"role": "user", "content": line}, {"role": "assistant", "content": lines[(i + 1) % len(lines)]}]
        encoded.append(list(tokenizer(tokenizer.apply_chat_template(chat, tokenize=False),
                                      add_special_tokens=False)["input_ids"]))
    batches = right_padded(encoded, pad_id_of(tokenizer), batch_size)
    return [dict(b, positions=b["attention_mask"].bool()) for b in batches]
