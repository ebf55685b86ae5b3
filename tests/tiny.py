"""Tiny random models of every supported architecture, built from configs (no downloads), and a
small text tokenizer trained on the fixtures' text."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import transformers as T

FIXTURES = Path(__file__).parent / "fixtures"

VOCAB = 97

ARCHS = ["llama", "qwen2", "mistral", "gptj", "gpt2", "phi3", "gemma3"]


def tiny_config(arch: str, hidden: int = 32, layers: int = 4) -> T.PretrainedConfig:
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    decoder = dict(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, **common,
    )
    if arch == "llama":
        return T.LlamaConfig(**decoder)
    if arch == "qwen2":
        return T.Qwen2Config(**decoder)
    if arch == "mistral":
        return T.MistralConfig(**decoder)
    if arch == "phi3":
        return T.Phi3Config(**decoder)
    if arch == "gemma3":
        return T.Gemma3TextConfig(head_dim=hidden // 4, **decoder)
    if arch == "gptj":
        return T.GPTJConfig(n_embd=hidden, n_layer=layers, n_head=4, rotary_dim=4, n_positions=128, **common)
    if arch == "gpt2":
        return T.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=128, **common)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(arch, **kw))
    return model.to(dtype).eval()


def random_turn(
    seed: int, requests: int = 20, batch_size: int = 10, vocab: int = VOCAB
) -> list[dict[str, torch.Tensor]]:
    """Right-padded minibatches of random prompts (3-8 tokens) and targets (1-3 tokens)."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(requests):
        p = int(torch.randint(3, 9, (1,), generator=gen))
        t = int(torch.randint(1, 4, (1,), generator=gen))
        prompt = torch.randint(3, vocab, (p,), generator=gen).tolist()
        target = torch.randint(3, vocab, (t,), generator=gen).tolist()
        examples.append((prompt + target[:-1], [-100] * (p - 1) + target))
    from ultraedit.core.batching import collate

    return [collate(examples[i : i + batch_size], 0) for i in range(0, requests, batch_size)]


@functools.lru_cache(maxsize=None)
def text_tokenizer():
    """A byte-level BPE tokenizer trained on the fixtures' text (deterministic, no download; one per
    session: treat it as read-only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ultraedit.datasets import read_requests

    texts = []
    for path in sorted(FIXTURES.glob("*.json*")):
        for r in read_requests(path):
            texts += [r.prompt, " " + r.target, *r.rephrases, *(x for p, a in r.locality for x in (p, " " + a))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_text_model(arch: str = "llama", seed: int = 0) -> tuple[torch.nn.Module, object]:
    """``(model, tokenizer)``: a tiny random model over :func:`text_tokenizer`'s vocabulary."""
    tok = text_tokenizer()
    config = tiny_config(arch)
    config.vocab_size = len(tok)
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(config).eval(), tok
