"""Train the testbed model: a tokenizer and a small Llama that know the world's facts.

``ultraedit testbed train --out DIR`` (or :func:`train_testbed`) reproduces the shipped files:

1. generate the world (:func:`ultraedit.testbed.world.generate_world`) and its split;
2. train a byte-level BPE tokenizer on the world's text (all templates), so that every answer is
   one or two tokens (checked: at most three);
3. train a small ``LlamaForCausalLM`` from a seeded random init on every fact with every TRAINED
   template (held-out templates are never seen), loss = cross-entropy of the answer tokens and
   the end-of-sequence token after them. Each step draws a batch of ``(fact, template)`` pairs;
4. evaluate teacher-forced token accuracy (the metric of :mod:`ultraedit.evaluation`) on the
   trained pairs and on the held-out paraphrase pairs;
5. write ``tokenizer.json`` (+ HF tokenizer files), ``config.json``, ``model.safetensors``
   (float16), the world's data files and ``training.json`` (settings, timings, accuracies).

Everything is seeded; on the same torch version and thread count it is bit-for-bit repeatable.
"""

from __future__ import annotations

import json
import math
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..core.batching import collate, teacher_forced_ids
from .world import WorldConfig, generate_world, split_world, write_datasets

__all__ = ["ModelConfig", "TrainConfig", "build_tokenizer", "final_accuracy", "train_testbed"]

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the testbed Llama (see ``transformers.LlamaConfig``)."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 32
    vocab_size: int = 7000


@dataclass(frozen=True)
class TrainConfig:
    """Optimization settings.

    Attributes:
        seed: seed of the init and of the batch order.
        steps: optimizer steps; each step sees ``batch_size`` (fact, trained template) pairs.
        lr, weight_decay, warmup: AdamW with linear warmup then cosine decay to ``lr / 20``.
        threads: torch CPU threads (part of what makes runs repeatable).
        eval_pairs: pairs sampled (seeded) for the accuracy reported during and after training.
        checkpoint: also write the model files at every evaluation (an interrupted run leaves them).
        label_smoothing: of the training cross-entropy; keeps answer logits' margins moderate, as
            in a real LM, instead of growing without bound on memorized facts.
    """

    seed: int = 0
    steps: int = 7000
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 200
    threads: int = 1
    eval_every: int = 500
    eval_pairs: int = 1000
    checkpoint: bool = False
    label_smoothing: float = 0.1
    model: ModelConfig = field(default_factory=ModelConfig)
    world: WorldConfig = field(default_factory=WorldConfig)


def build_tokenizer(lines: list[str], vocab_size: int):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``lines`` (adds ``<s>`` in front)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=64,
        clean_up_tokenization_spaces=False,
    )


def _encode(tokenizer, pairs: list[tuple[str, str]], eos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, labels)`` of shape ``(N, L)``; labels only on answer (+EOS) tokens."""
    prompts = tokenizer([p for p, _ in pairs])["input_ids"]
    answers = tokenizer([" " + a for _, a in pairs], add_special_tokens=False)["input_ids"]
    end = [tokenizer.eos_token_id] if eos else []
    seqs = [teacher_forced_ids(p, a + end, *pair, answer_field="answer") for p, a, pair in zip(prompts, answers, pairs)]
    batch = collate(seqs, tokenizer.pad_token_id)
    return batch["input_ids"], batch["labels"]


def _loss_and_hits(
    model, ids: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean CE over labelled positions, per-position hits, and the label mask.

    Right padding needs no attention mask under causal attention: real tokens never attend to
    the padding after them. The LM head runs only at labelled positions.
    """
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    mask = labels != -100
    logits = model.lm_head(hidden[mask])
    target = labels[mask]
    loss = F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
    return loss, logits.argmax(-1) == target, mask


@torch.no_grad()
def token_accuracy(model, ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 512, answer_only: bool = True) -> float:
    """Mean over pairs of teacher-forced token accuracy (EOS label excluded when ``answer_only``)."""
    model.eval()
    scores = []
    for start in range(0, len(ids), batch_size):
        i, l = ids[start : start + batch_size], labels[start : start + batch_size].clone()
        if answer_only:  # drop the final (EOS) label of each row
            last = (l != -100).long().cumsum(1).argmax(1)
            l[torch.arange(len(l)), last] = -100
        _, hits, mask = _loss_and_hits(model, i, l)
        per_row = torch.zeros(len(i)).index_add_(0, mask.nonzero()[:, 0], hits.float())
        scores.append(per_row / mask.sum(1))
    model.train()
    return float(torch.cat(scores).mean())


