"""SGLang expert distribution recorder dumps (stat and per_pass) -> LoadTrace, against counts folded by hand from
the physical-to-logical map; bad dumps give one error line and no output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from symi_sim.traces.readers_sglang import import_sglang_expert_distribution  # noqa: E402
from symi_sim.traces.resolve import detect_format, load_trace  # noqa: E402
from tests.cli_checks import one_error_line  # noqa: E402

# 3 layers (layer 0 dense: never routed), 4 logical experts on 6 physical slots (experts 0 and 2 replicated)
PHY2LOG_LP = np.array([[0, 1, 2, 3, 0, 2]] * 3)


def _stat_dump(tmp_path: Path, logical_SLE: np.ndarray) -> Path:
    path = tmp_path / "expert_distribution_recorder_1700000000.0.pt"
    torch.save({"rank": 0, "logical_count": torch.tensor(logical_SLE, dtype=torch.int32),
                "average_utilization_rate_over_window": None}, path)
    return path


def _per_pass_dumps(tmp_path: Path, physical_by_rank: dict[int, dict[int, np.ndarray]],
                    phy2log_LP: np.ndarray = PHY2LOG_LP) -> Path:
    directory = tmp_path / "dumps"
    directory.mkdir(exist_ok=True)
    for rank, passes in physical_by_rank.items():
        records = [{"forward_pass_id": fp, "rank": rank, "gatherer_key": "primary",
                    "global_physical_count": torch.tensor(count_LP, dtype=torch.int32)}
                   for fp, count_LP in passes.items()]
        torch.save({"records": records, "last_physical_to_logical_map": torch.tensor(phy2log_LP)},
                   directory / f"expert_distribution_recorder_1700000000.0_{rank}.pt")
    return directory


def _physical(rng) -> np.ndarray:
    count_LP = rng.integers(0, 9, size=PHY2LOG_LP.shape)
    count_LP[0] = 0     # the dense layer
    return count_LP


def test_stat_dump_drops_dense_layers_and_unfilled_buffer_rows(tmp_path):
    logical_SLE = np.zeros((4, 3, 4), dtype=np.int64)
    logical_SLE[0, 1] = [5, 0, 1, 2]
    logical_SLE[0, 2] = [1, 1, 1, 5]
    logical_SLE[2, 1] = [0, 8, 0, 0]
    logical_SLE[2, 2] = [2, 2, 2, 2]        # rows 1 and 3: never filled
    path = _stat_dump(tmp_path, logical_SLE)
    trace = import_sglang_expert_distribution(path, top_k=2)
    assert trace.counts_SLE.tolist() == [[[5, 0, 1, 2], [1, 1, 1, 5]], [[0, 8, 0, 0], [2, 2, 2, 2]]]
    assert trace.meta["original_layers"] == [1, 2] and trace.meta["buffer_rows"] == [0, 2]
    assert trace.top_k == 2 and trace.src_counts_SLEG is None and trace.tokens_per_step is None
    assert detect_format(path) == "sglang-expert-distribution"


def test_per_pass_dumps_fold_physical_slots_into_logical_experts(tmp_path):
    rng = np.random.default_rng(3)
    physical = {rank: {fp: _physical(rng) for fp in (10, 11, 13)} for rank in (0, 1)}
    directory = _per_pass_dumps(tmp_path, physical)
    trace = import_sglang_expert_distribution(directory)
    assert trace.src_counts_SLEG.shape == (3, 2, 4, 2)
    assert trace.meta["step_ids"] == [10, 11, 13] and trace.meta["original_layers"] == [1, 2]
    for s, fp in enumerate((10, 11, 13)):
        for rank in (0, 1):
            for li, layer in enumerate((1, 2)):
                count_P = physical[rank][fp][layer]
                by_hand = [count_P[0] + count_P[4], count_P[1], count_P[2] + count_P[5], count_P[3]]
                assert trace.src_counts_SLEG[s, li, :, rank].tolist() == by_hand
    assert np.array_equal(load_trace(directory).counts_SLE, trace.counts_SLE)


def _bad_per_pass(tmp_path, case):
    rng = np.random.default_rng(0)
    if case == "missing rank":
        return _per_pass_dumps(tmp_path, {0: {0: _physical(rng)}, 2: {0: _physical(rng)}})
    if case == "missing pass":
        return _per_pass_dumps(tmp_path, {0: {0: _physical(rng), 1: _physical(rng)}, 1: {0: _physical(rng)}})
    if case == "wrong shape":
        return _per_pass_dumps(tmp_path, {0: {0: np.ones((3, 5), dtype=np.int64)}})
    if case == "wrong keys":
        torch.save({"counts": torch.zeros(3)}, tmp_path / "x.pt")
        return tmp_path / "x.pt"
    if case == "not torch":
        (tmp_path / "x.pt").write_text("hello")
        return tmp_path / "x.pt"
    if case == "nothing routed":
        return _stat_dump(tmp_path, np.zeros((2, 3, 4), dtype=np.int64))
    raise AssertionError(case)


@pytest.mark.parametrize(("case", "expected"), [
    ("missing rank", "no records for rank(s) [1]"),
    ("missing pass", "rank 1 has no record for forward pass(es) [1]"),
    ("wrong shape", "not the map's [3, 6]"),
    ("wrong keys", "not a recorder dump"),
    ("not torch", "not a readable torch.save file"),
    ("nothing routed", "routes no token at any forward pass"),
])
def test_bad_dumps_are_one_error_line_and_no_output(tmp_path, case, expected):
    source = _bad_per_pass(tmp_path / "in" if (tmp_path / "in").mkdir() is None else tmp_path, case)
    with pytest.raises(ValueError, match="SGLang") as info:
        import_sglang_expert_distribution(source)
    assert expected in str(info.value) and "\n" not in str(info.value)
    error = one_error_line(tmp_path, "trace", "convert", source, tmp_path / "out.parquet", "--from",
                           "sglang-expert-distribution")
    assert expected in error
