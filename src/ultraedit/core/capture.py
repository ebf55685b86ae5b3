"""Capture of keys and output gradients at target positions (method page, steps 1-2).

For each minibatch the loss is the mean cross-entropy over its target tokens (``labels != -100``).
For every edit module we record, at the target positions (and, when a minibatch carries
``subject_index``, at each sequence's subject position: the rows the subject stage edits),

* keys  ``K``: the module's input, rows of width ``d_in``;
* grads ``G``: the gradient of the loss w.r.t. the module's output, rows of width ``d_out``.

How it is done without waste:

* No parameter needs a gradient. A forward hook replaces each edit module's output by a detached
  copy that requires grad when it does not already, so the lowest edited module's output is the
  only leaf of the graph: nothing below it is recorded, nothing below it is back-propagated, and
  ``torch.autograd.grad`` asks only for the module outputs (no ``.grad`` is ever written).
* The output embedding (LM head) sees only the hidden states at target positions, so the
  vocabulary projection is computed for the tokens the loss needs and no others.
* Sequences of several minibatches share a padded forward/backward (up to ``forward_batch_size``
  sequences, sorted by length when a turn needs several passes). The loss of a pass is the SUM of
  its sequences' shares of their minibatch's mean loss (weight ``1 / target tokens of the
  minibatch`` per token), so every target token's gradient is exactly what one pass per minibatch
  gives; key rows are returned per minibatch, in the original order.
* Prefix/tail split. In a causal LM the output of a module at position ``t`` influences only
  positions ``>= t``, so the gradients wanted (at target positions) flow back only through the
  positions from each sequence's first target on. The tokens before it (the prompt, minus its last
  token) are therefore run once without autograd, keeping their keys/values in a KV cache, and only
  each sequence's tail (first target position to its end) is run with autograd on top of that
  cache. Same numbers; the backward pass shrinks to the tail tokens (about 1/5 of a typical edit
  request's tokens). Used whenever every sequence is right-padded and has a non-empty prefix.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .anatomy import cache_kwarg, frozen
from .batching import IGNORE, SUBJECT_INDEX


def key_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B, L)`` bool: the positions whose keys and gradients a turn captures. The target
    positions (``labels != -100``), plus, where a batch has ``subject_index`` (``(B,)``, -1 for
    none), each sequence's subject position (the subject stage)."""
    mask = batch["labels"] != IGNORE
    subject = batch.get(SUBJECT_INDEX)
    if subject is None:
        return mask
    columns = torch.arange(mask.shape[1], device=mask.device)
    return mask | (columns == subject.to(mask.device)[:, None])


@dataclass
class MinibatchCapture:
    """Rows captured for one minibatch: ``keys[name]`` is ``(rows, d_in)``, ``grads[name]`` ``(rows, d_out)``.
    Rows are the target tokens, plus each sequence's subject position when the minibatch has a
    ``subject_index`` (:func:`key_mask`; ``subject``, ``(rows,)`` bool, marks those rows), in
    sequence order, positions in order. ``hits`` (``(targets,)`` bool) says where the argmax
    already is the target token, ``probs`` (``(targets,)``) the probability of the target token."""

    keys: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    rows: int
    loss: float
    hits: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    subject: torch.Tensor | None = None


