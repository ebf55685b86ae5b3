"""Step size and ridge from scales measured on the model: the same edit on any weight scale.

A model whose MLP neurons are rescaled (``up_proj`` rows times ``c``, ``down_proj`` columns divided by
``c``) computes the same function as the original. With ``lr_scale="output"`` and
``ridge_scale="keys"``, editing it gives the same model as editing the original (its ``down_proj``
shift is the original's divided by ``c``, column for column); with the shape rule and a fixed ridge
it does not.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_promises import TURNS
from tiny import tiny_text_model

from ultraedit import UltraEditor, configuration
from ultraedit.config import EditConfig

DOWN = [f"model.layers.{i}.mlp.down_proj" for i in (1, 2)]


def rescaled(model: torch.nn.Module, c: float) -> torch.nn.Module:
    """The same function with every MLP neuron's scale moved: up_proj rows * c, down_proj columns / c."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for layer in twin.model.layers:
            layer.mlp.up_proj.weight.mul_(c)
            layer.mlp.down_proj.weight.div_(c)
    return twin


def config(measured: bool) -> EditConfig:
    """The recommended configuration on two down_proj modules (generic text from the package: no
    sampling), with the measured rules or with the shape rule and a fixed ridge."""
    model, _ = tiny_text_model("llama")
    sets = ["generic.text=package"] + ([] if measured else ["lr_scale=width", "ridge_scale=none", "lr=1e-5", "ridge=1"])
    return configuration("recommended", model, modules=DOWN, sets=sets).config


def edited(model: torch.nn.Module, tok, config: EditConfig) -> torch.nn.Module:
    editor = UltraEditor(model, config, tok)
    for turn in TURNS:
        editor.edit(turn)
    return model


@pytest.mark.parametrize("c", [8.0, 0.125])
def test_the_measured_rules_edit_a_rescaled_model_exactly_as_the_original(c):
    model, tok = tiny_text_model("llama")
    twin = rescaled(model, c)
    ids = tok(["The capital of Norway is Oslo"], return_tensors="pt")["input_ids"]
    assert torch.allclose(model(ids).logits, twin(ids).logits, atol=1e-5)  # the same function
    unedited = copy.deepcopy(model)
    edited(model, tok, config(measured=True))
    edited(twin, tok, config(measured=True))
    for name in DOWN:
        shift = (model.get_submodule(name).weight - unedited.get_submodule(name).weight).detach()
        twin_shift = (twin.get_submodule(name).weight - unedited.get_submodule(name).weight / c).detach()
        assert float(shift.norm()) > 0
        assert torch.allclose(twin_shift * c, shift, rtol=1e-3, atol=1e-3 * float(shift.abs().max()))
    assert torch.allclose(model(ids).logits, twin(ids).logits, atol=1e-3)


def test_the_shape_rule_with_a_fixed_ridge_does_not():
    """The control: the same check fails with the rules that ignore the model's scales."""
    model, tok = tiny_text_model("llama")
    twin = rescaled(model, 8.0)
    unedited = copy.deepcopy(model)
    edited(model, tok, config(measured=False))
    edited(twin, tok, config(measured=False))
    name = DOWN[0]
    shift = (model.get_submodule(name).weight - unedited.get_submodule(name).weight).detach()
    twin_shift = (twin.get_submodule(name).weight - unedited.get_submodule(name).weight / 8.0).detach()
    assert not torch.allclose(twin_shift * 8.0, shift, rtol=1e-2, atol=1e-2 * float(shift.abs().max()))


def test_the_measured_rules_need_the_tokenizer():
    from ultraedit.core.batching import EditError

    model, _ = tiny_text_model("llama")
    editor = UltraEditor(model, EditConfig(modules=DOWN, lr_scale="output"))
    with pytest.raises(EditError, match="need the tokenizer"):
        editor.edit_tokens([])
