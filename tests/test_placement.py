"""Placement: the EPLB triple by hand, shares, validation errors, moves, JSON and EPLB-array I/O."""

from __future__ import annotations

import json

import numpy as np
import pytest

from symi_sim.cluster import Cluster
from symi_sim.placement import Placement, read_placement_json, write_placement_json
from symi_sim.placement_formats import write_placement

# 2 layers, 3 experts, 6 slots
PHY2LOG_LR = np.array([[2, 0, 0, 1, 2, 0], [1, 1, 1, 1, 0, 2]])
CLUSTER = Cluster(num_nodes=1, gpus_per_node=3, slots_per_gpu=2)


def test_even_counts_and_shares() -> None:
    p = Placement.even(PHY2LOG_LR, 3)
    assert p.logcnt_LE.tolist() == [[3, 1, 2], [1, 4, 1]]
    np.testing.assert_allclose(p.share_LR, [[1 / 2, 1 / 3, 1 / 3, 1, 1 / 2, 1 / 3], [1 / 4] * 4 + [1, 1]])
    assert p.num_layers == 2 and p.num_slots == 6 and p.shadow_LE is None
    assert p.gpu_of_slot(2).tolist() == [0, 0, 1, 1, 2, 2]
    p.validate(CLUSTER, num_layers=2)


def test_eplb_triple_by_hand() -> None:
    p = Placement.even(PHY2LOG_LR, 3)
    assert p.replica_rank_LR.tolist() == [[0, 0, 1, 0, 1, 2], [0, 1, 2, 3, 0, 0]]
    assert p.log2phy_LEX.tolist() == [
        [[1, 2, 5, -1], [3, -1, -1, -1], [0, 4, -1, -1]],
        [[4, -1, -1, -1], [0, 1, 2, 3], [5, -1, -1, -1]],
    ]
    arrays = p.eplb_arrays()
    assert sorted(arrays) == ["log2phy", "logcnt", "phy2log"]
    assert all(a.dtype == np.int64 for a in arrays.values())
    np.testing.assert_array_equal(arrays["phy2log"], PHY2LOG_LR)


