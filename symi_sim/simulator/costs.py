"""Pure cost formulas (numpy, no simpy): bytes each phase moves over which links, and how long that takes.

Legend: L MoE layers (any stack of rows works: the simulator passes steps x layers), E logical experts,
R physical slots, G GPUs, N nodes, H distinct (layer, expert, GPU) holdings.

Links: every node has `nics_per_node` NICs shared by its GPUs (inter-node traffic), every GPU an intra-node link
(NVLink / NVSwitch) and a PCIe link to host memory. Collectives are bulk-synchronous, so a phase lasts as long
as its busiest link: max over nodes of NIC bytes / node NIC bandwidth, and over GPUs of NVLink bytes / NVLink
bandwidth (both run at once), plus PCIe time where the phase uses host memory, plus alpha per message
(alpha-beta model; links are full duplex, a link's load is max(bytes out, bytes in)).

Expert state (gradient collection before the optimizer step, weight send-out after it) by optimizer layout:
  sharded  SYMI: every GPU owns 1/G of every expert's optimizer state. Each GPU holding an expert sends 1/G of
           its (partial) gradient to every owner, which sums them: the replica gradient sync is folded into
           this reduce-scatter. Each owner moves its E shards over PCIe (optimizer state in host memory).
           `accounting` says what one sender is:
             pairs  one distinct (expert, GPU) holding: slots of the same expert on one GPU sum locally first
                    (what an implementation does; with s distinct experts per GPU this is the paper's formula);
             paper  every slot, as the paper's cost analysis counts it: (s N - s)/N X per GPU over the network
                    whatever the placement, T = (E/N) X / BW_pcie + ((s N - s)/N) X / BW_net.
  group    DeepSpeed (ZeRO-1 within each expert's replica group): a reduce-scatter over the r GPUs holding the
           expert, then each moves its 1/r shard over PCIe: T = (E/N) X / BW_pcie + ((s N - E)/N) X / BW_net.
  replica  FlexMoE: every replica keeps its expert's full optimizer state; gradients are ring-all-reduced within
           the replica group (2 (r-1)/r X per holding; the reduce-scatter and all-gather halves that the
           group layout pays in its two phases), then every holding moves its full X over PCIe;
           its weights come back over PCIe only (no network send-out); moving a replica moves its weights +
           optimizer state (migration_bytes).
  group and replica count distinct holdings whatever `accounting` says: DeepSpeed places an expert's replicas
  on distinct GPUs, where that is the paper's static formula.
Weight send-out is the collection in reverse (same bytes), to the next step's placement (replica: PCIe only).
Latency (alpha) per phase: G - 1 messages for sharded (a pairwise exchange with every other GPU, as the token
all-to-all), r - 1 for group (a ring step per other member of the largest replica group), 2 (r - 1) for replica.

Optimizer location (`location`), one choice for every layout: "host" (the state in host memory, as the paper
keeps SYMI's shards and as its cost formulas charge DeepSpeed too): every layout moves gradients down and weights
up over PCIe, E X / G (sharded), X / r (group) or X (replica) per holding; "gpu": no layout touches PCIe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from symi_sim.checks import check_choice, check_number
from symi_sim.cluster import BYTES_PER_GBPS, Cluster
from symi_sim.policies.base import OPTIMIZER_LAYOUTS

POPULARITY_BYTES_PER_EXPERT = 4  # int32 token counts
OPTIMIZER_LOCATIONS = ("host", "gpu")
EXPERT_STATE_ACCOUNTINGS = ("pairs", "paper")
EXPERT_STATE_PHASES = ("collect", "sendout")


def bytes_time_s(num_bytes: float | np.ndarray, gbps: float, latency_s: float = 0.0) -> float | np.ndarray:
    """Alpha-beta transfer time: latency_s + bytes / bandwidth, and 0 when nothing moves."""
    check_number(gbps, "bandwidth (Gb/s)", low=0, low_open=True)
    num_bytes = np.asarray(num_bytes, dtype=np.float64)
    time_s = np.where(num_bytes > 0, latency_s + num_bytes / (gbps * BYTES_PER_GBPS), 0.0)
    return float(time_s) if time_s.ndim == 0 else time_s


@dataclass(frozen=True)
class LinkBytes:
    """Bytes one phase moves in every layer, per link (a link's load is max(bytes out, bytes in))."""

    nic_LN: np.ndarray       # through each node's NICs (all of them together)
    nvlink_LG: np.ndarray    # over each GPU's intra-node link
    pcie_LG: np.ndarray      # over each GPU's PCIe link
    network_L: np.ndarray    # bytes sent over NICs and NVLink by all GPUs together (what the tables report)
    messages: int            # messages on the critical path (alpha terms)

    def time_L(self, cluster: Cluster) -> np.ndarray:
        """[L] phase time: the busiest NIC or NVLink plus latency, then PCIe (the paper's sum)."""
        return self.network_time_L(cluster) + self.pcie_time_L(cluster)

    def network_time_L(self, cluster: Cluster) -> np.ndarray:
        """[L] the busiest NIC or NVLink (they run at once), plus latency when anything moves."""
        moves = (self.network_L > 0) | (self.pcie_LG.max(axis=1, initial=0.0) > 0)
        return self.busiest_link_s(cluster) + np.where(moves, self.messages * cluster.link_latency_s, 0.0)

    def busiest_link_s(self, cluster: Cluster) -> np.ndarray:
        """[L] the busiest NIC or NVLink at full bandwidth, without latency."""
        nic_s = self.nic_LN.max(axis=1, initial=0.0) / (cluster.nics_per_node * cluster.nic_gbps * BYTES_PER_GBPS)
        nvlink_s = self.nvlink_LG.max(axis=1, initial=0.0) / (cluster.intra_node_gbps * BYTES_PER_GBPS)
        return np.maximum(nic_s, nvlink_s)

    def pcie_time_L(self, cluster: Cluster) -> np.ndarray:
        """[L] the busiest PCIe link."""
        return self.pcie_LG.max(axis=1, initial=0.0) / (cluster.pcie_gbps * BYTES_PER_GBPS)

    @property
    def pcie_L(self) -> np.ndarray:
        """[L] bytes over all GPUs' PCIe links together."""
        return self.pcie_LG.sum(axis=1)

    def scaled(self, factor: float) -> LinkBytes:
        """The same transfers with every byte count times `factor` (the same messages)."""
        return LinkBytes(self.nic_LN * factor, self.nvlink_LG * factor, self.pcie_LG * factor,
                         self.network_L * factor, self.messages)


def _empty(num_rows: int, cluster: Cluster) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.zeros((num_rows, cluster.num_nodes)), np.zeros((num_rows, cluster.num_gpus)),
            np.zeros((num_rows, cluster.num_gpus)))


