"""Benchmark metrics: hand-computed logits (a bigram "model" whose logits are chosen by hand, for the
metric arithmetic only), then the same code on a tiny real model (padding, greedy equivalence)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ultraedit.core.batching import EditError, EditRequest, tokenize_pair
from ultraedit.evaluation import (
    perplexity,
    MetricTotals,
    agreement,
    greedy_decode,
    length_batches,
    score_pairs,
    score_requests,
    teacher_forced,
    tokenize_pairs,
)

from tiny import VOCAB, tiny_model


WORDS = ["[PAD]", "[UNK]", "a", "b", "c", "d", "e", "f"]
ID = {w: i for i, w in enumerate(WORDS)}


def word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


class BigramLM(nn.Module):
    """Logits at a position depend only on that position's token: ``logits[t] = table[token_t]``.
    Stands in for a model ONLY so the metrics can be checked against hand-computed values."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.embed = nn.Embedding(table.shape[0], table.shape[1])
        self.embed.weight.data.copy_(table)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.embed(input_ids))


def bigram(best: dict[str, str], second: dict[str, str]) -> BigramLM:
    table = torch.zeros(len(WORDS), len(WORDS))
    for src, dst in best.items():
        table[ID[src], ID[dst]] = 2.0
    for src, dst in second.items():
        table[ID[src], ID[dst]] = 1.0
    return BigramLM(table)


NEXT = {"a": "b", "b": "c", "c": "e", "d": "f", "e": "f", "f": "a"}
RUNNER_UP = {"c": "d", "a": "c"}

PAIRS = [
    ("a b", "c d"),      # inputs a b c -> predictions c e vs labels c d: 1/2
    ("a", "b c e"),      # predictions b c e: all right
    ("d", "a"),          # prediction f: wrong
    ("a b c d e", "f"),  # prediction after e is f: right
]
EXPECTED_ACC = [0.5, 1.0, 0.0, 1.0]
EXPECTED_EXACT = [0.0, 1.0, 0.0, 1.0]


def expected_logprob() -> list[float]:
    def row_logz(src: str) -> float:
        ones = 1 if src in RUNNER_UP else 0
        return math.log(math.exp(2) + ones * math.exp(1) + (len(WORDS) - 1 - ones))

    def score(src: str, dst: str) -> float:
        v = 2.0 if NEXT.get(src) == dst else (1.0 if RUNNER_UP.get(src) == dst else 0.0)
        return v - row_logz(src)

    return [
        score("b", "c") + score("c", "d"),
        score("a", "b") + score("b", "c") + score("c", "e"),
        score("d", "a"),
        score("e", "f"),
    ]


def test_teacher_forced_on_hand_computed_logits():
    model, tok = bigram(NEXT, RUNNER_UP), word_tokenizer(WORDS)
    assert tokenize_pair(tok, "a b", "c d") == ([ID["a"], ID["b"], ID["c"]], [-100, ID["c"], ID["d"]])
    for batch_size, max_tokens in [(64, None), (1, None), (2, 8), (3, 1)]:
        scores = teacher_forced(model, tok, PAIRS, batch_size=batch_size, max_tokens=max_tokens)
        assert scores.accuracy == EXPECTED_ACC
        assert scores.exact == EXPECTED_EXACT
        assert scores.predictions == [
            (ID["c"], ID["e"]), (ID["b"], ID["c"], ID["e"]), (ID["f"],), (ID["f"],),
        ]
        assert scores.logprob == pytest.approx(expected_logprob(), abs=1e-5)
    # the original scorer agrees
    old = score_pairs(model, tok, PAIRS)
    assert old["accuracy"] == EXPECTED_ACC and old["logprob"] == pytest.approx(expected_logprob(), abs=1e-5)


def test_exact_match_is_greedy_decoding_on_hand_computed_logits():
    model, tok = bigram(NEXT, RUNNER_UP), word_tokenizer(WORDS)
    for (prompt, answer), exact in zip(PAIRS, EXPECTED_EXACT):
        answer_ids = tok(" " + answer, add_special_tokens=False)["input_ids"]
        assert (greedy_decode(model, tok, prompt, len(answer_ids)) == answer_ids) == bool(exact)


