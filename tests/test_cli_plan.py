"""`symi plan`: single placements (JSON, EPLB arrays) and the replay table, through click's CliRunner."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli import symi
from symi_sim.placement import read_placement_json
from symi_sim.traces.format import LoadTrace, write_trace

COUNTS_SLE = np.array([[[10, 10, 10, 10], [5, 5, 5, 25]], [[30, 10, 0, 0], [0, 0, 0, 40]],
                       [[0, 0, 20, 20], [10, 10, 10, 10]]])


@pytest.fixture()
def trace_path(tmp_path):
    path = tmp_path / "toy.parquet"
    write_trace(LoadTrace(COUNTS_SLE, top_k=1, tokens_per_step=40, model="toy"), path)
    return path


@pytest.fixture()
def cluster_path(tmp_path):
    path = tmp_path / "toy.toml"
    path.write_text("num_nodes = 1\ngpus_per_node = 4\nslots_per_gpu = 2\n")
    return path


def test_plan_single_step_json(tmp_path, trace_path, cluster_path):
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(symi, ["plan", "--trace", str(trace_path), "--cluster", str(cluster_path),
                                       "--policy", "symi", "--step", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    placement = read_placement_json(out)
    # Algorithm 1 on step 1's loads: layer 0 [30,10,0,0] -> [5,1,1,1]; layer 1 [0,0,0,40] -> [1,1,1,5]
    assert placement.logcnt_LE.tolist() == [[5, 1, 1, 1], [1, 1, 1, 5]]
    assert placement.phy2log_LR[0].tolist() == [0, 0, 0, 0, 0, 1, 2, 3]
    data = json.loads(out.read_text())
    assert data["policy"]["name"] == "symi" and data["policy"]["step"] == 2
    assert data["cluster"]["slots_per_gpu"] == 2
    np.testing.assert_allclose(data["layers"][0]["share"], [0.2] * 5 + [1.0] * 3)


def test_plan_eplb_arrays(tmp_path, trace_path, cluster_path):
    out = tmp_path / "plan.npz"
    result = CliRunner().invoke(symi, ["plan", "--trace", str(trace_path), "--cluster", str(cluster_path),
                                       "--policy", "symi", "--step", "2", "--format", "eplb", "--out", str(out)])
    assert result.exit_code == 0, result.output
    arrays = np.load(out)
    assert arrays["phy2log"].dtype == np.int64
    assert arrays["phy2log"][1].tolist() == [0, 1, 2, 3, 3, 3, 3, 3]
    assert arrays["logcnt"].tolist() == [[5, 1, 1, 1], [1, 1, 1, 5]]
    # log2phy: replica slots per expert in rank order, -1 padded to num_redundant + 1 = 8 - 4 + 1 = 5 (DeepSeek's
    # width), here also the largest count
    assert arrays["log2phy"].shape == (2, 4, 5)
    assert arrays["log2phy"][0, 0].tolist() == [0, 1, 2, 3, 4]
    assert arrays["log2phy"][0, 1].tolist() == [5, -1, -1, -1, -1]


def test_plan_replay_writes_run_directory(tmp_path, trace_path, cluster_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(symi, ["plan", "--trace", str(trace_path), "--cluster", str(cluster_path),
                                       "--replay", "--policies", "static,symi", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "static" in result.output and "symi" in result.output
    for name in ("config.json", "steps.csv", "summary.csv", "summary.json", "replay.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    by = {row["policy"]: row for row in summary}
    # static, layer 0: 20 + 20 dropped of 40 + 40; layer 1: step 1 [0,0,0,40] -> 15 + 15 drop, step 2 none
    assert by["static"]["dropped_fraction"] == pytest.approx((40 + 30) / 160)


@pytest.mark.parametrize("args, message", [
    (["--policy", "nope", "--step", "1"], "unknown policy 'nope'"),
    (["--policy", "symi", "--step", "9"], "step 9 is outside"),
    (["--policy", "symi", "--step", "1", "-o", "bogus=1"], "unknown option"),
    (["--policy", "symi"], "needs --step"),
    (["--replay", "--policies", "static,nope"], "unknown policy 'nope'"),
])
def test_plan_bad_input_is_one_clear_error(tmp_path, trace_path, cluster_path, args, message):
    out = tmp_path / "plan.json"
    extra = ["--out", str(out)] if "needs" not in message else []
    result = CliRunner().invoke(symi, ["plan", "--trace", str(trace_path), "--cluster", str(cluster_path),
                                       *args, *extra])
    assert result.exit_code != 0
    assert "Error:" in result.output and message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_plan_impossible_cluster(tmp_path, trace_path):
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(symi, ["plan", "--trace", str(trace_path), "--cluster", "paper-a100-16",
                                       "--slots", "1", "--step", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output  # 16 slots hold 4 experts
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({"num_nodes": 1, "gpus_per_node": 1, "slots_per_gpu": 2}))
    result = CliRunner().invoke(symi, ["plan", "--trace", str(trace_path), "--cluster", str(tiny), "--step", "1",
                                       "--out", str(tmp_path / "p2.json")])
    assert result.exit_code != 0 and "impossible cluster" in result.output
    assert not (tmp_path / "p2.json").exists()


def _plan(tmp_path, trace_path, cluster_path, *args):
    return CliRunner().invoke(symi, ["plan", "--trace", str(trace_path), "--cluster", str(cluster_path),
                                     "--step", "2", *args])


def test_plan_eplb_pads_log2phy_to_num_redundant_plus_one(tmp_path, trace_path, cluster_path):
    # eplb with 3 slots per GPU (12 slots) on step 0's loads: layer 1 [5,5,5,25]: 25/2..25/5 take 4 extra slots,
    # then 5 = 25/5 ties all four, lowest id first: counts [2,2,2,6]. No expert has more than 6 slots, yet log2phy
    # is 12 - 4 + 1 = 9 wide
    out = tmp_path / "plan.npz"
    result = CliRunner().invoke(symi, ["plan", "--trace", str(trace_path), "--cluster", str(cluster_path),
                                       "--slots", "3", "--step", "1", "--policy", "eplb", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with np.load(out) as arrays:
        assert arrays["logcnt"].tolist() == [[3, 3, 3, 3], [2, 2, 2, 6]]
        assert arrays["log2phy"].shape == (2, 4, 9)
        assert (arrays["log2phy"][:, :, arrays["logcnt"].max():] == -1).all()


def test_plan_sglang(tmp_path, trace_path, cluster_path):
    out = tmp_path / "loc.json"
    result = _plan(tmp_path, trace_path, cluster_path, "--policy", "eplb", "--format", "sglang",
                   "--first-moe-layer", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"--init-expert-location {out} --ep-size 4 --ep-num-redundant-experts 4" in result.output
    rows = json.loads(out.read_text())["physical_to_logical_map"]
    assert rows[0] == [0, 1, 2, 3, 0, 1, 2, 3]  # the dense layer: SGLang's trivial row
    eplb = _plan(tmp_path, trace_path, cluster_path, "--policy", "eplb", "--out", str(tmp_path / "p.json"))
    assert eplb.exit_code == 0, eplb.output
    assert rows[1:] == read_placement_json(tmp_path / "p.json").phy2log_LR.tolist()


def test_plan_trtllm_from_the_extension(tmp_path, trace_path, cluster_path):
    out = tmp_path / "lb.yaml"
    result = _plan(tmp_path, trace_path, cluster_path, "--policy", "symi", "--first-moe-layer", "3", "--out", str(out))
    assert result.exit_code == 0, result.output
    # symi on step 1: layer 0 [30,10,0,0] -> [5,1,1,1] -> slots [0,0,0,0,0,1,2,3]; layer 1 -> [0,1,2,3,3,3,3,3]
    assert out.read_text() == ("num_slots: 8\nlayer_updates_per_iter: 0\ninitial_global_assignments:\n"
                               "  3: [0, 0, 0, 0, 0, 1, 2, 3]\n  4: [0, 1, 2, 3, 3, 3, 3, 3]\n")
    assert "moe_config.load_balancer" in result.output


def test_plan_vllm_ascend(tmp_path, trace_path, cluster_path):
    out = tmp_path / "map.json"
    # static: 2 replicas of each expert, slots [0,1,2,3,0,1,2,3], so GPU g holds experts 2g % 4 and 2g % 4 + 1
    result = _plan(tmp_path, trace_path, cluster_path, "--policy", "static", "--format", "vllm-ascend",
                   "--out", str(out))
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["moe_layer_count"] == 2
    assert [d["device_id"] for d in data["layer_list"][1]["device_list"]] == [0, 1, 2, 3]
    assert [d["device_expert"] for d in data["layer_list"][1]["device_list"]] == [[0, 1], [2, 3], [0, 1], [2, 3]]


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "sglang", "--out", "p.npz"], "--format sglang does not match --out"),
    (["--format", "trtllm", "--out", "p.json"], "--format trtllm is written to a .yaml or .yml file"),
    (["--first-moe-layer", "3", "--out", "p.json"], "--first-moe-layer is for --format sglang or trtllm, not json"),
    (["--format", "sglang", "--first-moe-layer", "-1", "--out", "p.json"], "--first-moe-layer must be >= 0, got -1"),
    (["--replay", "--first-moe-layer", "3", "--out", "run"], "--first-moe-layer is for a single plan"),
    # symi puts expert 0 on 5 of 8 slots, so twice on GPU 0: vllm-ascend keeps one slot per expert and device
    (["--policy", "symi", "--format", "vllm-ascend", "--out", "p.json"],
     "--format vllm-ascend: layer 0 puts expert 0 on device 0 twice"),
])
def test_plan_formats_bad_input(tmp_path, trace_path, cluster_path, args, message):
    args = [str(tmp_path / a) if a in ("p.npz", "p.json", "run") else a for a in args]
    if "--replay" in args:
        args = [a for a in args if a != "--replay"]
        result = CliRunner().invoke(symi, ["plan", "--trace", str(trace_path), "--cluster", str(cluster_path),
                                           "--replay", *args])
    else:
        result = _plan(tmp_path, trace_path, cluster_path, *args)
    assert result.exit_code != 0
    assert "Error:" in result.output and message in result.output, result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.parquet", "toy.toml"]


def test_plan_replay_scores_plans_made_for_another_capacity_mode(tmp_path, trace_path, cluster_path):
    def oracle_drops(*extra):
        out = tmp_path / f"run{len(extra)}"
        result = CliRunner().invoke(symi, ["plan", "--trace", str(trace_path), "--cluster", str(cluster_path),
                                           "--replay", "--policies", "oracle", "--capacity-mode", "gpu", *extra,
                                           "--out", str(out)])
        assert result.exit_code == 0, result.output
        config = json.loads((out / "config.json").read_text())
        return json.loads((out / "summary.json").read_text())[0]["dropped_fraction"], config["plan_capacity_mode"]

    # GPU budgets of 40 / 4 = 10 tokens. Planned for them, the oracle's shares fit every step. Planned for slot
    # buffers (even shares): layer 0 drops 8 tokens at each step (tests/test_replay.py works them out); layer 1, step
    # 1 [0,0,0,40]: counts [1,1,1,5], GPU 0 holds two of expert 3's slots, 8 tokens each: 16, so 6 drop; step 2
    # [10,10,10,10]: counts [2,2,2,2], every GPU two slots of 5 tokens, none drop. 8 + 6 + 8 of 160 assignments
    assert oracle_drops() == (0.0, "gpu")
    assert oracle_drops("--plan-capacity-mode", "slot") == (pytest.approx(22 / 160), "slot")
    result = CliRunner().invoke(symi, ["plan", "--trace", str(trace_path), "--cluster", str(cluster_path),
                                       "--policy", "oracle", "--step", "1", "--plan-capacity-mode", "slot",
                                       "--out", str(tmp_path / "one.json")])
    assert result.exit_code != 0 and "--plan-capacity-mode goes with --replay" in result.output
    assert not (tmp_path / "one.json").exists()
