"""Running a model from one decoder layer on: :class:`Tail` keeps a batch's hidden states at one
layer and runs only the layers above it.

An optimisation of the residual stream at a layer (MEMIT's ``z``, the subject stage's search, the
baselines' training loops) changes nothing below that layer, so each of
its steps needs the layers above it only: one forward to the layer, then as many partial
forwards as steps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .anatomy import decoder_layers, final_norm
from .batching import IGNORE


class StopForward(Exception):
    """Raised by a hook to end a forward pass once what it needs is captured."""


def run_until(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *handles: Any) -> None:
    """Run ``model`` until a hook raises :class:`StopForward` (or to the end); then remove ``handles``."""
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()


class Tail:
    """Run ``model`` from decoder layer ``start`` on, for many optimisation steps of one batch.

    :meth:`__init__` runs the model once without gradients up to layer ``start`` and keeps that
    layer's input hidden states (:attr:`hidden`, ``(B, T, hidden)``) and call arguments (rotary
    embeddings, masks); :meth:`target_logits` then runs layers ``start..`` + final norm + LM head
    (only at the label positions) from any hidden states. Everything below ``start`` must stay
    unchanged while the Tail is used. ``start`` = the layer count: from the final norm's input.
    """

    def __init__(self, model: nn.Module, start: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor) -> None:
        self.model = model
        _, self.layers = decoder_layers(model)
        self.start = start
        self.norm = final_norm(model)
        self.head = model.get_output_embeddings()
        self.mask = labels != IGNORE
        self.labels = labels[self.mask]
        self.hidden, self.kwargs = self._capture(input_ids, attention_mask)

    def subset(self, rows: torch.Tensor) -> Tail:
        """The same Tail restricted to sequences ``rows`` (a 1-D index): hidden states, labels and
        every call argument batched over sequences are indexed; shared ones (rotary tables) kept."""
        n = self.hidden.shape[0]
        part = object.__new__(Tail)
        part.model, part.layers, part.start, part.norm, part.head = self.model, self.layers, self.start, self.norm, self.head
        part.mask = self.mask[rows]
        part.labels = self.labels_of(rows)
        part.hidden = self.hidden[rows]
        part.kwargs = {k: _rows_of(v, rows, n) for k, v in self.kwargs.items()}
        return part

    def labels_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The flat label tokens of sequences ``rows``, in label order."""
        owner = self.mask.nonzero()[:, 0]
        return self.labels[torch.isin(owner, rows.to(owner.device))]

    @torch.no_grad()
    def _capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        saved: dict[str, Any] = {}
        if self.start >= len(self.layers):  # start after the last layer: the final norm's input
            def grab_norm(module: nn.Module, args: tuple) -> None:
                saved["hidden"] = args[0]
                raise StopForward

            run_until(self.model, input_ids, attention_mask, self.norm.register_forward_pre_hook(grab_norm))
            return saved["hidden"], {}

        def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
            saved["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            saved["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise StopForward

        handle = self.layers[self.start].register_forward_pre_hook(grab, with_kwargs=True)
        run_until(self.model, input_ids, attention_mask, handle)
        return saved["hidden"], saved["kwargs"]

    def target_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits at the label positions, ``(n_targets, vocab)`` float32, from layer ``start``'s input."""
        h = hidden
        for layer in self.layers[self.start:]:
            out = layer(h, **self.kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return self.head(self.norm(h[self.mask.to(h.device)])).float()

    def token_nll(self, hidden: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every label token, flat in label order."""
        logits = self.target_logits(hidden)
        return F.cross_entropy(logits, self.labels.to(logits.device), reduction="none")

    def per_row(self, values: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        """Flat per-token values -> one value per sequence (mean or sum over its label tokens)."""
        mask = self.mask.to(values.device)
        rows = mask.nonzero()[:, 0]
        total = torch.zeros(mask.shape[0], dtype=values.dtype, device=values.device).index_add_(0, rows, values)
        return total / mask.sum(1).clamp(min=1) if reduce == "mean" else total


def _rows_of(value: Any, rows: torch.Tensor, n: int) -> Any:
    """``value`` indexed by sequence when it is batched over the ``n`` sequences (tensors, tuples of them)."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() > 0 and value.shape[0] == n and n > 1 else value
    if isinstance(value, tuple):
        return tuple(_rows_of(v, rows, n) for v in value)
    return value