def test_locality_agreement_with_the_unedited_model():
    tok = word_tokenizer(WORDS)
    before = bigram(NEXT, RUNNER_UP)
    after = bigram({**NEXT, "c": "d"}, RUNNER_UP)  # the "edit" changes what follows c
    requests = [
        EditRequest("a", "b", rephrases=("f", "d e"), locality=(("a b", "c d"), ("d", "a"))),
        EditRequest("b", "c", locality=(("a", "b c e"),)),
        EditRequest("e", "f"),
    ]
    ref = score_requests(before, tok, requests)
    assert ref.locality_predictions == [
        ((ID["c"], ID["e"]), (ID["f"],)), ((ID["b"], ID["c"], ID["e"]),), (),
    ]
    scores = score_requests(after, tok, requests, reference=ref.locality_predictions, batch_size=2)
    # request 0: pair 1 predictions c d vs c e -> 1/2, pair 2 -> 1; request 1: b c d vs b c e -> 2/3
    assert scores.locality_agreement[2] is None
    assert scores.locality_agreement[:2] == pytest.approx([0.75, 2 / 3])
    # token accuracy after the edit: a->b right; rephrases f->a (label b) wrong, "d e"->f (label b) wrong
    assert scores.accuracy["efficacy"] == [1.0, 1.0, 1.0]
    assert scores.accuracy["generalization"] == [0.0, None, None]
    # locality answers as the dataset gives them: "a b"->"c d" is now right (c, d), "d"->"a" wrong
    assert scores.accuracy["specificity"][:2] == pytest.approx([(1.0 + 0.0) / 2, 2 / 3])
    assert scores.accuracy["specificity"][2] is None
    assert scores.exact["specificity"] == [0.5, 0.0, None]

    totals = MetricTotals()
    totals.add(scores)
    means = totals.means()
    assert means["efficacy"] == 1.0
    assert means["generalization"] == 0.0 and totals.counts["generalization"] == 1
    assert means["specificity"] == pytest.approx((0.5 + 2 / 3) / 2) and totals.counts["specificity"] == 2
    assert means["locality_vs_unedited"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert "personas" not in means
    with pytest.raises(ValueError, match="reference has 1 entries for 3 requests"):
        score_requests(after, tok, requests, reference=ref.locality_predictions[:1])


def test_wikibigedit_extra_groups_are_scored():
    tok = word_tokenizer(WORDS)
    model = bigram(NEXT, RUNNER_UP)
    request = EditRequest("a", "b", extra={"personas": (("a", "b c"),), "mhop": (("d", "a"), ("e", "f"))})
    scores = score_requests(model, tok, [request])
    assert scores.accuracy["personas"] == [1.0]
    assert scores.accuracy["multi_hop"] == [0.5]
    assert scores.exact["multi_hop"] == [0.5]


def test_agreement_and_batches():
    assert agreement([1, 2, 3], [1, 5, 3]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        agreement([1], [1, 2])
    assert length_batches([3, 9, 1, 9, 4], 2) == [[1, 3], [4, 0], [2]]
    assert length_batches([3, 9, 1, 9, 4], 10, max_tokens=20) == [[1, 3], [4, 0, 2]]
    assert length_batches([50, 2], 10, max_tokens=20) == [[0], [1]]  # a long one gets its own batch


def test_tokenize_pairs_matches_tokenize_pair_and_reports_empties():
    tok = word_tokenizer(WORDS)
    pairs = [("a b", "c d"), ("e", "f a b"), ("d", "zzz")]
    assert tokenize_pairs(tok, pairs) == [tokenize_pair(tok, p, a) for p, a in pairs]
    with pytest.raises(EditError, match="pair 1: answer ' ' tokenizes to no tokens"):
        tokenize_pairs(tok, [("a", "b"), ("a", " ")])


# ----------------------------------------------------------------------------- a real (tiny) model
def _tiny_words():
    return ["[PAD]", "[UNK]"] + [f"w{i}" for i in range(2, VOCAB)]


def test_batched_padded_scores_equal_one_pair_at_a_time():
    model = tiny_model("llama", seed=3)
    tok = word_tokenizer(_tiny_words())
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(12):
        p = torch.randint(2, VOCAB, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
        a = torch.randint(2, VOCAB, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen).tolist()
        pairs.append((" ".join(f"w{i}" for i in p), " ".join(f"w{i}" for i in a)))
    together = teacher_forced(model, tok, pairs, batch_size=64)
    alone = teacher_forced(model, tok, pairs, batch_size=1)
    assert together.accuracy == alone.accuracy
    assert together.predictions == alone.predictions
    assert together.logprob == pytest.approx(alone.logprob, abs=1e-4)
    assert together.accuracy == pytest.approx(score_pairs(model, tok, pairs)["accuracy"])


def test_exact_match_equals_literal_greedy_decoding_on_a_real_model():
    model = tiny_model("llama", seed=5)
    tok = word_tokenizer(_tiny_words())
    gen = torch.Generator().manual_seed(1)
    cases = []  # (prompt, answer, expected exact, expected accuracy)
    for _ in range(8):
        prompt = " ".join(f"w{i}" for i in torch.randint(2, VOCAB, (5,), generator=gen).tolist())
        own = greedy_decode(model, tok, prompt, 3)
        if min(own) < 2:  # a special token cannot be written as answer text
            continue
        words = [f"w{i}" for i in own]
        wrong_last = f"w{2 + (own[2] - 1) % (VOCAB - 2)}"
        wrong_first = f"w{2 + (own[0] - 1) % (VOCAB - 2)}"
        cases.append((prompt, " ".join(words), 1.0, 1.0))
        cases.append((prompt, " ".join(words[:2] + [wrong_last]), 0.0, 2 / 3))
        cases.append((prompt, " ".join([wrong_first] + words[1:]), 0.0, None))
    assert len(cases) >= 12
    scores = teacher_forced(model, tok, [(p, a) for p, a, _, _ in cases], batch_size=5)
    for (prompt, answer, exact, acc), got_exact, got_acc in zip(cases, scores.exact, scores.accuracy):
        ids = tok(" " + answer, add_special_tokens=False)["input_ids"]
        assert got_exact == exact == float(greedy_decode(model, tok, prompt, len(ids)) == ids)
        if acc is not None:
            assert got_acc == pytest.approx(acc)


def test_retention_counts_only_locality_tokens_the_unedited_model_got_right():
    tok = word_tokenizer(WORDS)
    before = bigram(NEXT, RUNNER_UP)
    after = bigram({**NEXT, "c": "d"}, RUNNER_UP)
    requests = [
        EditRequest("a", "b", locality=(("a b", "c d"), ("d", "a"))),  # before: c right, e/d wrong; f/a wrong
        EditRequest("b", "c", locality=(("a", "b c e"),)),  # before: b c e all right; after: b c d
        EditRequest("e", "f"),
    ]
    ref = score_requests(before, tok, requests).locality_predictions
    scores = score_requests(after, tok, requests, reference=ref)
    assert scores.locality_known == [1, 3, 0]
    assert scores.locality_kept == [1, 2, 0]
    totals = MetricTotals()
    totals.add(scores)
    assert totals.means()["retention"] == pytest.approx(3 / 4)


def test_perplexity_is_exp_of_the_mean_token_nll():
    tok = word_tokenizer(WORDS)
    model = bigram(NEXT, RUNNER_UP)
    lines = ["a b c", "d e"]
    logp = torch.log_softmax(model.embed.weight.detach(), -1)
    nll = [-float(logp[ID[x], ID[y]]) for line in lines for x, y in zip(line.split(), line.split()[1:])]
    # one sequence per line: no cross-line tokens
    assert perplexity(model, tok, lines, lines_per_sequence=1) == pytest.approx(math.exp(float(sum(nll)) / len(nll)))
