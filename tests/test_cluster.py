"""Cluster: presets, derived counts, validation, and loading from presets, TOML and JSON files."""

from __future__ import annotations

import json

import pytest

from symi_sim.cluster import PRESETS, Cluster, available_clusters, load_cluster


def test_paper_preset_matches_the_testbed() -> None:
    c = load_cluster("paper-a100-16")
    assert (c.num_nodes, c.gpus_per_node, c.slots_per_gpu, c.nic_gbps, c.nics_per_node) == (16, 1, 4, 100.0, 1)
    assert c.pcie_gbps == 256.0   # PCIe 4.0 at 32 GB/s = 256 Gb/s
    assert c.num_gpus == 16 and c.num_slots == 64
    assert c.achieved_flops == pytest.approx(312e12 * 0.4)


def test_presets() -> None:
    assert available_clusters() == sorted(PRESETS) == ["cpu-4", "h100-2048", "h100-8x8", "paper-a100-16"]
    assert load_cluster("h100-2048").num_gpus == 2048 and load_cluster("h100-2048").num_slots == 10240
    assert load_cluster("h100-8x8").num_slots == 320
    assert load_cluster("cpu-4").num_gpus == 4
    for name, cluster in PRESETS.items():
        assert cluster.name == name and load_cluster(name) == cluster


def test_slot_gpu_node_mapping() -> None:
    c = Cluster(num_nodes=2, gpus_per_node=3, slots_per_gpu=2)
    assert [c.gpu_of_slot(p) for p in range(12)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert [c.node_of_gpu(g) for g in range(6)] == [0, 0, 0, 1, 1, 1]


def test_check_experts() -> None:
    c = Cluster(num_nodes=1, gpus_per_node=2, slots_per_gpu=3)
    c.check_experts(6)
    with pytest.raises(ValueError, match=r"impossible cluster: 7 experts .* 2 GPUs x 3 slots = 6 slots"):
        c.check_experts(7)


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_nodes", 0), ("gpus_per_node", -1), ("slots_per_gpu", 2.0), ("nics_per_node", True),
     ("nic_gbps", 0.0), ("pcie_gbps", -3), ("gpu_peak_flops", float("inf")), ("intra_node_gbps", "fast"),
     ("gpu_memory_bytes", float("nan")), ("link_latency_s", -1e-6), ("compute_efficiency", 0.0),
     ("compute_efficiency", 1.5)],
)
def test_invalid_fields_raise(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        Cluster(**{field: value})


def test_with_and_to_dict() -> None:
    c = load_cluster("paper-a100-16")
    d = c.with_(slots_per_gpu=2)
    assert d.num_slots == 32 and c.num_slots == 64
    with pytest.raises(ValueError, match="slots_per_gpu"):
        c.with_(slots_per_gpu=0)
    assert Cluster(**c.to_dict()) == c


def test_overrides() -> None:
    c = load_cluster("paper-a100-16", slots_per_gpu=2, nic_gbps=None)
    assert c.slots_per_gpu == 2 and c.nic_gbps == 100.0 and c.name == "paper-a100-16"
    with pytest.raises(ValueError, match=r"unknown cluster field\(s\) \['slots'\]; valid fields: .*slots_per_gpu"):
        load_cluster("cpu-4", slots=2)
    with pytest.raises(ValueError, match="num_nodes must be a positive integer, got 'two'"):
        load_cluster("cpu-4", num_nodes="two")


def test_unknown_names_and_paths(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"unknown cluster 'paper'.*cpu-4, h100-2048, h100-8x8, paper-a100-16"):
        load_cluster("paper")
    with pytest.raises(ValueError, match="does not exist"):
        load_cluster(tmp_path / "nope.toml")
    (tmp_path / "c.yaml").write_text("num_nodes: 2\n")
    with pytest.raises(ValueError, match=r"\.toml/\.json"):
        load_cluster(tmp_path / "c.yaml")


def test_toml_file_with_base_and_table(tmp_path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('[cluster]\nbase = "paper-a100-16"\nslots_per_gpu = 2\nnic_gbps = 200.0\n')
    c = load_cluster(path)
    assert c.slots_per_gpu == 2 and c.nic_gbps == 200.0
    assert c.num_nodes == 16 and c.pcie_gbps == 256.0   # the rest from the base preset
    assert load_cluster(str(path), num_nodes=4).num_slots == 8
    path.write_text('[cluster]\nbase = "cpu-4"\nname = "lab"\n')
    assert load_cluster(path).name == "lab"


def test_file_based_on_a_preset_is_named_after_the_file(tmp_path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('base = "paper-a100-16"\nslots_per_gpu = 2\n')
    assert load_cluster(path).name == "mine"


def test_json_file_top_level(tmp_path) -> None:
    path = tmp_path / "lab.json"
    path.write_text(json.dumps({"name": "lab", "num_nodes": 2, "gpus_per_node": 4, "slots_per_gpu": 3}))
    c = load_cluster(path)
    assert (c.name, c.num_gpus, c.num_slots) == ("lab", 8, 24)
    assert c.nic_gbps == Cluster().nic_gbps   # unspecified fields take the dataclass defaults


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.toml", "num_nodes = [", "cannot be parsed"),
        ("bad.json", "{", "cannot be parsed"),
        ("list.json", "[1, 2]", "must hold a table/object"),
        ("field.toml", "nodes = 2\n", r"unknown field\(s\) \['nodes'\]"),
        ("base.toml", 'base = "dgx"\n', "base 'dgx' is not a preset"),
        ("value.json", '{"num_nodes": 0}', "num_nodes must be a positive integer, got 0"),
    ],
)
def test_bad_files(tmp_path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_cluster(path)
    if "cannot be parsed" in message or "unknown field" in message or "table" in message:
        assert name in str(info.value)
