"""A tiny model written by ``gguf_util.write_gguf`` loads back through transformers' GGUF path unchanged."""

import pytest
import torch
import transformers as T
from gguf_util import write_gguf

from ultraedit.testbed import data_path

TEXTS = [
    "The capital of France is Paris.",
    "  don't SHOUT: 12345678,hello\t\r\n\nworld ... café 日本 <s></s>",
]


@pytest.fixture(scope="module")
def tokenizer():
    """The testbed's byte-level BPE tokenizer (7,000 tokens), the only real one available offline."""
    return T.PreTrainedTokenizerFast.from_pretrained(str(data_path("tokenizer.json").parent), local_files_only=True)


def random_model(arch: str, tokenizer, tied: bool) -> torch.nn.Module:
    """A random 2-layer model over the tokenizer's vocabulary. Qwen2's attention biases start at
    zero, so they are randomised to show they survive the round trip."""
    config_class = {"llama": T.LlamaConfig, "qwen2": T.Qwen2Config}[arch]
    config = config_class(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).float().eval()
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            torch.nn.init.normal_(param)
    return model


# Tying is handled the same way for every architecture, so one tied case covers it; each case costs
# ~3 s, mostly the GGUF reader parsing the 7,000-token vocabulary.
@pytest.mark.parametrize("arch, tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_round_trip(arch, tied, tokenizer, tmp_path):
    model = random_model(arch, tokenizer, tied)
    path = write_gguf(model, tokenizer, tmp_path / f"{arch}.gguf")

    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    loaded_tokenizer = T.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)

    assert loaded.config.model_type == arch
    assert loaded.config.tie_word_embeddings == tied
    for text in TEXTS:
        assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected, actual = model(**batch).logits, loaded(**batch).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