@pytest.mark.parametrize("seed", range(10))
def test_eplb_triple_consistent(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_experts, num_slots = 5, 12
    phy2log_LR = np.stack([rng.permutation(np.r_[np.arange(num_experts), rng.integers(0, num_experts, 7)])
                           for _ in range(3)])
    p = Placement.even(phy2log_LR, num_experts)
    log2phy = p.log2phy_LEX
    for layer in range(3):
        for e in range(num_experts):
            slots = log2phy[layer, e][log2phy[layer, e] >= 0]
            assert slots.tolist() == np.flatnonzero(phy2log_LR[layer] == e).tolist()   # replica-rank = slot order
            assert len(slots) == p.logcnt_LE[layer, e]
            assert (log2phy[layer, e, len(slots):] == -1).all()
            assert p.replica_rank_LR[layer, slots].tolist() == list(range(len(slots)))
    assert log2phy.shape[2] == p.logcnt_LE.max()
    assert (p.logcnt_LE.sum(axis=1) == num_slots).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"phy2log_LR": np.array([0, 1]), "share_LR": np.ones(2)}, "2-D"),
        ({"phy2log_LR": np.array([[0.0, 1.0]]), "share_LR": np.ones((1, 2))}, "integers"),
        ({"phy2log_LR": np.array([[0, 3]]), "share_LR": np.ones((1, 2))}, r"outside \[0, 3\)"),
        ({"phy2log_LR": np.array([[0, -1]]), "share_LR": np.ones((1, 2))}, "outside"),
        ({"phy2log_LR": np.array([[0, 1]]), "share_LR": np.ones((1, 3))}, "share shape"),
        ({"phy2log_LR": np.array([[0, 1]]), "share_LR": np.ones((1, 2)), "shadow_LE": np.ones((1, 2))}, "shadow"),
    ],
)
def test_constructor_rejects_bad_arrays(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Placement(num_experts=3, **kwargs)


def test_validate_errors() -> None:
    with pytest.raises(ValueError, match="expert 2 of layer 0 has no replica"):
        Placement.even(np.array([[0, 1, 1, 0, 1, 0]]), 3).validate()
    bad_share = Placement(np.array([[0, 0, 1]]), np.array([[0.5, 0.4, 1.0]]), 2)
    with pytest.raises(ValueError, match="shares of expert 0 in layer 0 sum to 0.900000"):
        bad_share.validate()
    with pytest.raises(ValueError, match="finite and non-negative"):
        Placement(np.array([[0, 0, 1]]), np.array([[1.5, -0.5, 1.0]]), 2).validate()
    with pytest.raises(ValueError, match="finite"):
        Placement(np.array([[0, 0, 1]]), np.array([[np.nan, 0.5, 1.0]]), 2).validate()
    p = Placement.even(PHY2LOG_LR, 3)
    with pytest.raises(ValueError, match="2 layers, expected 3"):
        p.validate(num_layers=3)
    with pytest.raises(ValueError, match="6 slots per layer, cluster 'custom' has 8"):
        p.validate(CLUSTER.with_(gpus_per_node=4))
    # uneven shares that sum to 1 are fine
    Placement(np.array([[0, 0, 1]]), np.array([[0.7, 0.3, 1.0]]), 2).validate()


def test_replica_moves_and_same_as() -> None:
    p = Placement.even(PHY2LOG_LR, 3)
    q = Placement.even(np.array([[2, 0, 0, 1, 2, 0], [1, 0, 1, 1, 1, 2]]), 3)
    assert q.replica_moves(p).tolist() == [0, 2]
    assert p.replica_moves(None).tolist() == [6, 6]
    assert p.same_as(Placement.even(PHY2LOG_LR.copy(), 3))
    assert not p.same_as(q)
    uneven = Placement(PHY2LOG_LR, p.share_LR * np.where(np.arange(6) == 1, 1.5, 1.0), 3)
    assert not p.same_as(uneven)
    shadowed = Placement.even(PHY2LOG_LR, 3, shadow_LE=np.array([[True, False, False], [False] * 3]))
    assert not p.same_as(shadowed) and not shadowed.same_as(p)
    assert shadowed.same_as(Placement.even(PHY2LOG_LR, 3, shadow_LE=shadowed.shadow_LE.copy()))
    assert not p.same_as(Placement.even(PHY2LOG_LR, 4))


def test_json_round_trip(tmp_path) -> None:
    share_LR = np.array([[0.5, 0.2, 0.3, 1.0, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4, 1.0, 1.0]])
    shadow_LE = np.array([[False, True, False], [False, False, False]])
    p = Placement(PHY2LOG_LR, share_LR, 3, shadow_LE)
    path = tmp_path / "placement.json"
    write_placement_json(path, p, CLUSTER, {"name": "test", "threshold": np.float64(1.5)})
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1 and data["num_experts"] == 3
    assert data["layers"][0] == {"phy2log": [2, 0, 0, 1, 2, 0], "logcnt": [3, 1, 2],
                                 "share": [0.5, 0.2, 0.3, 1.0, 0.5, 0.5], "shadow": [1]}
    assert data["cluster"]["gpus_per_node"] == 3 and data["policy"] == {"name": "test", "threshold": 1.5}
    back = read_placement_json(path)
    assert back.same_as(p)
    assert back.shadow_LE.tolist() == shadow_LE.tolist()
    plain = Placement.even(PHY2LOG_LR, 3)
    assert "shadow" not in plain.to_json_dict()["layers"][0]
    assert Placement.from_json_dict(json.loads(json.dumps(plain.to_json_dict()))).same_as(plain)
    assert [f.name for f in tmp_path.iterdir()] == ["placement.json"]   # no temporary file left behind


def test_json_errors(tmp_path) -> None:
    good = Placement.even(PHY2LOG_LR, 3).to_json_dict()
    with pytest.raises(ValueError, match="schema_version 2"):
        Placement.from_json_dict({**good, "schema_version": 2})
    with pytest.raises(ValueError, match="malformed"):
        Placement.from_json_dict({k: v for k, v in good.items() if k != "num_experts"})
    wrong_cnt = json.loads(json.dumps(good))
    wrong_cnt["layers"][1]["logcnt"] = [2, 3, 1]
    with pytest.raises(ValueError, match="layer 1: logcnt does not match"):
        Placement.from_json_dict(wrong_cnt)
    bad_share = json.loads(json.dumps(good))
    bad_share["layers"][0]["share"][0] = 0.9
    with pytest.raises(ValueError, match="shares of expert 2"):
        Placement.from_json_dict(bad_share)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        read_placement_json(broken)
    with pytest.raises(ValueError, match="missing.json"):
        read_placement_json(tmp_path / "missing.json")
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**good, "schema_version": 0}))
    with pytest.raises(ValueError, match=r"old.json.*schema_version"):
        read_placement_json(old)


def test_eplb_npz_round_trip(tmp_path) -> None:
    p = Placement.even(PHY2LOG_LR, 3)
    write_placement(tmp_path / "p.npz", p, CLUSTER, fmt="eplb")
    with np.load(tmp_path / "p.npz") as data:
        assert data["phy2log"].tolist() == PHY2LOG_LR.tolist()
        assert data["logcnt"].tolist() == [[3, 1, 2], [1, 4, 1]]
        assert data["log2phy"].tolist() == p.log2phy_LEX.tolist()
    with pytest.raises(ValueError, match=r"\.npz or \.pt"):
        write_placement(tmp_path / "p.csv", p, CLUSTER, fmt="eplb")
