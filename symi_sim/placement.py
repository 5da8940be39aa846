"""Placement: which logical expert every physical slot holds, and how an expert's tokens split over its replicas.

Legend: L MoE layers, E logical experts, R physical slots (= GPUs x slots_per_gpu), X max replicas of one expert.

The EPLB triple keeps DeepSeek EPLB's meanings:
  phy2log_LR[l, p]   logical expert held by slot p
  log2phy_LEX[l, e]  slots holding expert e, in replica-rank order, padded with -1
  logcnt_LE[l, e]    number of replicas of expert e
plus ours:
  share_LR[l, p]     fraction of its expert's tokens slot p takes (even split = 1 / logcnt)
  shadow_LE[l, e]    FasterMoE-style shadowed experts: weights broadcast to every GPU, their tokens are computed
                     on the GPU they come from (spread evenly over GPUs), outside the slots; None if unused.
  live_shares        False (planned shares): `share_LR` is the split every step served by this placement uses.
                     True (a policy's `shares=live`): `share_LR` is only a default; the routing of each step splits
                     every expert's tokens over its replicas from that step's own counts (symi_sim.live_shares:
                     the busiest GPU's load minimised, fewest drops first under a capacity), so the shares that
                     apply are the ones the step's counts give, not these. The replicas (phy2log) are fixed either
                     way. In JSON: a top-level "shares": "live" (absent: planned).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from symi_sim.cluster import Cluster
from symi_sim.outputs import atomic_file, write_json

SCHEMA_VERSION = 1
SHARE_TOL = 1e-6
SHARE_MODES = ("planned", "live")


@dataclass(frozen=True, eq=False)
class Placement:
    phy2log_LR: np.ndarray
    share_LR: np.ndarray
    num_experts: int
    shadow_LE: np.ndarray | None = None
    live_shares: bool = False
    logcnt_LE: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        phy2log = np.asarray(self.phy2log_LR)
        if phy2log.ndim != 2:
            raise ValueError(f"phy2log must be 2-D [layers, slots], got shape {phy2log.shape}")
        if not np.issubdtype(phy2log.dtype, np.integer):
            raise ValueError(f"phy2log must hold integers, got dtype {phy2log.dtype}")
        if phy2log.size and (phy2log.min() < 0 or phy2log.max() >= self.num_experts):
            raise ValueError(
                f"phy2log holds expert ids outside [0, {self.num_experts}): "
                f"min {phy2log.min()}, max {phy2log.max()}"
            )
        share = np.asarray(self.share_LR, dtype=np.float64)
        if share.shape != phy2log.shape:
            raise ValueError(f"share shape {share.shape} != phy2log shape {phy2log.shape}")
        object.__setattr__(self, "phy2log_LR", phy2log.astype(np.int64, copy=False))
        object.__setattr__(self, "share_LR", share)
        logcnt = _count_per_expert(self.phy2log_LR, self.num_experts)
        object.__setattr__(self, "logcnt_LE", logcnt)
        if self.shadow_LE is not None:
            shadow = np.asarray(self.shadow_LE, dtype=bool)
            if shadow.shape != logcnt.shape:
                raise ValueError(f"shadow shape {shadow.shape} != [layers, experts] {logcnt.shape}")
            object.__setattr__(self, "shadow_LE", shadow)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def even(cls, phy2log_LR: np.ndarray, num_experts: int, shadow_LE: np.ndarray | None = None) -> Placement:
        """A placement whose experts split their tokens evenly over their replicas."""
        phy2log_LR = np.asarray(phy2log_LR, dtype=np.int64)
        logcnt_LE = _count_per_expert(phy2log_LR, num_experts)
        cnt_LR = np.take_along_axis(logcnt_LE, phy2log_LR, axis=1)
        return cls(phy2log_LR, 1.0 / np.maximum(cnt_LR, 1), num_experts, shadow_LE)

    # ------------------------------------------------------------------ derived views
    @property
    def num_layers(self) -> int:
        return self.phy2log_LR.shape[0]

    @property
    def num_slots(self) -> int:
        return self.phy2log_LR.shape[1]

    @property
    def replica_rank_LR(self) -> np.ndarray:
        """[L, R] rank of slot p among the replicas of its expert (0 for the lowest slot index)."""
        order = np.argsort(self.phy2log_LR, axis=1, kind="stable")
        sorted_e = np.take_along_axis(self.phy2log_LR, order, axis=1)
        start_LE = np.cumsum(self.logcnt_LE, axis=1) - self.logcnt_LE
        rank_sorted = np.arange(self.num_slots)[None, :] - np.take_along_axis(start_LE, sorted_e, axis=1)
        rank = np.empty_like(rank_sorted)
        np.put_along_axis(rank, order, rank_sorted, axis=1)
        return rank

    @property
    def log2phy_LEX(self) -> np.ndarray:
        """[L, E, X] slots of every expert by replica rank, -1 padded (X = max replicas of any expert)."""
        max_cnt = int(self.logcnt_LE.max()) if self.logcnt_LE.size else 0
        out = np.full((self.num_layers, self.num_experts, max_cnt), -1, dtype=np.int64)
        layer_LR = np.broadcast_to(np.arange(self.num_layers)[:, None], self.phy2log_LR.shape)
        out[layer_LR, self.phy2log_LR, self.replica_rank_LR] = np.arange(self.num_slots)[None, :]
        return out

    def take_layers(self, layers: slice | np.ndarray) -> Placement:
        """The placement of the given layers (a slice or index array), same experts and share mode."""
        shadow = None if self.shadow_LE is None else self.shadow_LE[layers]
        return Placement(self.phy2log_LR[layers], self.share_LR[layers], self.num_experts, shadow,
                         live_shares=self.live_shares)

    def gpu_of_slot(self, slots_per_gpu: int) -> np.ndarray:
        """[R] GPU of every slot."""
        return np.arange(self.num_slots) // slots_per_gpu

    # ------------------------------------------------------------------ checks
    def validate(self, cluster: Cluster | None = None, num_layers: int | None = None) -> None:
        """Raise ValueError unless every expert has >= 1 replica, shares are a split, and shapes fit."""
        if num_layers is not None and self.num_layers != num_layers:
            raise ValueError(f"placement has {self.num_layers} layers, expected {num_layers}")
        if cluster is not None and self.num_slots != cluster.num_slots:
            raise ValueError(
                f"placement has {self.num_slots} slots per layer, cluster {cluster.name!r} has {cluster.num_slots}"
            )
        missing = np.argwhere(self.logcnt_LE < 1)
        if len(missing):
            layer, expert = missing[0]
            raise ValueError(f"expert {expert} of layer {layer} has no replica ({len(missing)} experts lack one)")
        if not np.all(np.isfinite(self.share_LR)) or (self.share_LR < 0).any():
            raise ValueError("shares must be finite and non-negative")
        total_LE = np.zeros(self.logcnt_LE.shape)
        layer_LR = np.broadcast_to(np.arange(self.num_layers)[:, None], self.phy2log_LR.shape)
        np.add.at(total_LE, (layer_LR, self.phy2log_LR), self.share_LR)
        bad = np.argwhere(np.abs(total_LE - 1.0) > SHARE_TOL)
        if len(bad):
            layer, expert = bad[0]
            raise ValueError(f"shares of expert {expert} in layer {layer} sum to {total_LE[layer, expert]:.6f}, not 1")

    def same_as(self, other: Placement) -> bool:
        shadows_equal = (self.shadow_LE is None and other.shadow_LE is None) or (
            self.shadow_LE is not None and other.shadow_LE is not None
            and np.array_equal(self.shadow_LE, other.shadow_LE)
        )
        return (
            self.num_experts == other.num_experts
            and np.array_equal(self.phy2log_LR, other.phy2log_LR)
            and np.allclose(self.share_LR, other.share_LR, rtol=0, atol=1e-12)
            and shadows_equal
            and self.live_shares == other.live_shares
        )

    def replica_moves(self, previous: Placement | None) -> np.ndarray:
        """[L] slots whose expert changed since `previous` (all slots when there is none)."""
        if previous is None:
            return np.full(self.num_layers, self.num_slots, dtype=np.int64)
        return (self.phy2log_LR != previous.phy2log_LR).sum(axis=1)

    # ------------------------------------------------------------------ I/O
    def to_json_dict(self, cluster: Cluster | None = None, policy: dict[str, Any] | None = None) -> dict[str, Any]:
        layers = []
        for layer in range(self.num_layers):
            entry: dict[str, Any] = {
                "phy2log": self.phy2log_LR[layer].tolist(),
                "logcnt": self.logcnt_LE[layer].tolist(),
                "share": [round(float(s), 12) for s in self.share_LR[layer]],
            }
            if self.shadow_LE is not None:
                entry["shadow"] = np.flatnonzero(self.shadow_LE[layer]).tolist()
            layers.append(entry)
        return {
            "schema_version": SCHEMA_VERSION,
            "num_experts": self.num_experts,
            "cluster": cluster.to_dict() if cluster is not None else None,
            "policy": policy,
            **shares_json(self.live_shares),
            "layers": layers,
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> Placement:
        try:
            if data.get("schema_version") != SCHEMA_VERSION:
                raise ValueError(f"unsupported schema_version {data.get('schema_version')!r}")
            num_experts = int(data["num_experts"])
            layers = data["layers"]
            phy2log = np.array([entry["phy2log"] for entry in layers], dtype=np.int64)
            share = np.array([entry["share"] for entry in layers], dtype=np.float64)
            live_shares = read_shares(data)
            shadow = None
            if any("shadow" in entry for entry in layers):
                shadow = np.zeros((len(layers), num_experts), dtype=bool)
                for layer, entry in enumerate(layers):
                    shadow[layer, entry.get("shadow", [])] = True
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"malformed placement JSON: {exc!r}") from None
        placement = cls(phy2log, share, num_experts, shadow, live_shares=live_shares)
        for layer, entry in enumerate(layers):
            if "logcnt" in entry and list(entry["logcnt"]) != placement.logcnt_LE[layer].tolist():
                raise ValueError(f"placement JSON layer {layer}: logcnt does not match phy2log")
        placement.validate()
        return placement

    def eplb_arrays(self) -> dict[str, np.ndarray]:
        """DeepSeek EPLB's return values as loaders hold them: phy2log [L, R], log2phy [L, E, R - E + 1] (-1
        padded), logcnt [L, E] (int64).

        log2phy is num_redundant + 1 = R - E + 1 wide, the most replicas any expert can have, as vLLM's port of
        eplb.py returns it (vllm/distributed/eplb/rebalance_algo.py @ 48dca59e) and its EplbState holds it;
        DeepSeek's eplb.py (@ 5791971) stops at max(logcnt) columns, so its array is ours without trailing -1s.
        """
        log2phy_LEX = self.log2phy_LEX
        width = self.num_slots - self.num_experts + 1
        padded_LEX = np.full((self.num_layers, self.num_experts, max(width, log2phy_LEX.shape[2])), -1, dtype=np.int64)
        padded_LEX[:, :, :log2phy_LEX.shape[2]] = log2phy_LEX
        return {"phy2log": self.phy2log_LR.copy(), "log2phy": padded_LEX, "logcnt": self.logcnt_LE.copy()}


def slot_holdings(phy2log_LR: np.ndarray, slots_per_gpu: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The holdings (an expert's slots on one GPU) slot by slot. [L, R] -> (head_LGS, rank_LGS, size_LGS), each
    [L, G, S]: the slot within its GPU of its holding's head (the lowest slot of that expert there), how many lower
    slots of its GPU hold its expert (0: it is the head), and how many slots its holding has."""
    num_layers, num_slots = phy2log_LR.shape
    p2l_LGS = phy2log_LR.reshape(num_layers, num_slots // slots_per_gpu, slots_per_gpu)
    same_LGSS = p2l_LGS[..., :, None] == p2l_LGS[..., None, :]
    return (np.argmax(same_LGSS, axis=-1), (same_LGSS & np.tri(slots_per_gpu, k=-1, dtype=bool)).sum(axis=-1),
            same_LGSS.sum(axis=-1))


def shares_json(live_shares: bool) -> dict[str, str]:
    """The share mode as a placement record carries it: {"shares": "live"}, or nothing for planned shares."""
    return {"shares": "live"} if live_shares else {}


def read_shares(record: dict[str, Any]) -> bool:
    """Whether a placement record (JSON object) splits live: its "shares" (absent: planned); ValueError otherwise."""
    shares = record.get("shares", "planned")
    if shares not in SHARE_MODES:
        raise ValueError(f"shares must be 'planned' or 'live', got {shares!r}")
    return shares == "live"


def write_placement_json(path: str | Path, placement: Placement, cluster: Cluster | None = None,
                         policy: dict[str, Any] | None = None) -> None:
    with atomic_file(path) as tmp:
        write_json(tmp, placement.to_json_dict(cluster, policy))


def read_placement_json(path: str | Path) -> Placement:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"placement file {str(path)!r} cannot be read: {exc}") from None
    try:
        return Placement.from_json_dict(data)
    except ValueError as exc:
        raise ValueError(f"placement file {str(path)!r}: {exc}") from None


def _count_per_expert(phy2log_LR: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E] replicas per expert."""
    num_layers = phy2log_LR.shape[0]
    offsets = (np.arange(num_layers, dtype=np.int64) * num_experts)[:, None]
    flat = np.bincount((phy2log_LR + offsets).ravel(), minlength=num_layers * num_experts)
    return flat.reshape(num_layers, num_experts).astype(np.int64)
