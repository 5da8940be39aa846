"""vLLM routed experts ([tokens, layers, top_k] expert ids per request, saved with numpy) -> LoadTrace, grouped into
steps of --tokens-per-step; counts checked against a hand count; bad arrays give one error line and no output."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import symi
from symi_sim.traces.format import read_trace
from symi_sim.traces.readers_vllm import import_vllm_routed_experts
from tests.cli_checks import one_error_line

NUM_LAYERS, TOP_K, NUM_EXPERTS = 4, 2, 8


def _request(rng, num_tokens: int) -> np.ndarray:
    """[T, L, K] int32 like vLLM's capture: layer 0 dense (never captured, so zeros), others distinct top-k ids."""
    ids_TLK = np.zeros((num_tokens, NUM_LAYERS, TOP_K), dtype=np.int32)
    for t in range(num_tokens):
        for layer in range(1, NUM_LAYERS):
            ids_TLK[t, layer] = rng.choice(NUM_EXPERTS, size=TOP_K, replace=False)
    return ids_TLK


def test_requests_concatenate_and_cut_into_steps(tmp_path):
    rng = np.random.default_rng(5)
    requests = [_request(rng, 7), _request(rng, 6)]
    directory = tmp_path / "requests"
    directory.mkdir()
    for i, ids in enumerate(requests):
        np.save(directory / f"req{i:03d}.npy", ids)
    trace = import_vllm_routed_experts(directory, tokens_per_step=4, num_experts=NUM_EXPERTS)
    assert trace.counts_SLE.shape == (3, 3, NUM_EXPERTS)      # 13 tokens -> 3 steps of 4, 1 token dropped
    assert trace.meta["dropped_tokens"] == 1 and trace.meta["original_layers"] == [1, 2, 3]
    assert trace.top_k == TOP_K and trace.tokens_per_step == 4
    tokens = np.concatenate(requests)
    for step in range(3):
        for li, layer in enumerate((1, 2, 3)):
            found = Counter(tokens[4 * step: 4 * step + 4, layer].ravel().tolist())
            assert trace.counts_SLE[step, li].tolist() == [found[e] for e in range(NUM_EXPERTS)]
    npz = tmp_path / "requests.npz"
    np.savez(npz, a=requests[0], b=requests[1])
    assert np.array_equal(import_vllm_routed_experts(npz, tokens_per_step=4, num_experts=NUM_EXPERTS).counts_SLE,
                          trace.counts_SLE)
    out = tmp_path / "v.parquet"
    result = CliRunner().invoke(symi, ["trace", "convert", str(npz), str(out), "--from", "vllm-routed-experts",
                                       "--tokens-per-step", "4", "--num-experts", str(NUM_EXPERTS)])
    assert result.exit_code == 0, result.output
    assert np.array_equal(read_trace(out).counts_SLE, trace.counts_SLE)


def _bad(tmp_path: Path, case: str) -> Path:
    rng = np.random.default_rng(1)
    path = tmp_path / "r.npy"
    ids = _request(rng, 8)
    if case == "mixed top-k":
        path = tmp_path / "r.npz"
        np.savez(path, a=ids, b=ids[:, :, :1])
        return path
    if case == "repeated expert":
        ids[3, 2] = [5, 5]
    elif case == "two dims":
        ids = ids[:, 0]
    elif case == "negative":
        ids[0, 1, 0] = -1
    elif case == "floats":
        ids = ids + 0.5
    elif case == "too few tokens":
        ids = ids[:2]
    np.save(path, ids)
    return path


@pytest.mark.parametrize(("case", "expected"), [
    ("mixed top-k", "(mixed layers or top-k)"),
    ("repeated expert", "token 3 picks the same expert twice in layer 2"),
    ("two dims", "must be a 3-D array"),
    ("negative", "negative"),
    ("floats", "must hold integers"),
    ("too few tokens", "2 tokens, fewer than one step of tokens_per_step 4"),
])
def test_bad_arrays_are_one_error_line_and_no_output(tmp_path, case, expected):
    source = _bad(tmp_path, case)
    with pytest.raises(ValueError, match="vLLM routed experts") as info:
        import_vllm_routed_experts(source, tokens_per_step=4)
    assert expected in str(info.value) and "\n" not in str(info.value)
    error = one_error_line(tmp_path, "trace", "convert", source, tmp_path / "out.parquet", "--from",
                           "vllm-routed-experts", "--tokens-per-step", "4")
    assert expected in error


def test_tokens_per_step_is_required(tmp_path):
    path = tmp_path / "r.npy"
    np.save(path, _request(np.random.default_rng(0), 4))
    error = one_error_line(tmp_path, "trace", "convert", path, tmp_path / "o.parquet", "--from", "vllm-routed-experts")
    assert "needs tokens_per_step (--tokens-per-step)" in error