def alltoall_bytes(recv_tokens_LG: np.ndarray, cluster: Cluster, token_bytes: float) -> LinkBytes:
    """One all-to-all: GPU g receives recv_tokens_LG[l, g] tokens, each of `token_bytes`.

    Sources are spread uniformly over the GPUs: GPU g gets recv/G tokens from every GPU, itself included (that
    share stays local). Node n's NICs carry what enters it, node_recv (G - gpn)/G, and what leaves it,
    gpn (total - node_recv)/G. O(G) per layer. Pairwise exchange: G - 1 messages.
    """
    recv_LG = np.asarray(recv_tokens_LG, dtype=np.float64) * token_bytes
    num_rows = recv_LG.shape[0]
    num_gpus, gpn = cluster.num_gpus, cluster.gpus_per_node
    if recv_LG.shape[1] != num_gpus:
        raise ValueError(f"receive counts cover {recv_LG.shape[1]} GPUs, cluster has {num_gpus}")
    total_L = recv_LG.sum(axis=1)
    node_recv_LN = recv_LG.reshape(num_rows, cluster.num_nodes, gpn).sum(axis=2)
    nic_in_LN = node_recv_LN * (num_gpus - gpn) / num_gpus
    nic_out_LN = gpn * (total_L[:, None] - node_recv_LN) / num_gpus
    nvlink_in_LG = recv_LG * (gpn - 1) / num_gpus
    nvlink_out_LG = (np.repeat(node_recv_LN, gpn, axis=1) - recv_LG) / num_gpus
    return LinkBytes(
        nic_LN=np.maximum(nic_in_LN, nic_out_LN),
        nvlink_LG=np.maximum(nvlink_in_LG, nvlink_out_LG),
        pcie_LG=np.zeros_like(recv_LG),
        network_L=total_L * (num_gpus - 1) / num_gpus,
        messages=num_gpus - 1,
    )