def _row_extent(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Per row of a minibatch: length (last attended column + 1), first captured column (a target
    or the subject position, :func:`key_mask`), and whether every row is right-padded (attended
    columns exactly ``0 .. length-1``)."""
    attention = batch["attention_mask"]
    columns = torch.arange(attention.shape[1], device=attention.device)
    length = torch.where(attention != 0, columns + 1, 0).max(1).values
    first = torch.where(key_mask(batch), columns, attention.shape[1]).min(1).values
    right_padded = bool((attention.bool() == (columns < length[:, None])).all())
    return length, first, right_padded


def plan_passes(prefix: Sequence[int], tail: Sequence[int], max_rows: int) -> list[list[int]]:
    """Sequences cut into forward passes of at most ``max_rows``, sorted by (prefix, tail) length so
    that sequences of similar length share a pass. They are independent, so any grouping gives the same
    gradients. (Measured on CPU: many small padding-saving passes were 1.2-1.5x slower than one
    100-row pass -- per-layer overhead and smaller matmuls; on a GPU weight reads dominate.)"""
    order = sorted(range(len(prefix)), key=lambda i: (prefix[i], tail[i]))
    return [order[start : start + max_rows] for start in range(0, len(order), max_rows)]


class TargetHead:
    """While active, the model's LM head (output embeddings) sees only the hidden states at
    ``self.mask`` positions, so ``model(...).logits`` is ``(mask.sum(), vocab)`` instead of
    ``(B, L, vocab)``: the vocabulary projection costs only the tokens that are scored.

    Set ``mask`` (``(B, L)`` bool) before each forward; ``None`` leaves the head alone. Callers
    must accept 3-D logits too (a model whose head is not its output embedding module)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.mask: torch.Tensor | None = None
        self.handle: torch.utils.hooks.RemovableHandle | None = None

    def __enter__(self) -> "TargetHead":
        getter = getattr(self.model, "get_output_embeddings", None)  # absent on plain nn.Modules
        head = getter() if getter is not None else None
        if head is not None:
            self.handle = head.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def _hook(self, module: nn.Module, args: tuple):
        hidden = args[0]
        if self.mask is not None and hidden.ndim == 3 and hidden.shape[:2] == self.mask.shape:
            return (hidden[self.mask.to(hidden.device)],) + tuple(args[1:])
        return None


class PackedMLPs:
    """While active, every transformer block's MLP (a module named ``mlp``: position-wise in every
    supported family) runs on the real tokens only: its input ``(B, L, d)`` is packed to
    ``(valid.sum(), d)`` and its output scattered back, zeros at padding. Padding positions are
    never attended to by real ones, so real tokens' results are unchanged; the MLP's FLOPs (most
    of a layer's) stop being spent on padding. Set ``valid`` before each forward; ``None``
    leaves the MLPs alone. Edit modules inside an MLP then see 2-D ``(tokens, d_in)`` inputs."""

    def __init__(self, model: nn.Module) -> None:
        self.mlps = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "mlp"]
        self.valid: torch.Tensor | None = None
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self._shapes: list[torch.Size | None] = []  # per MLP call in flight: the shape to scatter to

    def __enter__(self) -> "PackedMLPs":
        try:
            for mlp in self.mlps:
                self.handles.append(mlp.register_forward_pre_hook(self._pack))
                self.handles.append(mlp.register_forward_hook(self._unpack))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._shapes.clear()

    def packed(self, mask: torch.Tensor) -> torch.Tensor:
        """``mask`` (``(B, L)``) restricted to the valid tokens, in their packed (row-major) order."""
        return mask[self.valid.to(mask.device)]

    def _pack(self, module: nn.Module, args: tuple):
        x = args[0] if args else None
        if self.valid is None or x is None or x.ndim != 3 or x.shape[:2] != self.valid.shape:
            self._shapes.append(None)
            return None
        self._shapes.append(x.shape[:2])
        return (x[self.valid.to(x.device)],) + tuple(args[1:])

    def _unpack(self, module: nn.Module, args: tuple, output: torch.Tensor):
        shape = self._shapes.pop()
        if shape is None:
            return None
        valid = self.valid.to(output.device)
        return output.new_zeros((*shape, output.shape[-1])).masked_scatter(valid[..., None], output)


