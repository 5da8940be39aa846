"""TensorRT-LLM expert statistic (meta_info.json + rank{r}.safetensors with "{iter}_{layer}" keys) -> LoadTrace; the
fixture is written here from the documented structure, counts checked against it; bad directories give one error line
and no output; without the safetensors package one line names it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

safetensors_numpy = pytest.importorskip("safetensors.numpy")

from symi_sim.traces.readers_trtllm import import_trtllm_expert_statistic  # noqa: E402
from symi_sim.traces.resolve import detect_format, load_trace  # noqa: E402
from tests.cli_checks import one_error_line  # noqa: E402

NUM_EXPERTS, TOP_K = 8, 2
ITERS, LAYERS = (50, 51, 52), (3, 4, 6)      # DeepSeek-like: the first MoE layer is not layer 0


def _write(directory: Path, counts_by_rank: dict[int, dict[str, np.ndarray]], meta=None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"num_experts": NUM_EXPERTS, "num_experts_per_token": TOP_K} if meta is None else meta
    (directory / "meta_info.json").write_text(json.dumps(meta))
    for rank, tensors in counts_by_rank.items():
        safetensors_numpy.save_file(tensors, str(directory / f"rank{rank}.safetensors"))
    return directory


def _counts(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"{it}_{layer}": rng.integers(0, 20, NUM_EXPERTS).astype(np.int64) for it in ITERS for layer in LAYERS}


def test_counts_per_rank_iteration_and_layer(tmp_path):
    per_rank = {0: _counts(0), 1: _counts(1), 2: _counts(2)}
    directory = _write(tmp_path / "stat", per_rank)
    (directory / "cooccurrence_rank0.safetensors").write_bytes(b"not read")   # other files are left alone
    trace = import_trtllm_expert_statistic(directory)
    assert trace.src_counts_SLEG.shape == (3, 3, NUM_EXPERTS, 3)
    assert trace.top_k == TOP_K and trace.tokens_per_step is None
    assert trace.meta["step_ids"] == list(ITERS) and trace.meta["original_layers"] == list(LAYERS)
    for s, it in enumerate(ITERS):
        for li, layer in enumerate(LAYERS):
            for rank in range(3):
                assert trace.src_counts_SLEG[s, li, :, rank].tolist() == per_rank[rank][f"{it}_{layer}"].tolist()
    assert detect_format(directory) == "trtllm-expert-statistic"
    assert np.array_equal(load_trace(directory).counts_SLE, trace.counts_SLE)


@pytest.mark.parametrize(("case", "expected"), [
    ("missing rank", "no records for rank(s) [1]"),
    ("missing key", "rank1.safetensors lacks key(s) ['51_4']"),
    ("missing layer", "iteration 51 has no counts for layer 4 on any rank"),
    ("bad key", "key 'layer3' is not '<iteration>_<layer>'"),
    ("wrong length", "has shape [7], not [num_experts] = [8]"),
    ("no meta", "meta_info.json' does not exist"),
    ("bad meta", "'num_experts_per_token' must be a positive integer"),
    ("negative", "holds a negative value"),
])
def test_bad_statistics_are_one_error_line_and_no_output(tmp_path, case, expected):
    directory = tmp_path / "stat"
    per_rank = {0: _counts(0), 1: _counts(1)}
    if case == "missing rank":
        per_rank = {0: _counts(0), 2: _counts(2)}
    elif case == "missing key":
        del per_rank[1]["51_4"]
    elif case == "missing layer":
        for tensors in per_rank.values():
            del tensors["51_4"]
    elif case == "bad key":
        per_rank[0]["layer3"] = per_rank[0].pop("50_3")
    elif case == "wrong length":
        per_rank[0]["50_3"] = per_rank[0]["50_3"][:7].copy()
    elif case == "negative":
        per_rank[1]["52_6"][2] = -1
    _write(directory, per_rank, meta={"num_experts": NUM_EXPERTS} if case == "bad meta" else None)
    if case == "no meta":
        (directory / "meta_info.json").unlink()
    with pytest.raises(ValueError, match="TensorRT-LLM") as info:
        import_trtllm_expert_statistic(directory)
    assert expected in str(info.value) and "\n" not in str(info.value)
    error = one_error_line(tmp_path, "trace", "convert", directory, tmp_path / "out.parquet", "--from",
                           "trtllm-expert-statistic")
    assert expected in error


def test_without_safetensors_one_line_names_the_package(tmp_path, monkeypatch):
    directory = _write(tmp_path / "stat", {0: _counts(0)})
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)   # import of it now raises ImportError
    with pytest.raises(ValueError, match=r"needs the safetensors package.*pip install 'symi\[formats\]'"):
        import_trtllm_expert_statistic(directory)
    error = one_error_line(tmp_path, "simulate", "--trace", directory, "--cluster", "cpu-4", "--out", tmp_path / "run")
    assert "safetensors" in error
