"""Model presets, files and validation; fitting a trace to a model."""

import json

import numpy as np
import pytest

from symi_sim.models import PRESETS, load_model
from symi_sim.traces.fit import fit_trace, rescale_trace
from symi_sim.traces.format import LoadTrace


def test_gpt_small_shapes():
    model = load_model("gpt-small")
    assert (model.num_layers, model.num_moe_layers, model.d_model, model.d_ff) == (12, 12, 768, 3072)
    assert (model.num_experts, model.top_k, model.seq_len, model.global_batch) == (16, 1, 512, 64)
    assert model.tokens_per_step == 32768
    assert model.expert_params == 2 * 768 * 3072
    assert model.expert_optimizer_bytes == 8 * model.expert_weight_bytes
    assert model.expert_flops_per_assignment == 4 * 768 * 3072
    # attention 4 d^2 per block + tied embeddings + learned positions + routers
    assert model.dense_params == 50257 * 768 + 512 * 768 + 12 * 4 * 768**2 + 12 * 768 * 16
    # per token: 2 x attention params + attention core 4 seq d per block, routers, LM head
    assert model.dense_flops_per_token == 12 * (8 * 768**2 + 4 * 512 * 768) + 2 * 12 * 768 * 16 + 2 * 50257 * 768


def test_deepseek_v3_has_671b_parameters():
    model = PRESETS["deepseek-v3"]
    assert (model.num_moe_layers, model.num_experts, model.top_k, model.num_expert_groups) == (58, 256, 8, 8)
    assert model.expert_params == 3 * 7168 * 2048
    assert round(model.total_params / 1e9) == 671


def test_model_file_with_base_and_overrides(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"base": "gpt-medium", "num_experts": 32}))
    model = load_model(path, top_k=2)
    assert (model.name, model.d_model, model.num_experts, model.top_k) == ("m", 1024, 32, 2)
    toml = tmp_path / "n.toml"
    toml.write_text('[model]\nbase = "gpt-small"\nglobal_batch = 8\n')
    assert load_model(toml).tokens_per_step == 4096


@pytest.mark.parametrize(("spec", "overrides", "message"), [
    ("gpt-huge", {}, "unknown model"),
    ("gpt-small", {"layers": 3}, "unknown model field"),
    ("gpt-small", {"top_k": 17}, "top_k 17 exceeds"),
    ("gpt-small", {"d_model": 0}, "d_model must be a positive integer"),
    ("gpt-small", {"num_moe_layers": 13}, "num_moe_layers 13 exceeds"),
])
def test_bad_models(spec, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_model(spec, **overrides)


def test_bad_model_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("num_experts = [")
    with pytest.raises(ValueError, match="cannot be parsed"):
        load_model(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "missing.json")


def _trace(num_layers=2, num_experts=4, top_k=1, tokens=100):
    rng = np.random.default_rng(1)
    counts = rng.multinomial(tokens * top_k, [0.4, 0.3, 0.2, 0.1][:num_experts], size=(3, num_layers))
    return LoadTrace(counts, top_k=top_k, tokens_per_step=tokens)


def test_shape_mismatch_is_an_error_unless_adopted():
    model = load_model("gpt-small")
    with pytest.raises(ValueError, match="16 experts vs the trace's 4.*12 MoE layers vs the trace's 2"):
        fit_trace(model, _trace())
    fitted, trace = fit_trace(model, _trace(), adopt_trace_shape=True)
    assert (fitted.num_experts, fitted.num_moe_layers, fitted.top_k, fitted.num_layers) == (4, 2, 1, 12)
    assert trace.tokens_per_step == model.tokens_per_step


def test_rescale_keeps_totals_and_popularity():
    trace = LoadTrace(np.array([[[3, 1, 0, 0]]]), top_k=1, tokens_per_step=4)
    scaled = rescale_trace(trace, 10)
    # 7.5 / 2.5: the tie on the fractional part goes to the lower expert id
    assert scaled.counts_SLE.tolist() == [[[8, 2, 0, 0]]]
    assert scaled.tokens_per_step == 10
    big = rescale_trace(_trace(tokens=1000), 32768)
    assert (big.counts_SLE.sum(axis=2) == 32768).all()
    assert rescale_trace(big, 32768) is big


def test_rescale_without_known_tokens_routes_every_token():
    trace = LoadTrace(np.array([[[2, 1, 1], [1, 2, 1]]]), top_k=2)  # 4 assignments: 2 tokens per layer
    scaled = rescale_trace(trace, 6)
    assert scaled.counts_SLE.tolist() == [[[6, 3, 3], [3, 6, 3]]]


def test_tile_layers_replays_layers_cyclically():
    from symi_sim.traces.fit import tile_layers
    from symi_sim.traces.format import LoadTrace

    counts = np.arange(2 * 2 * 3).reshape(2, 2, 3)
    tiled = tile_layers(LoadTrace(counts, top_k=1), 5)
    assert tiled.counts_SLE.shape == (2, 5, 3)
    np.testing.assert_array_equal(tiled.counts_SLE[:, [0, 2, 4]], counts[:, [0, 0, 0]])
    np.testing.assert_array_equal(tiled.counts_SLE[:, [1, 3]], counts[:, [1, 1]])
    assert tiled.meta["tiled_from_layers"] == 2
    with pytest.raises(ValueError, match="positive integer"):
        tile_layers(LoadTrace(counts, top_k=1), 0)