class _Hooks:
    """Forward hooks that record keys at target positions and expose module outputs as grad leaves."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module]) -> None:
        self.model = model
        self.modules = modules
        self.mask: torch.Tensor | None = None
        self.head = TargetHead(model)
        self.active = True
        self.keys: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.key_masks: dict[str, torch.Tensor] = {}  # the mask each module's key rows were taken with
        self.packer = PackedMLPs(model)
        self._stack = ExitStack()

    def __enter__(self) -> "_Hooks":
        # Every hook is registered on the stack as soon as it exists: a failure while registering a
        # later one removes all earlier ones, so no hook is ever left on the model.
        with ExitStack() as stack:
            for name, module in self.modules.items():
                stack.callback(module.register_forward_hook(self._module_hook(name)).remove)
            stack.enter_context(self.head)
            stack.enter_context(self.packer)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self.keys.clear()
        self.outputs.clear()
        self.key_masks.clear()

    def _module_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not self.active:
                return None
            if name in self.outputs:
                raise RuntimeError(f"edit module {name!r} ran twice in one forward pass; shared modules cannot be edited")
            # Inside a packed MLP the input is (real tokens, d_in): select with the packed mask.
            mask = self.mask if args[0].ndim > 2 or self.packer.valid is None else self.packer.packed(self.mask)
            mask = mask.to(args[0].device)
            self.keys[name] = args[0][mask].detach().float()
            self.key_masks[name] = mask
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            self.outputs[name] = output
            return output

        return hook

    def reset(
        self, mask: torch.Tensor, active: bool = True, valid: torch.Tensor | None = None,
        head: torch.Tensor | None = None,
    ) -> None:
        """Next forward: keys are taken at ``mask`` positions, the head sees only ``head``
        positions (default ``mask``); modules are captured if ``active``; MLPs compute only the
        ``valid`` (``(B, L)`` bool: real, not padding) tokens."""
        self.mask = mask
        self.head.mask = mask if head is None else head
        self.packer.valid = valid
        self.active = active
        self.keys.clear()
        self.outputs.clear()
        self.key_masks.clear()


def _split(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Prefix (before each row's first captured position) and tail (from there to the end) of a batch.

    Returns ``None`` when the split does not apply: a row not right-padded, or a row whose first
    captured position is 0 (empty prefix).
    """
    lengths, first, right_padded = _row_extent(batch)
    if not right_padded or bool((first == 0).any()):
        return None
    attention, labels = batch["attention_mask"], batch["labels"]
    prefix_len, tail_len = int(first.max()), int((lengths - first).max())
    prefix_cols = torch.arange(prefix_len, device=attention.device)
    tail_cols = torch.arange(tail_len, device=attention.device)
    prefix_mask = prefix_cols < first[:, None]
    tail_mask = tail_cols < (lengths - first)[:, None]
    index = (first[:, None] + tail_cols).clamp(max=attention.shape[1] - 1)

    def tail(t: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.where(tail_mask, t.gather(1, index), fill)

    return {
        "prefix_ids": torch.where(prefix_mask, batch["input_ids"][:, :prefix_len], 0),
        "prefix_mask": prefix_mask.long(),
        "tail_ids": tail(batch["input_ids"], 0),
        "tail_labels": tail(labels, IGNORE),
        "tail_keys": tail(key_mask(batch).long(), 0) != 0,
        "attention_mask": torch.cat((prefix_mask, tail_mask), 1).long(),
        "position_ids": first[:, None] + tail_cols,
    }


def _target_logits(model: nn.Module, hooks: "_Hooks", batch: dict[str, torch.Tensor], split: bool):
    """Logits at target positions ``(T, vocab)`` (float32) and their labels ``(T,)``, capturing
    keys (at :func:`key_mask` positions) and leaf outputs on the way; also the ``(B, L)`` target
    ``mask`` and key mask of the pass that was captured (their row sums are the rows' target and
    key counts; gradients are gathered with each module's ``hooks.key_masks`` entry, which is
    packed inside an MLP)."""
    parts = _split(batch) if split else None
    if parts is None:
        mask, keys_at = batch["labels"] != IGNORE, key_mask(batch)
        hooks.reset(keys_at, valid=batch["attention_mask"] != 0, head=mask)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        labels = batch["labels"][mask]
    else:
        prefix_valid = parts["prefix_mask"] != 0
        hooks.reset(torch.zeros_like(prefix_valid), active=False, valid=prefix_valid)
        with torch.no_grad():
            prefix = model(input_ids=parts["prefix_ids"], attention_mask=parts["prefix_mask"], use_cache=True)
        mask, keys_at = parts["tail_labels"] != IGNORE, parts["tail_keys"]
        hooks.reset(keys_at, valid=parts["attention_mask"][:, prefix_valid.shape[1]:] != 0, head=mask)
        out = model(
            input_ids=parts["tail_ids"], attention_mask=parts["attention_mask"], position_ids=parts["position_ids"],
            use_cache=True, **cache_kwarg(model, prefix),
        )
        labels = parts["tail_labels"][mask]
    logits = out.logits
    if logits.ndim == 3:  # the model bypassed the head hook: select target positions here
        logits = logits[mask.to(logits.device)]
    if logits.shape[0] != labels.shape[0]:
        raise RuntimeError(f"unexpected logits shape {tuple(logits.shape)} for {labels.shape[0]} target tokens")
    # A model split over devices returns logits from its last device: labels go where they are.
    return logits.float(), labels.to(logits.device), mask, keys_at


def capture(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    forward_batch_size: int | None = None,
    split_prefix: bool = True,
) -> list[MinibatchCapture]:
    """Run the turn's minibatches through the model and return keys/grads per minibatch, in order.

    Args:
        model: a Hugging Face causal LM (its weights are not changed; every parameter's
            ``requires_grad`` and the train/eval mode are restored on return).
        modules: edit modules by dotted name (``nn.Linear`` or GPT-2 ``Conv1D``).
        batches: minibatches of ``(B, L)`` ``input_ids``/``attention_mask``/``labels`` on the
            model's device, right-padded.
        forward_batch_size: most sequences per forward/backward; ``None`` puts all in one. Rows
            of different minibatches may share a pass (sorted by length to cut padding); each
            row's gradient is the same whatever it shares a pass with.
        split_prefix: run the tokens before each sequence's first target without autograd (KV
            cache) and back-propagate through the tails only; same results, less work.

    Returns:
        One :class:`MinibatchCapture` per input minibatch; keys and grads in float32.
    """
    names = list(modules)
    # Flatten the turn into sequences (trimmed to their length), numbered in minibatch order.
    sequences: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    subjects: list[int] = []  # per sequence: its subject position, -1 for none
    prefix: list[int] = []
    tail: list[int] = []
    row_weight: list[float] = []  # per sequence: 1 / (target tokens of its minibatch)
    sizes: list[int] = []  # target tokens per minibatch
    key_sizes: list[int] = []  # captured key rows per minibatch
    split = split_prefix
    for batch in batches:
        length, first, right_padded = _row_extent(batch)
        split = split and right_padded and bool((first > 0).all())
        targets = int((batch["labels"] != IGNORE).sum())
        sizes.append(targets)
        key_sizes.append(int(key_mask(batch).sum()))
        subject = batch.get(SUBJECT_INDEX)
        for r, (n, f) in enumerate(zip(length.tolist(), first.tolist())):
            sequences.append((batch["input_ids"][r, :n], batch["attention_mask"][r, :n], batch["labels"][r, :n]))
            subjects.append(int(subject[r]) if subject is not None else -1)
            prefix.append(f)
            tail.append(n - f)
            row_weight.append(1.0 / targets)
    if not split:
        prefix, tail = [0] * len(sequences), [p + t for p, t in zip(prefix, tail)]
    passes = plan_passes(prefix, tail, forward_batch_size or len(sequences))
    with_subjects = any(s >= 0 for s in subjects)

    keys: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    key_row: list[torch.Tensor] = []  # per key row: the sequence it belongs to
    key_subject: list[torch.Tensor] = []  # per key row: is it a subject position (not a target)?
    token_row: list[torch.Tensor] = []  # per target token: its sequence
    token_loss: list[torch.Tensor] = []
    token_hits: list[torch.Tensor] = []
    token_probs: list[torch.Tensor] = []
    with frozen(model), torch.enable_grad(), _Hooks(model, modules) as hooks:
        for members in passes:
            width = max(sequences[i][0].shape[0] for i in members)
            batch = {
                key: torch.stack([F.pad(sequences[i][k], (0, width - sequences[i][k].shape[0]), value=fill) for i in members])
                for k, (key, fill) in enumerate((("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE)))
            }
            if with_subjects:
                batch[SUBJECT_INDEX] = torch.tensor([subjects[i] for i in members], device=batch["labels"].device)
            logits, labels, mask, keys_at = _target_logits(model, hooks, batch, split)
            missing = [n for n in names if n not in hooks.outputs]
            if missing:
                raise RuntimeError(f"edit modules {missing} did not run in the forward pass")
            # Weight 1/t_j per token makes the loss the SUM of per-minibatch mean losses. Built on the
            # logits' device (the last one of a model split over devices), like the labels.
            device = logits.device
            per_row = mask.sum(1).to(device)
            weights = torch.tensor([row_weight[i] for i in members], device=device).repeat_interleave(per_row)
            token_ce = F.cross_entropy(logits, labels, reduction="none")
            ce = token_ce * weights
            out_grads = torch.autograd.grad(
                ce.sum(), [hooks.outputs[n] for n in names], allow_unused=True, materialize_grads=True
            )
            for n, g in zip(names, out_grads):
                keys[n].append(hooks.keys[n])
                grads[n].append(g[hooks.key_masks[n].to(g.device)].float())
            members_t = torch.tensor(members, device=device)
            key_row.append(members_t.repeat_interleave(keys_at.sum(1).to(device)))
            key_subject.append((keys_at & ~mask)[keys_at].to(device))
            token_row.append(members_t.repeat_interleave(per_row))
            token_loss.append(ce.detach())
            token_hits.append(logits.detach().argmax(-1) == labels)
            token_probs.append(torch.exp(-token_ce.detach().float()))
            del logits, ce, token_ce, out_grads

    # Back to the original order (sequences in minibatch order, positions in order), per minibatch.
    key_order = torch.sort(torch.cat(key_row), stable=True).indices
    order = torch.sort(torch.cat(token_row), stable=True).indices
    # (modules may sit on different devices when a model is split across GPUs)
    split_keys = {n: (k := torch.cat(keys[n]))[key_order.to(k.device)].split(key_sizes) for n in names}
    split_grads = {n: (g := torch.cat(grads[n]))[key_order.to(g.device)].split(key_sizes) for n in names}
    subject_rows = torch.cat(key_subject)[key_order].split(key_sizes)
    losses = torch.cat(token_loss)[order].split(sizes)
    hits = torch.cat(token_hits)[order].split(sizes)
    probs = torch.cat(token_probs)[order].split(sizes)
    return [
        MinibatchCapture(
            keys={n: split_keys[n][j] for n in names},
            grads={n: split_grads[n][j] for n in names},
            rows=key_sizes[j],
            loss=float(losses[j].sum()),
            hits=hits[j],
            probs=probs[j],
            subject=subject_rows[j],
        )
        for j in range(len(batches))
    ]


__all__ = ["MinibatchCapture", "key_mask", "PackedMLPs", "TargetHead", "capture", "plan_passes"]
