"""No silent failure (issue 12): every way a turn, a save or a load can fail leaves the model,
the editor and the state directory as they were, and says so."""

import pytest
import torch

from ultraedit import EditConfig, UltraEditor

from tiny import random_turn, tiny_model

LR = 1e-3


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"


def hooks_left(model):
    return [name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


# ------------------------------------------------------------------ 8. hooks never leak

@pytest.mark.parametrize("where", ["last edit module", "an mlp"])
def test_failed_hook_registration_leaves_no_hook(monkeypatch, where):
    model = tiny_model("llama")
    editor = UltraEditor(model, EditConfig(lr=LR))
    if where == "last edit module":
        victim = list(editor.modules.values())[-1]
        method = "register_forward_hook"
    else:
        victim = model.model.layers[2].mlp
        method = "register_forward_pre_hook"

    def refuse(*args, **kwargs):
        raise RuntimeError("simulated failure while registering a hook")

    monkeypatch.setattr(victim, method, refuse)
    with pytest.raises(RuntimeError, match="simulated failure"):
        editor.edit_tokens(random_turn(0))
    assert hooks_left(model) == []
    assert editor.turns == 0