def allreduce_bytes(num_bytes_L: np.ndarray | float, cluster: Cluster) -> LinkBytes:
    """A ring all-reduce of `num_bytes` over all GPUs: every GPU sends and receives 2 (G-1)/G x bytes.

    The ring crosses each node boundary once, so a node's NICs carry 2 (G-1)/G x bytes too (intra-node ring
    edges use NVLink). Latency as the tree algorithm NCCL picks for small messages: 2 ceil(log2 G) messages.
    """
    num_bytes_L = np.atleast_1d(np.asarray(num_bytes_L, dtype=np.float64))
    num_gpus = cluster.num_gpus
    nic_LN, nvlink_LG, pcie_LG = _empty(num_bytes_L.size, cluster)
    per_gpu_L = 2 * (num_gpus - 1) / num_gpus * num_bytes_L
    if cluster.num_nodes > 1:
        nic_LN += per_gpu_L[:, None]
    if cluster.gpus_per_node > 1:
        nvlink_LG += per_gpu_L[:, None]
    return LinkBytes(nic_LN, nvlink_LG, pcie_LG, per_gpu_L * num_gpus,
                     messages=2 * math.ceil(math.log2(num_gpus)) if num_gpus > 1 else 0)


def broadcast_bytes(num_bytes_L: np.ndarray, cluster: Cluster) -> LinkBytes:
    """A (pipelined tree) broadcast of `num_bytes` from one GPU to all: every node receives one copy over its
    NICs and shares it over NVLink; the reduction back to the owner moves the same bytes the other way."""
    num_bytes_L = np.asarray(num_bytes_L, dtype=np.float64)
    nic_LN, nvlink_LG, pcie_LG = _empty(num_bytes_L.size, cluster)
    if cluster.num_nodes > 1:
        nic_LN += num_bytes_L[:, None]
    if cluster.gpus_per_node > 1:
        nvlink_LG += num_bytes_L[:, None]
    num_gpus = cluster.num_gpus
    return LinkBytes(nic_LN, nvlink_LG, pcie_LG, num_bytes_L * (num_gpus - 1),
                     messages=math.ceil(math.log2(num_gpus)) if num_gpus > 1 else 0)


