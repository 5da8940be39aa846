"""Megatron-Core router traces (router_trace_rank{r}.jsonl) -> LoadTrace: counts checked against a hand count of the
records the test writes from the documented structure, and every bad input one error line with no output."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import symi
from symi_sim.traces.format import read_trace
from symi_sim.traces.readers_megatron import import_megatron_router_trace
from symi_sim.traces.resolve import detect_format, load_trace
from tests.cli_checks import one_error_line

NUM_EXPERTS = 6


def _record(step, layer, rank, ids, *, block="decoder", mtp_idx=None, **extra):
    record = {"step": step, "stage": "pre_dispatch", "block": block, "layer": layer, "rank": rank,
              "num_tokens": len(ids), "topk": len(ids[0]) if ids else 2, "top_indices": ids}
    if mtp_idx is not None:
        record["mtp_idx"] = mtp_idx
    record.update(extra)
    return record


def _write(directory: Path, records_by_rank: dict[int, list[dict]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for rank, records in records_by_rank.items():
        (directory / f"router_trace_rank{rank}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


def _random_ids(rng, num_tokens, top_k=2):
    return [rng.choice(NUM_EXPERTS, size=top_k, replace=False).tolist() for _ in range(num_tokens)]


def _fixture(tmp_path: Path):
    """2 ranks x 3 steps x decoder layers 1 and 3 (not 0..L-1), top-2; rank 1 runs two micro-batches per step;
    an mtp head (mtp_idx 0, layer 0) on rank 0. Returns the directory and the records."""
    rng = np.random.default_rng(7)
    records: dict[int, list[dict]] = {0: [], 1: []}
    for step in range(3):
        for layer in (1, 3):
            records[0].append(_record(step, layer, 0, _random_ids(rng, 5)))
            records[1].append(_record(step, layer, 1, _random_ids(rng, 2)))
            records[1].append(_record(step, layer, 1, _random_ids(rng, 3)))   # second micro-batch
        records[0].append(_record(step, 0, 0, _random_ids(rng, 5), block="mtp", mtp_idx=0))
    return _write(tmp_path / "traces", records), records


def _hand_count(records, rank, step, block, layer):
    found = Counter()
    for r in records[rank]:
        if r["step"] == step and r["block"] == block and r["layer"] == layer:
            for row in r["top_indices"]:
                found.update(row)
    return [found[e] for e in range(NUM_EXPERTS)]


def test_counts_per_rank_step_and_layer_match_a_hand_count(tmp_path):
    directory, records = _fixture(tmp_path)
    trace = import_megatron_router_trace(directory, num_experts=NUM_EXPERTS)
    assert trace.counts_SLE.shape == (3, 2, NUM_EXPERTS)
    assert trace.src_counts_SLEG.shape == (3, 2, NUM_EXPERTS, 2)
    assert trace.top_k == 2
    assert trace.tokens_per_step == 10          # 5 tokens on rank 0 + 2 + 3 on rank 1
    assert trace.meta["layers"] == ["decoder.1", "decoder.3"]
    for step in range(3):
        for li, layer in enumerate((1, 3)):
            for rank in (0, 1):
                assert trace.src_counts_SLEG[step, li, :, rank].tolist() == _hand_count(records, rank, step,
                                                                                        "decoder", layer)
            assert trace.counts_SLE[step, li].sum() == 2 * 10


def test_mtp_layers_are_kept_apart_after_the_decoder_layers(tmp_path):
    directory, records = _fixture(tmp_path)
    trace = import_megatron_router_trace(directory, num_experts=NUM_EXPERTS, mtp=True)
    assert trace.meta["layers"] == ["decoder.1", "decoder.3", "mtp.0.0"]
    for step in range(3):
        assert trace.src_counts_SLEG[step, 2, :, 0].tolist() == _hand_count(records, 0, step, "mtp", 0)
        assert trace.src_counts_SLEG[step, 2, :, 1].sum() == 0
    assert trace.tokens_per_step is None    # the mtp layer sees 5 tokens per step, the decoder layers 10


def test_experts_default_to_the_largest_id_seen(tmp_path):
    directory = _write(tmp_path / "d", {0: [_record(0, 0, 0, [[0, 2], [2, 1]])]})
    trace = import_megatron_router_trace(directory)
    assert trace.num_experts == 3 and trace.counts_SLE[0, 0].tolist() == [1, 1, 2]


def test_one_file_is_one_source_rank(tmp_path):
    directory, records = _fixture(tmp_path)
    trace = import_megatron_router_trace(directory / "router_trace_rank1.jsonl", num_experts=NUM_EXPERTS)
    assert trace.src_counts_SLEG.shape[3] == 1 and trace.meta["ranks"] == [1]
    assert trace.counts_SLE[2, 1].tolist() == _hand_count(records, 1, 2, "decoder", 3)


def test_convert_and_the_trace_option_read_the_directory(tmp_path):
    directory, _ = _fixture(tmp_path)
    assert detect_format(directory) == "megatron-router-trace"
    out = tmp_path / "m.parquet"
    result = CliRunner().invoke(symi, ["trace", "convert", str(directory), str(out), "--from", "megatron-router-trace",
                                       "--num-experts", str(NUM_EXPERTS)])
    assert result.exit_code == 0, result.output
    written = read_trace(out)
    direct = load_trace(directory)
    assert np.array_equal(written.src_counts_SLEG, import_megatron_router_trace(directory,
                                                                                num_experts=NUM_EXPERTS).src_counts_SLEG)
    assert np.array_equal(direct.counts_SLE, written.counts_SLE)
    plan_out = tmp_path / "plan.json"
    result = CliRunner().invoke(symi, ["plan", "--trace", str(directory), "--cluster", "cpu-4", "--slots", "2",
                                       "--step", "1", "--policy", "symi", "--out", str(plan_out)])
    assert result.exit_code == 0, result.output
    placement = json.loads(plan_out.read_text())
    assert len(placement["layers"]) == 2


def _bad_cases():
    ok = _record(0, 0, 0, [[0, 1], [2, 3]])
    no_key = {k: v for k, v in ok.items() if k != "top_indices"}
    return [
        ({0: [no_key]}, "missing key(s) ['top_indices']"),
        ({0: [ok, _record(0, 1, 0, [[0, 1, 2]])]}, "mixed top-k"),
        ({0: [dict(ok, num_tokens=3)]}, "not [num_tokens, topk] = [3, 2]"),
        ({0: [_record(0, 0, 0, [[1, 1], [2, 3]])]}, "picks expert 1 twice"),
        ({0: [dict(ok, top_indices=[[0, 1], [2]])]}, "top_indices"),
        ({0: [dict(ok, top_indices=[[0, -1], [2, 3]])]}, "negative"),
        ({0: [ok], 2: [_record(0, 0, 2, [[0, 1]])]}, "no records for rank(s) [1]"),
        ({0: [ok, _record(1, 0, 0, [[0, 1]]), _record(1, 1, 0, [[0, 1]])]}, "step 0 has no record for layer decoder.1"),
        ({0: [ok, _record(1, 0, 0, [[0, 1]])], 1: [_record(0, 0, 1, [[0, 1]])]},
         "rank 1 has no records for step(s) [1]"),
        ({0: [dict(ok, stage="post_dispatch")]}, "stage 'post_dispatch'"),
        ({0: [dict(ok, rank=1)]}, "rank 1 in a file named for rank 0"),
        ({0: [dict(ok, block="encoder")]}, "'block' must be one of"),
        ({0: [dict(ok, block="mtp")]}, "mtp_idx"),
        ({0: [dict(ok, step=-1)]}, "'step' must be a non-negative integer"),
    ]


@pytest.mark.parametrize(("records", "expected"), _bad_cases())
def test_bad_records_are_one_error_line_and_no_output(tmp_path, records, expected):
    directory = _write(tmp_path / "in", records)
    with pytest.raises(ValueError, match="Megatron router trace") as info:
        import_megatron_router_trace(directory)
    assert expected in str(info.value) and "\n" not in str(info.value)
    error = one_error_line(tmp_path, "trace", "convert", directory, tmp_path / "out.parquet", "--from",
                           "megatron-router-trace")
    assert expected in error


def test_ids_beyond_the_given_experts_and_bad_lines_are_refused(tmp_path):
    directory = _write(tmp_path / "in", {0: [_record(0, 0, 0, [[0, 5]])]})
    with pytest.raises(ValueError, match=r"expert id 5 is out of range \[0, 4\)"):
        import_megatron_router_trace(directory, num_experts=4)
    (directory / "router_trace_rank0.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        import_megatron_router_trace(directory)
    with pytest.raises(ValueError, match="holds no files named like"):
        import_megatron_router_trace(tmp_path)
