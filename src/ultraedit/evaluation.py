"""Scoring prompt/answer pairs as the authors do: teacher-forced token accuracy.

For one pair, the accuracy is the fraction of answer tokens where ``argmax(logits)`` equals the
label, with the same teacher-forced tokenization as editing (``batching.tokenize_pair``).
Efficacy, generalization and specificity are means of this score over edit prompts, rephrases and
locality prompts. Forwards are batched, sorted by length to keep padding small.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .batching import IGNORE, collate, pad_id_of, tokenize_pair


@torch.no_grad()
def score_pairs(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 64,
) -> dict[str, list[float]]:
    """Teacher-forced scores of ``(prompt, answer)`` pairs.

    Returns:
        ``{"accuracy": [...], "logprob": [...]}`` per pair, in input order: token accuracy in
        [0, 1] and the summed log-probability (nats) of the answer tokens.
    """
    encoded = [tokenize_pair(tokenizer, p, a) for p, a in pairs]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]), reverse=True)
    device = model.get_input_embeddings().weight.device
    accuracy = [0.0] * len(encoded)
    logprob = [0.0] * len(encoded)
    pad = pad_id_of(tokenizer)
    training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            labels = batch["labels"]
            mask = labels != IGNORE
            safe = labels.clamp(min=0)
            logp = torch.log_softmax(logits.float(), -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
            hit = (logits.argmax(-1) == labels) & mask
            counts = mask.sum(1)
            acc = hit.sum(1) / counts
            lp = (logp * mask).sum(1)
            for row, i in enumerate(idx):
                accuracy[i] = float(acc[row])
                logprob[i] = float(lp[row])
    finally:
        model.train(training)
    return {"accuracy": accuracy, "logprob": logprob}
