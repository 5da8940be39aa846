"""placement_formats: each writer's output checked by a checker written from that framework's loader (the invariants
listed in symi_sim/placement_formats.py, written here again independently of the writers), round trips through our
readers, and bad input (one ValueError, no file)."""

import json
import re

import numpy as np
import pytest

from symi_sim.cluster import Cluster
from symi_sim.placement import Placement
from symi_sim.placement_formats import (
    FORMATS,
    eplb_arrays,
    read_sglang_mapping,
    read_trtllm_config,
    read_vllm_ascend_expert_map,
    sglang_mapping,
    trtllm_config,
    vllm_ascend_expert_map,
    write_placement,
)
from symi_sim.policies import get_policy

# 2 nodes x 2 GPUs x 3 slots = 12 slots for 8 experts: 4 redundant, log2phy 5 wide
CLUSTER = Cluster(num_nodes=2, gpus_per_node=2, slots_per_gpu=3)
NUM_EXPERTS = 8
# two layers by hand; GPU g holds slots 3g..3g+2, no expert twice on one GPU; layer 0: e0 x3, e1 x2, layer 1: e7 x5
PHY2LOG_LR = np.array([[0, 1, 2, 0, 3, 4, 0, 1, 5, 6, 7, 2],
                       [7, 0, 1, 7, 2, 3, 7, 4, 5, 7, 6, 1]])
PLACEMENT = Placement.even(PHY2LOG_LR, NUM_EXPERTS)


