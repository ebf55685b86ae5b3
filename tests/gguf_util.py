"""Write a Hugging Face causal LM and its tokenizer to a GGUF file, laid out as llama.cpp's converter
(``convert_hf_to_gguf.py``) would, so tests can load models through transformers' GGUF path
(``from_pretrained(directory, gguf_file=name)``) without downloading a real GGUF.

Tensors are stored as F32, so a model written and read back gives the logits it gave before.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}


def write_gguf(model, tokenizer, path) -> Path:
    """Write ``model`` (a ``llama`` or ``qwen2`` causal LM) and ``tokenizer`` (a byte-level BPE
    fast tokenizer) to the GGUF file ``path``, and return that path."""
    path = Path(path)
    arch = model.config.model_type
    if arch not in ARCHITECTURES:
        raise ValueError(f"cannot write a {arch!r} model to GGUF; supported: {sorted(ARCHITECTURES)}")
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny-{arch}")  # transformers reads a name containing "mistral" as a Mistral model
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_config(writer, model.config)
    _add_tokenizer(writer, tokenizer)
    for name, array in _gguf_tensors(model):
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_config(writer: gguf.GGUFWriter, config) -> None:
    """The model's shape, under the ``{arch}.*`` keys transformers maps back onto a config."""
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    # Qwen2 configs have no `head_dim`; theirs is always the hidden size split over the heads.
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    rope = config.rope_parameters
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope scaling {rope['rope_type']!r} is not written to GGUF here")
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer) -> None:
    """The vocabulary, merges and special tokens under the ``tokenizer.ggml.*`` keys.

    The file has no room for a pre-tokenizer: ``"gpt2"`` tells the reader to split text with GPT-2's
    regex, so only byte-level BPE tokenizers that split that way come back identical.
    """
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE" or (backend["pre_tokenizer"] or {}).get("type") != "ByteLevel":
        raise ValueError("only byte-level BPE tokenizers can be written to GGUF here")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    writer.add_token_types(_token_types(tokenizer))
    # tokenizer.json spells a merge as a pair, or (older files) as one space-separated string, as GGUF does
    merges = backend["model"]["merges"]
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge) for merge in merges])
    for token_id, add in [
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ]:
        if token_id is not None:
            add(token_id)
    # Whether encoding adds BOS/EOS lives in the tokenizer's post-processor, which GGUF keeps as flags.
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id)


def _token_types(tokenizer) -> list[int]:
    """llama.cpp's type of each token: special added tokens are CONTROL (kept whole, skipped when
    decoding), other added tokens USER_DEFINED, the rest NORMAL."""
    types = [gguf.TokenType.NORMAL] * len(tokenizer)
    for token_id, token in tokenizer.added_tokens_decoder.items():
        types[token_id] = gguf.TokenType.CONTROL if token.special else gguf.TokenType.USER_DEFINED
    return types


def _gguf_tensors(model):
    """``(gguf name, float32 array)`` for each weight, named as llama.cpp names them.

    A tied output projection is left out: its absence is how the reader knows it is tied.
    """
    config = model.config
    names = gguf.get_tensor_name_map(ARCHITECTURES[config.model_type], config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        if name == "output.weight" and config.tie_word_embeddings:
            continue
        array = tensor.detach().float().cpu().numpy()
        if config.model_type == "llama":
            array = _permute_rotary(array, name, config)
        yield name, array


def _permute_rotary(array: np.ndarray, name: str, config) -> np.ndarray:
    """llama.cpp's reordering of llama's query and key rows, from HF's rotary layout (first half of
    each head paired with its second half) to interleaved pairs; transformers undoes it on load."""
    if ".attn_q." in name:
        heads = config.num_attention_heads
    elif ".attn_k." in name:
        heads = config.num_key_value_heads
    else:
        return array
    rows = array.shape[0]
    return array.reshape(heads, 2, rows // heads // 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)