def expert_state_bytes(phy2log_LR: np.ndarray, cluster: Cluster, num_experts: int, layout: str,
                       expert_bytes: float, *, location: str = "host", accounting: str = "pairs",
                       phase: str = "collect") -> LinkBytes:
    """Gradient collection (phase "collect") or weight send-out ("sendout") bytes of every layer for a placement.

    phy2log_LR: [L, R] expert of every slot; expert_bytes: X, one expert's gradient (or weight) bytes.
    location: where the optimizer state lives ("host" | "gpu"); accounting: what one sharded sender is ("pairs" |
    "paper"). See the module docstring for the layouts. Messages on the critical path: G - 1 for the sharded
    layout's exchange with every other GPU (pairwise, like the all-to-all), r - 1 for the group layout's ring
    reduce-scatter (or all-gather) within the largest replica group of r GPUs, 2 (r - 1) for the replica
    layout's ring all-reduce.
    """
    check_choice(layout, "optimizer layout", OPTIMIZER_LAYOUTS)
    check_choice(location, "optimizer location", OPTIMIZER_LOCATIONS)
    check_choice(accounting, "expert-state accounting", EXPERT_STATE_ACCOUNTINGS)
    check_choice(phase, "expert-state phase", EXPERT_STATE_PHASES)
    phy2log_LR = np.asarray(phy2log_LR, dtype=np.int64)
    num_rows, num_slots = phy2log_LR.shape
    num_gpus, gpn, num_nodes = cluster.num_gpus, cluster.gpus_per_node, cluster.num_nodes
    if num_slots != cluster.num_slots:
        raise ValueError(f"placement has {num_slots} slots per layer, cluster {cluster.name!r} has {cluster.num_slots}")
    x = float(expert_bytes)
    pcie_x = x if location == "host" else 0.0
    if layout == "sharded":
        if accounting == "paper":
            holdings_LG = np.full((num_rows, num_gpus), float(cluster.slots_per_gpu))
        else:
            layer_H, _, gpu_H = holdings(phy2log_LR, cluster)
            holdings_LG = np.bincount(layer_H * num_gpus + gpu_H, minlength=num_rows * num_gpus).reshape(
                num_rows, num_gpus).astype(float)
        return _sharded_bytes(holdings_LG, cluster, num_experts, x, pcie_x)
    layer_H, expert_H, gpu_H = holdings(phy2log_LR, cluster)
    le_H = layer_H * num_experts + expert_H
    lg_H = layer_H * num_gpus + gpu_H
    size = num_rows * num_gpus
    holders_H = np.bincount(le_H, minlength=num_rows * num_experts)[le_H].astype(float)
    # group: each holding moves its 1/r shard over PCIe; replica: its full copy
    pcie_H = pcie_x / holders_H if layout == "group" else np.full(le_H.size, pcie_x)
    pcie_LG = np.bincount(lg_H, weights=pcie_H, minlength=size).reshape(num_rows, num_gpus)
    if layout == "replica" and phase == "sendout":
        # every replica updated its own weights: they only come back from the optimizer state over PCIe
        nic_LN, nvlink_LG, _ = _empty(num_rows, cluster)
        return LinkBytes(nic_LN, nvlink_LG, pcie_LG, np.zeros(num_rows), messages=0)
    # collectives within each expert's holders, symmetric (bytes in = bytes out)
    node_H = gpu_H // gpn
    same_node_H = _group_sizes(le_H * num_nodes + node_H).astype(float)
    factor = 1.0 if layout == "group" else 2.0
    inter_H = factor * x * (holders_H - same_node_H) / holders_H
    intra_H = factor * x * (same_node_H - 1) / holders_H
    inter_LG = np.bincount(lg_H, weights=inter_H, minlength=size).reshape(num_rows, num_gpus)
    intra_LG = np.bincount(lg_H, weights=intra_H, minlength=size).reshape(num_rows, num_gpus)
    nic_LN = inter_LG.reshape(num_rows, num_nodes, gpn).sum(axis=2)
    # a ring within the largest group: r - 1 steps (group: reduce-scatter), 2 (r - 1) (replica: all-reduce)
    steps = int(holders_H.max(initial=1.0)) - 1
    return LinkBytes(nic_LN, intra_LG, pcie_LG, inter_LG.sum(axis=1) + intra_LG.sum(axis=1),
                     messages=steps if layout == "group" else 2 * steps)


def _sharded_bytes(holdings_LG: np.ndarray, cluster: Cluster, num_experts: int, x: float,
                   pcie_x: float) -> LinkBytes:
    """SYMI's reduce-scatter to the 1/G owners: each of holdings_LG [L, G] senders sends X/G to each of the
    G - 1 other owners, each owner receives X/G from each sender; then E X/G per owner over PCIe."""
    num_rows, num_gpus = holdings_LG.shape
    gpn, num_nodes = cluster.gpus_per_node, cluster.num_nodes
    holdings_LN = holdings_LG.reshape(num_rows, num_nodes, gpn).sum(axis=2)
    nic_out_LN = holdings_LN * x * (num_gpus - gpn) / num_gpus
    nic_in_LN = gpn * x / num_gpus * (holdings_LN.sum(axis=1, keepdims=True) - holdings_LN)
    nvlink_out_LG = holdings_LG * x * (gpn - 1) / num_gpus
    nvlink_in_LG = x / num_gpus * (np.repeat(holdings_LN, gpn, axis=1) - holdings_LG)
    pcie_LG = np.full((num_rows, num_gpus), num_experts * pcie_x / num_gpus)
    return LinkBytes(np.maximum(nic_out_LN, nic_in_LN), np.maximum(nvlink_out_LG, nvlink_in_LG), pcie_LG,
                     (nic_out_LN.sum(axis=1) + nvlink_out_LG.sum(axis=1)), messages=num_gpus - 1)