def experts_on_gpu(placement, cluster, gpu):
    """[L] sorted lists: the experts our placement puts on GPU gpu (slot p on GPU p // slots_per_gpu)."""
    slots = np.flatnonzero(np.arange(placement.num_slots) // cluster.slots_per_gpu == gpu)
    return [sorted(row[slots].tolist()) for row in placement.phy2log_LR]


# ---------------------------------------------------------------- checkers from the loaders' invariants

def check_eplb(arrays, num_experts, num_slots):
    """DeepSeek EPLB's triple as eplb.py documents it and vLLM's EplbState holds it."""
    assert sorted(arrays) == ["log2phy", "logcnt", "phy2log"]
    phy2log, log2phy, logcnt = arrays["phy2log"], arrays["log2phy"], arrays["logcnt"]
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == np.int64
    num_layers = phy2log.shape[0]
    assert phy2log.shape == (num_layers, num_slots)
    assert logcnt.shape == (num_layers, num_experts)
    assert log2phy.shape == (num_layers, num_experts, num_slots - num_experts + 1)  # num_redundant + 1
    assert phy2log.min() >= 0 and phy2log.max() < num_experts
    for layer in range(num_layers):
        for expert in range(num_experts):
            holders = [p for p in range(num_slots) if phy2log[layer, p] == expert]
            count = int(logcnt[layer, expert])
            assert count == len(holders) >= 1
            assert sorted(log2phy[layer, expert, :count].tolist()) == holders
            assert (log2phy[layer, expert, count:] == -1).all()


def init_by_mapping(server_args, model_config, physical_to_logical_map):
    """SGLang's ExpertLocationMetadata.init_by_mapping signature: the file's dict arrives as keyword arguments."""
    return physical_to_logical_map


def check_sglang(data, placement, cluster, first_moe_layer):
    """What --init-expert-location needs: one key, [model layers, E + redundant] rows each holding every expert,
    slots in ep_size equal consecutive blocks (slot p on rank p // (P / ep_size))."""
    rows = np.asarray(init_by_mapping(None, None, **data))
    num_model_layers = first_moe_layer + placement.num_layers
    num_physical = placement.num_experts + (cluster.num_slots - placement.num_experts)  # E + ep_num_redundant
    assert rows.shape == (num_model_layers, num_physical)
    assert num_physical % cluster.num_gpus == 0
    for row in rows:
        assert sorted(set(row.tolist())) == list(range(placement.num_experts))
    # dense layers: SGLang's trivial row, physical p holds p % E
    for layer in range(first_moe_layer):
        assert rows[layer].tolist() == [p % placement.num_experts for p in range(num_physical)]
    local = num_physical // cluster.num_gpus
    for rank in range(cluster.num_gpus):
        on_rank = [sorted(rows[first_moe_layer + layer, rank * local:(rank + 1) * local].tolist())
                   for layer in range(placement.num_layers)]
        assert on_rank == experts_on_gpu(placement, cluster, rank)


def parse_lb_yaml(text):
    """A parser for the subset of YAML the load-balancer file uses: `key: int`, `key:` then `  int: [ints]`."""
    config, inner = {}, None
    for line in text.splitlines():
        if not line.strip():
            continue
        key, _, value = line.partition(":")
        if line.startswith("  "):
            assert inner is not None, line
            assert value.strip().startswith("[") and value.strip().endswith("]"), line
            config[inner][int(key)] = [int(x) for x in value.strip()[1:-1].split(",")]
        elif value.strip():
            config[key] = int(value)
            inner = None
        else:
            config[key] = {}
            inner = key
    return config


def check_trtllm(config, placement, cluster, first_moe_layer):
    """MoeLoadBalancerConfig + the fused-MoE modules' checks, and the README's "successive blocks per rank"."""
    assert set(config) == {"num_slots", "initial_global_assignments", "layer_updates_per_iter"}
    num_slots = config["num_slots"]
    assert num_slots == cluster.num_slots and num_slots >= placement.num_experts
    assert num_slots % cluster.num_gpus == 0
    assert config["layer_updates_per_iter"] == 0
    assignments = config["initial_global_assignments"]
    assert sorted(assignments) == list(range(first_moe_layer, first_moe_layer + placement.num_layers))
    assert all(isinstance(layer, int) for layer in assignments)
    local = num_slots // cluster.num_gpus
    for layer, experts in assignments.items():
        assert isinstance(experts, list) and len(experts) == num_slots
        assert set(experts) == set(range(placement.num_experts))
        for rank in range(cluster.num_gpus):
            assert sorted(experts[rank * local:(rank + 1) * local]) == \
                experts_on_gpu(placement, cluster, rank)[layer - first_moe_layer]


def check_vllm_ascend(data, placement, cluster):
    """ExpertLoadBalancer: moe_layer_count layers, device_count from layer 0, one [L, G, S] int32 tensor, an expert
    once per device (expert -> local slot map), every expert present, redundant = S * G - E >= 0."""
    assert data["moe_layer_count"] == len(data["layer_list"]) == placement.num_layers
    device_count = data["layer_list"][0]["device_count"]
    assert device_count == cluster.num_gpus
    tensor = np.array([[device["device_expert"] for device in layer["device_list"]] for layer in data["layer_list"]],
                      dtype=np.int32)
    assert tensor.shape == (placement.num_layers, cluster.num_gpus, cluster.slots_per_gpu)
    assert tensor.shape[2] * device_count - placement.num_experts >= 0
    for index, layer in enumerate(data["layer_list"]):
        assert layer["layer_id"] == index and layer["device_count"] == device_count
        assert [device["device_id"] for device in layer["device_list"]] == list(range(device_count))
        assert set(tensor[index].ravel().tolist()) == set(range(placement.num_experts))
        for gpu in range(device_count):
            expert_to_local = {int(e): i for i, e in enumerate(tensor[index, gpu])}
            assert len(expert_to_local) == cluster.slots_per_gpu  # no slot lost to a duplicate
            assert sorted(expert_to_local) == experts_on_gpu(placement, cluster, gpu)[index]


# ---------------------------------------------------------------- the writers' structures

def test_eplb_arrays_by_hand():
    arrays = eplb_arrays(PLACEMENT, CLUSTER)
    check_eplb(arrays, NUM_EXPERTS, 12)
    assert arrays["logcnt"][0].tolist() == [3, 2, 2, 1, 1, 1, 1, 1]
    assert arrays["log2phy"][0, 0].tolist() == [0, 3, 6, -1, -1]
    assert arrays["log2phy"][1, 7].tolist() == [0, 3, 6, 9, -1]
    assert arrays["log2phy"][0, 5].tolist() == [8, -1, -1, -1, -1]


@pytest.mark.parametrize("seed", range(6))
def test_eplb_arrays_of_policies_pass_the_checker(seed):
    rng = np.random.default_rng(seed)
    cluster = Cluster(num_nodes=int(rng.integers(1, 3)), gpus_per_node=int(rng.integers(1, 5)),
                      slots_per_gpu=int(rng.integers(2, 5)))
    num_experts = int(rng.integers(2, cluster.num_slots + 1))
    load_LE = rng.integers(0, 50, size=(3, num_experts))
    for name in ("eplb", "symi", "symi-balanced", "static"):
        placement = get_policy(name).plan(load_LE, cluster)
        check_eplb(eplb_arrays(placement, cluster), num_experts, cluster.num_slots)


@pytest.mark.parametrize("first_moe_layer", [0, 3])
def test_sglang_mapping(first_moe_layer):
    data = sglang_mapping(PLACEMENT, CLUSTER, first_moe_layer=first_moe_layer)
    check_sglang(data, PLACEMENT, CLUSTER, first_moe_layer)
    assert data["physical_to_logical_map"][first_moe_layer].tolist() == PHY2LOG_LR[0].tolist()


@pytest.mark.parametrize("first_moe_layer", [0, 3])
def test_trtllm_config(first_moe_layer):
    config = trtllm_config(PLACEMENT, CLUSTER, first_moe_layer=first_moe_layer)
    check_trtllm(config, PLACEMENT, CLUSTER, first_moe_layer)
    assert config["initial_global_assignments"][first_moe_layer + 1] == PHY2LOG_LR[1].tolist()


def test_vllm_ascend_expert_map():
    data = vllm_ascend_expert_map(PLACEMENT, CLUSTER)
    check_vllm_ascend(data, PLACEMENT, CLUSTER)
    assert data["layer_list"][1]["device_list"][3] == {"device_id": 3, "device_expert": [7, 6, 1]}


# ---------------------------------------------------------------- files and round trips

def test_write_eplb_npz(tmp_path):
    write_placement(tmp_path / "p.npz", PLACEMENT, CLUSTER, "eplb")
    with np.load(tmp_path / "p.npz") as data:
        check_eplb(dict(data), NUM_EXPERTS, 12)
        assert data["phy2log"].tolist() == PHY2LOG_LR.tolist()


def test_write_eplb_pt(tmp_path):
    torch = pytest.importorskip("torch")
    write_placement(tmp_path / "p.pt", PLACEMENT, CLUSTER, "eplb")
    data = torch.load(tmp_path / "p.pt", weights_only=True)
    check_eplb({name: tensor.numpy() for name, tensor in data.items()}, NUM_EXPERTS, 12)


@pytest.mark.parametrize("first_moe_layer", [0, 2])
def test_sglang_json_round_trip(tmp_path, first_moe_layer):
    path = tmp_path / "loc.json"
    write_placement(path, PLACEMENT, CLUSTER, "sglang", first_moe_layer=first_moe_layer)
    data = json.loads(path.read_text())  # SGLang: json.loads(Path(data).read_text())
    check_sglang(data, PLACEMENT, CLUSTER, first_moe_layer)
    assert read_sglang_mapping(path, first_moe_layer=first_moe_layer).same_as(PLACEMENT)


def test_sglang_pt_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "loc.pt"
    write_placement(path, PLACEMENT, CLUSTER, "sglang", first_moe_layer=1)
    data = torch.load(path, weights_only=True)  # SGLang: torch.load(data, weights_only=True)
    assert data["physical_to_logical_map"].dtype == torch.int64
    check_sglang({k: v.numpy() for k, v in data.items()}, PLACEMENT, CLUSTER, 1)
    assert read_sglang_mapping(path, first_moe_layer=1).same_as(PLACEMENT)


@pytest.mark.parametrize("first_moe_layer", [0, 3])
def test_trtllm_yaml_round_trip(tmp_path, first_moe_layer):
    path = tmp_path / "lb.yaml"
    write_placement(path, PLACEMENT, CLUSTER, "trtllm", first_moe_layer=first_moe_layer)
    text = path.read_text()
    check_trtllm(parse_lb_yaml(text), PLACEMENT, CLUSTER, first_moe_layer)
    placement, layer_ids = read_trtllm_config(path)
    assert placement.same_as(PLACEMENT) and layer_ids == [first_moe_layer, first_moe_layer + 1]


def test_trtllm_yaml_reads_with_a_yaml_library(tmp_path):
    yaml = pytest.importorskip("yaml")  # TensorRT-LLM reads the file with PyYAML
    path = tmp_path / "lb.yml"
    write_placement(path, PLACEMENT, CLUSTER, "trtllm", first_moe_layer=3)
    config = yaml.safe_load(path.read_text())
    check_trtllm(config, PLACEMENT, CLUSTER, 3)
    assert config == parse_lb_yaml(path.read_text())


def test_vllm_ascend_round_trip(tmp_path):
    path = tmp_path / "map.json"
    write_placement(path, PLACEMENT, CLUSTER, "vllm-ascend")
    check_vllm_ascend(json.loads(path.read_text()), PLACEMENT, CLUSTER)
    assert read_vllm_ascend_expert_map(path).same_as(PLACEMENT)


def test_json_format_is_our_placement_file(tmp_path):
    write_placement(tmp_path / "p.json", PLACEMENT, CLUSTER, "json", policy={"name": "hand"})
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["policy"] == {"name": "hand"} and data["layers"][1]["phy2log"] == PHY2LOG_LR[1].tolist()


# ---------------------------------------------------------------- bad input: one ValueError, no file

def assert_refused(tmp_path, name, placement, fmt, message, **kwargs):
    with pytest.raises(ValueError, match=message):
        write_placement(tmp_path / name, placement, CLUSTER, fmt, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_vllm_ascend_refuses_an_expert_twice_on_a_device(tmp_path):
    twice = PHY2LOG_LR.copy()
    twice[1, 1] = 7  # GPU 0 of layer 1: [7, 7, 1]; expert 0 keeps no slot -> move it to slot 9
    twice[1, 9] = 0
    assert_refused(tmp_path, "map.json", Placement.even(twice, NUM_EXPERTS), "vllm-ascend",
                   r"layer 1 puts expert 7 on device 0 twice")


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "json"])
def test_every_format_refuses_a_missing_expert(tmp_path, fmt):
    missing = PHY2LOG_LR.copy()
    missing[0, 8] = 0  # expert 5 of layer 0 loses its only slot
    suffix = {"eplb": ".npz", "trtllm": ".yaml"}.get(fmt, ".json")
    assert_refused(tmp_path, "out" + suffix, Placement.even(missing, NUM_EXPERTS), fmt,
                   rf"--format {fmt}: expert 5 of layer 0 has no replica")


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_refuses_another_clusters_placement(tmp_path, fmt):
    other = Cluster(num_nodes=1, gpus_per_node=4, slots_per_gpu=4)
    suffix = {"eplb": ".npz", "trtllm": ".yaml"}.get(fmt, ".json")
    with pytest.raises(ValueError, match=r"12 slots per layer, cluster 'custom' has 16"):
        write_placement(tmp_path / ("p" + suffix), PLACEMENT, other, fmt)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("name", "fmt", "kwargs", "message"), [
    ("p.json", "eplb", {}, r"--format eplb is written to a \.npz or \.pt file"),
    ("p.npz", "trtllm", {}, r"--format trtllm is written to a \.yaml or \.yml file"),
    ("p.yaml", "vllm-ascend", {}, r"\.json file"),
    ("p.json", "parquet", {}, "unknown placement format 'parquet'"),
    ("p.npz", "eplb", {"first_moe_layer": 3}, "first_moe_layer is for --format sglang or trtllm"),
    ("p.json", "sglang", {"first_moe_layer": -1}, "first_moe_layer must be a non-negative integer, got -1"),
    ("p.yaml", "trtllm", {"first_moe_layer": 1.5}, "first_moe_layer must be a non-negative integer"),
])
def test_bad_arguments(tmp_path, name, fmt, kwargs, message):
    assert_refused(tmp_path, name, PLACEMENT, fmt, message, **kwargs)