def _save(model, tokenizer, out: Path) -> None:
    """Tokenizer files, ``config.json`` and float16 ``model.safetensors`` (the tied LM head is not stored)."""
    from safetensors.torch import save_file

    tokenizer.save_pretrained(out)
    model.config.save_pretrained(out)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def final_accuracy(out_dir: str | Path, world) -> dict[str, float]:
    """Teacher-forced token accuracy of the SAVED (float16) model, with :func:`ultraedit.score_pairs`,
    on every trained ``(prompt, answer)`` pair and every held-out paraphrase pair of ``world``."""
    from ..evaluation import score_pairs
    from . import load_testbed

    model, tokenizer = load_testbed(data_dir=out_dir)
    result = {}
    for key, pairs in (("train_accuracy_all", world.training_pairs()), ("heldout_accuracy_all", world.heldout_pairs())):
        acc = score_pairs(model, tokenizer, pairs, batch_size=512)["accuracy"]
        result[key] = round(sum(acc) / len(acc), 4)
    return result


def train_testbed(out_dir: str | Path, config: TrainConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Generate the world, train tokenizer and model, write everything to ``out_dir``.

    Returns the training summary also written to ``out_dir/training.json`` (seconds, parameter
    count, teacher-forced accuracy on trained pairs and on held-out paraphrase pairs, file sizes).
    """
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    config = config or TrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        world = generate_world(config.world)
        split = split_world(world)
        write_datasets(world, split, out)
        tokenizer = build_tokenizer(list(world.text()), config.model.vocab_size)
        longest = max(len(tokenizer(" " + o, add_special_tokens=False)["input_ids"]) for o in {f.object for f in world.facts})
        if longest > 3:
            raise ValueError(f"an answer of the world tokenizes to {longest} tokens (> 3); raise vocab_size")

        train_pairs = world.training_pairs()
        held_pairs = world.heldout_pairs()
        ids, labels = _encode(tokenizer, train_pairs, eos=True)
        rng = random.Random(config.seed)
        eval_train = sorted(rng.sample(range(len(train_pairs)), min(config.eval_pairs, len(train_pairs))))
        eval_held = sorted(rng.sample(range(len(held_pairs)), min(config.eval_pairs, len(held_pairs))))
        held_ids, held_labels = _encode(tokenizer, [held_pairs[i] for i in eval_held], eos=True)

        torch.manual_seed(config.seed)
        mc = config.model
        llama_config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
            num_hidden_layers=mc.num_hidden_layers, num_attention_heads=mc.num_attention_heads,
            num_key_value_heads=mc.num_attention_heads, max_position_embeddings=mc.max_position_embeddings,
            tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(llama_config)
        model.train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=(0.9, 0.98),
        )

        def lr_at(step: int) -> float:
            if step < config.warmup:
                return config.lr * (step + 1) / config.warmup
            t = (step - config.warmup) / max(1, config.steps - config.warmup)
            return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

        gen = torch.Generator().manual_seed(config.seed)
        history = []
        bar = tqdm(range(config.steps), desc="training testbed model", disable=not progress, unit="step")
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            batch = torch.randint(len(ids), (config.batch_size,), generator=gen)
            b_ids, b_labels = ids[batch], labels[batch]
            width = int((b_labels != -100).nonzero()[:, 1].max()) + 1
            loss, _, _ = _loss_and_hits(model, b_ids[:, :width], b_labels[:, :width], config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                acc = token_accuracy(model, ids[eval_train], labels[eval_train])
                held = token_accuracy(model, held_ids, held_labels)
                history.append({"step": step + 1, "loss": round(loss.item(), 4), "train_acc": round(acc, 4), "heldout_acc": round(held, 4)})
                bar.write(f"step {step + 1}: loss {loss.item():.3f}  train acc {acc:.3f}  held-out acc {held:.3f}")
                if config.checkpoint:
                    _save(model, tokenizer, out)
        seconds = time.perf_counter() - start

        model.eval()
        _save(model, tokenizer, out)
        summary = {
            "train_config": asdict(config),
            "parameters": sum(p.numel() for p in model.parameters()),
            "facts": len(world.facts),
            "edit_requests": len(split.edits),
            "locality_facts": len(split.locality),
            "train_pairs": len(train_pairs),
            "heldout_pairs": len(held_pairs),
            "seconds": round(seconds, 1),
            "history": history,
            "train_accuracy": history[-1]["train_acc"] if history else None,
            "heldout_accuracy": history[-1]["heldout_acc"] if history else None,
            "weights_bytes": (out / "model.safetensors").stat().st_size,
            "torch": torch.__version__,
            "machine": platform.machine(),
        }
        summary.update(final_accuracy(out, world))
        (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    finally:
        torch.set_num_threads(previous_threads)
