import pytest
import torch

from ultraedit import LifelongNormalizer, ridge_solve
from ultraedit.core.presets import PRESETS, resolve_modules

from reference import RefNormalizer
from tiny import tiny_model


def blocks(seed=0, sizes=(7, 1, 12, 3, 30)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(m, 5, generator=gen, dtype=torch.float64) * 3 + 1 for m in sizes]


def test_welford_matches_textbook_statistics():
    norm = LifelongNormalizer(5, formula="welford", dtype=torch.float64)
    xs = blocks()
    for x in xs:
        norm.update(x)
    everything = torch.cat(xs)
    assert norm.n == everything.shape[0]
    torch.testing.assert_close(norm.mean, everything.mean(0))
    # var is the sum of squared deviations: var / (n - 1) is the unbiased variance of all rows.
    torch.testing.assert_close(norm.var / (norm.n - 1), everything.var(0))


def test_paper_formula_adds_one_block_variance_per_block():
    norm = LifelongNormalizer(5, formula="paper", dtype=torch.float64)
    ref = RefNormalizer(5, "paper")
    xs = blocks()
    for x in xs:
        norm.update(x)
        ref.update(x)
    everything = torch.cat(xs)
    # m * var_b = (m - 1) * var_b + var_b: the paper's accumulator exceeds the exact sum of
    # squared deviations by the sum of the blocks' unbiased variances (single-row blocks add 0).
    extra = sum(x.var(0) for x in xs if x.shape[0] > 1)
    torch.testing.assert_close(norm.var, everything.var(0) * (everything.shape[0] - 1) + extra)
    torch.testing.assert_close(norm.var, ref.var)
    torch.testing.assert_close(norm.std, ref.std)
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(norm.std, torch.sqrt(norm.var / (norm.n - 1 + eps)))


def test_normalize_and_state_round_trip():
    norm = LifelongNormalizer(5)
    for x in blocks():
        norm.update(x)
    x = torch.randn(4, 5)
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(norm.normalize(x), (x - norm.mean) / (norm.std + eps))
    other = LifelongNormalizer(5)
    other.load_state_dict(norm.state_dict())
    assert other.n == norm.n and torch.equal(other.var, norm.var)
    with pytest.raises(ValueError, match="shape"):
        LifelongNormalizer(6).load_state_dict(norm.state_dict())


@pytest.mark.parametrize("n,d_in", [(10, 40), (60, 40)])
def test_dual_and_primal_solves_agree(n, d_in):
    gen = torch.Generator().manual_seed(n)
    keys = torch.randn(3, n, d_in, generator=gen, dtype=torch.float64)
    values = torch.randn(3, n, 24, generator=gen, dtype=torch.float64)
    dual = ridge_solve(keys, values, 1.0, "dual")
    primal = ridge_solve(keys, values, 1.0, "primal")
    torch.testing.assert_close(dual, primal)
    direct = torch.linalg.inv(keys[0].T @ keys[0] + torch.eye(d_in, dtype=torch.float64)) @ keys[0].T @ values[0]
    torch.testing.assert_close(primal[0], direct)
    f32 = ridge_solve(keys.float(), values.float(), 1.0, "auto")
    torch.testing.assert_close(f32.double(), primal, rtol=1e-4, atol=1e-5)


def test_presets_are_the_authors_lists_at_reference_depth():
    llama = PRESETS["llama3"].layer_ranges(32)
    assert [l for l, s in llama if s == "mlp.gate_proj"] == [11, 12, 13, 14, 15]
    assert [l for l, s in llama if s == "mlp.up_proj"] == list(range(18, 25))
    assert PRESETS["mistral"].layer_ranges(32) == [(29, "mlp.down_proj"), (30, "mlp.down_proj")]
    assert len(PRESETS["qwen2.5"].layer_ranges(28)) == 18
    assert [l for l, _ in PRESETS["phi4"].layer_ranges(40)] == list(range(30, 39))
    assert len(PRESETS["gemma3"].layer_ranges(62)) == 18
    assert len(PRESETS["llama3"].layer_ranges(32)) == 12


def test_presets_resolve_on_models():
    assert resolve_modules(tiny_model("llama", layers=32, hidden=16))[:2] == [
        "model.layers.11.mlp.gate_proj", "model.layers.12.mlp.gate_proj"]
    assert resolve_modules(tiny_model("gpt2", layers=12, hidden=16)) == [
        f"transformer.h.{i}.mlp.c_proj" for i in range(8, 12)]
    assert resolve_modules(tiny_model("gptj")) == ["transformer.h.2.mlp.fc_out", "transformer.h.3.mlp.fc_out"]
    assert resolve_modules(tiny_model("llama"), "mistral") == ["model.layers.3.mlp.down_proj"]
    with pytest.raises(KeyError, match="unknown preset"):
        resolve_modules(tiny_model("llama"), "nope")