def holdings(phy2log_LR: np.ndarray, cluster: Cluster) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (layer, expert, GPU) holdings: layer_H, expert_H, gpu_H (slots of one expert on one GPU count once).

    Sorting each GPU's few slots finds repeats in O(L R log s), no global sort."""
    num_rows = phy2log_LR.shape[0]
    slots_per_gpu = cluster.slots_per_gpu
    sorted_LGS = np.sort(phy2log_LR.reshape(num_rows, -1, slots_per_gpu), axis=2)
    first_LGS = np.ones(sorted_LGS.shape, dtype=bool)
    first_LGS[:, :, 1:] = sorted_LGS[:, :, 1:] != sorted_LGS[:, :, :-1]
    layer_H, gpu_H, slot_H = np.nonzero(first_LGS)
    return layer_H, sorted_LGS[layer_H, gpu_H, slot_H], gpu_H


def _group_sizes(keys_H: np.ndarray) -> np.ndarray:
    """[H] how many entries share each entry's key (sort-based)."""
    order = np.argsort(keys_H, kind="stable")
    sorted_keys = keys_H[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    sizes = np.diff(np.r_[starts, sorted_keys.size])
    out = np.empty(keys_H.size, dtype=np.int64)
    out[order] = np.repeat(sizes, sizes)
    return out


def optimizer_params_per_gpu(phy2log_LR: np.ndarray, cluster: Cluster, num_experts: int, layout: str,
                             expert_params: int) -> np.ndarray:
    """[L] expert parameters the busiest GPU updates in the optimizer step: E P / G (sharded), P / r per holding
    (group), P per holding (replica)."""
    phy2log_LR = np.asarray(phy2log_LR, dtype=np.int64)
    num_rows, num_slots = phy2log_LR.shape
    num_gpus = cluster.num_gpus
    if layout == "sharded":
        return np.full(num_rows, num_experts * expert_params / num_gpus)
    layer_H, expert_H, gpu_H = holdings(phy2log_LR, cluster)
    le_H = layer_H * num_experts + expert_H
    lg_H = layer_H * num_gpus + gpu_H
    if layout == "group":
        holders_H = np.bincount(le_H, minlength=num_rows * num_experts)[le_H]
        weights_H = expert_params / holders_H
    else:
        weights_H = np.full(le_H.size, float(expert_params))
    per_gpu_LG = np.bincount(lg_H, weights=weights_H, minlength=num_rows * num_gpus).reshape(num_rows, num_gpus)
    return per_gpu_LG.max(axis=1)


def held_experts_per_gpu(phy2log_LR: np.ndarray, cluster: Cluster) -> np.ndarray:
    """[L] distinct experts held by the GPU that holds the most of them."""
    phy2log_LR = np.asarray(phy2log_LR, dtype=np.int64)
    num_rows = phy2log_LR.shape[0]
    layer_H, _, gpu_H = holdings(phy2log_LR, cluster)
    per_gpu_LG = np.bincount(layer_H * cluster.num_gpus + gpu_H, minlength=num_rows * cluster.num_gpus)
    return per_gpu_LG.reshape(num_rows, cluster.num_gpus).max(axis=1).astype(float)


def experts_handled_per_gpu(phy2log_LR: np.ndarray, cluster: Cluster, num_experts: int, layout: str) -> np.ndarray:
    """[L] experts whose state the busiest GPU handles in an expert-state phase or the optimizer step: all E
    (sharded: a shard of every expert), else the distinct experts it holds (group, replica)."""
    check_choice(layout, "optimizer layout", OPTIMIZER_LAYOUTS)
    if layout == "sharded":
        return np.full(np.asarray(phy2log_LR).shape[0], float(num_experts))
    return held_experts_per_gpu(phy2log_LR, cluster)


def expert_state_local_bytes(phy2log_LR: np.ndarray, cluster: Cluster, expert_bytes: float,
                             phase: str = "collect") -> np.ndarray:
    """[L] bytes the busiest GPU reads or writes in its own memory in an expert-state phase, any layout: the
    collection reads every slot's gradient and writes one partial sum per distinct expert it holds ((s + held) X);
    the send-out writes every slot's weights (s X)."""
    check_choice(phase, "expert-state phase", EXPERT_STATE_PHASES)
    slots = float(cluster.slots_per_gpu)
    if phase == "sendout":
        return np.full(np.asarray(phy2log_LR).shape[0], slots * expert_bytes)
    return (slots + held_experts_per_gpu(phy2log_LR, cluster)) * float(expert_bytes)


def optimizer_tensors_per_gpu(phy2log_LR: np.ndarray, cluster: Cluster, num_experts: int, layout: str) -> np.ndarray:
    """[L] expert optimizer tensors the busiest GPU steps: 1 per layer for SYMI's shards (every expert's 1/G shard
    of a layer in one block), else one per expert it holds (group: its 1/r shard; replica: the full copy)."""
    check_choice(layout, "optimizer layout", OPTIMIZER_LAYOUTS)
    if layout == "sharded":
        return np.ones(np.asarray(phy2log_LR).shape[0])
    return held_experts_per_gpu(phy2log_LR, cluster)


def migration_bytes(phy2log_LR: np.ndarray, previous_phy2log_LR: np.ndarray, cluster: Cluster, num_experts: int,
                    replica_bytes: float) -> LinkBytes:
    """Moving replicas with their optimizer state (optimizer-coupled policies), per layer.

    Every slot whose expert changed receives `replica_bytes` (weights + optimizer state, W + O); the copies of an
    expert come evenly from the slots that held it before. Over the NICs when the cluster has more than one node
    (conservatively: even a sender in the same node is counted there), over NVLink otherwise. One message.
    """
    phy2log_LR = np.asarray(phy2log_LR, dtype=np.int64)
    previous_phy2log_LR = np.asarray(previous_phy2log_LR, dtype=np.int64)
    if phy2log_LR.shape != previous_phy2log_LR.shape:
        raise ValueError(f"placement shapes differ: {phy2log_LR.shape} vs {previous_phy2log_LR.shape}")
    num_rows, num_slots = phy2log_LR.shape
    num_gpus, gpn, num_nodes = cluster.num_gpus, cluster.gpus_per_node, cluster.num_nodes
    moved_LR = phy2log_LR != previous_phy2log_LR
    layer_LR = np.broadcast_to(np.arange(num_rows)[:, None], phy2log_LR.shape)
    moved_LE = np.zeros((num_rows, num_experts))
    np.add.at(moved_LE, (layer_LR[moved_LR], phy2log_LR[moved_LR]), 1.0)
    prev_cnt_LE = np.zeros((num_rows, num_experts))
    np.add.at(prev_cnt_LE, (layer_LR, previous_phy2log_LR), 1.0)
    send_LR = replica_bytes * (np.take_along_axis(moved_LE, previous_phy2log_LR, axis=1)
                               / np.take_along_axis(prev_cnt_LE, previous_phy2log_LR, axis=1))
    recv_LR = replica_bytes * moved_LR
    send_LG = send_LR.reshape(num_rows, num_gpus, cluster.slots_per_gpu).sum(axis=2)
    recv_LG = recv_LR.reshape(num_rows, num_gpus, cluster.slots_per_gpu).sum(axis=2)
    nic_LN, nvlink_LG, pcie_LG = _empty(num_rows, cluster)
    if num_nodes > 1:
        nic_LN = np.maximum(send_LG.reshape(num_rows, num_nodes, gpn).sum(axis=2),
                            recv_LG.reshape(num_rows, num_nodes, gpn).sum(axis=2))
    else:
        nvlink_LG = np.maximum(send_LG, recv_LG)
    return LinkBytes(nic_LN, nvlink_LG, pcie_LG, recv_LR.sum(axis=1), messages=1)


def paper_collection_time_s(*, layout: str, num_experts: int, num_ranks: int, slots_per_rank: int,
                            expert_bytes: float, pcie_gbps: float, nic_gbps: float) -> float:
    """The paper's per-rank time of one gradient-collection (or weight send-out) phase, one GPU per node:
    group (static): (E/N) X / BW_pcie + ((s N - E)/N) X / BW_net; sharded (SYMI): ... ((s N - s)/N) X / BW_net."""
    e, n, s, x = num_experts, num_ranks, slots_per_rank, expert_bytes
    if layout == "group":
        remote = (s * n - e) / n
    elif layout == "sharded":
        remote = (s * n - s) / n
    else:
        raise ValueError(f"the paper gives formulas for layouts 'group' and 'sharded', not {layout!r}")
    return e / n * x / (pcie_gbps * BYTES_PER_GBPS) + remote * x / (nic_gbps * BYTES_PER_GBPS)