def test_readers_refuse_what_the_loaders_refuse(tmp_path):
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"physical_to_logical_map": PHY2LOG_LR.tolist(), "logical_count": [[1]]}))
    with pytest.raises(ValueError, match="takes only physical_to_logical_map"):
        read_sglang_mapping(extra)
    with pytest.raises(TypeError):  # what SGLang itself would do with that dict
        init_by_mapping(None, None, **json.loads(extra.read_text()))
    ragged = tmp_path / "ragged.json"
    ragged.write_text(json.dumps({"moe_layer_count": 1, "layer_list": [{"layer_id": 0, "device_count": 2,
                                  "device_list": [{"device_id": 0, "device_expert": [0, 1]},
                                                  {"device_id": 1, "device_expert": [2]}]}]}))
    with pytest.raises(ValueError, match=re.escape("devices hold different numbers of experts [1, 2]")):
        read_vllm_ascend_expert_map(ragged)
    no_count = tmp_path / "no_count.json"
    no_count.write_text(json.dumps({"layer_list": []}))
    with pytest.raises(ValueError, match="not a vllm-ascend expert map"):
        read_vllm_ascend_expert_map(no_count)
    garbage = tmp_path / "lb.yaml"
    garbage.write_text("num_slots: 12\ninitial_global_assignments:\n  3: {a: 1}\n")
    with pytest.raises(ValueError, match="line 3: not a line of the load-balancer YAML"):
        read_trtllm_config(garbage)
    short = tmp_path / "short.yaml"
    short.write_text("num_slots: 12\nlayer_updates_per_iter: 0\ninitial_global_assignments:\n  0: [0, 1, 2]\n")
    with pytest.raises(ValueError, match="3 slots per layer, num_slots 12"):
        read_trtllm_config(short)
