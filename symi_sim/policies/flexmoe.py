"""FlexMoE (re-implemented as in the SYMI paper): migration-based rebalancing whose moves carry optimizer state.

Legend: L MoE layers, E logical experts, R physical slots, G GPUs.

The first plan (no previous placement) is DeepSpeed's even layout (slot p holds expert p % E, as `static`).
The driver asks again only every `rebalance_every` steps; then, per layer:

  balance = max_g gpu_load[g] / mean_g gpu_load[g]        (previous placement, its shares, under load_LE)
  if balance < threshold: keep the layer as it is.
  else repeat:
      donor    = argmin_e load[e] / cnt[e] among experts with cnt[e] > 1      (least popular per replica)
      receiver = argmax_e load[e] / cnt[e]                                    (most popular per replica)
      freed    = the donor slot whose hand-over to the receiver leaves the lowest max GPU load
      gain_s   = (max_gpu_load_before - max_gpu_load_after) * expert_flops_per_token / cluster.achieved_flops
                 * rebalance_every
      cost_s   = (W + O) / nic_bytes_per_s
      move the slot if gain_s > min_gain_ratio * cost_s, else stop.

With the default min_gain_ratio = 1 this is FlexMoE's own cost-aware rule. On compute-light experts (GPT-Small on
the paper's cluster) a move rarely pays for itself by this estimate, and FlexMoE then behaves like `static`.
min_gain_ratio = 0 rebalances on schedule while the max GPU load still drops, paying the migration regardless:
the behaviour of the SYMI authors' re-implementation, whose rebalance iterations were 2.5-4.1x slower.

  expert_params          = 2 * d_model * d_ff                 (two weight matrices, biases ignored)
  expert_flops_per_token = 3 * 2 * expert_params              (forward 2 FLOPs per param; backward twice forward)
  W = 2 bytes/param of weights, O = 16 bytes/param of mixed-precision Adam state: a new replica receives both
  nic_bytes_per_s        = cluster.nic_gbps * 1.25e8          (one NIC: the transfer crosses the network)

Loads are tokens (k x tokens routed) per step; a move pays off over the `rebalance_every` steps until the next
plan. Tokens split evenly over an expert's replicas in every rebalanced layer. Ties go to the lowest expert id
and the lowest slot index, so the plan is deterministic. Every accepted move strictly lowers the max GPU load,
so the loop ends. When no layer changes, `previous` itself is returned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from symi_sim.checks import check_number, check_positive_int
from symi_sim.cluster import BYTES_PER_GBPS, Cluster
from symi_sim.placement import Placement
from symi_sim.policies.base import Policy
from symi_sim.policies.static import static_phy2log

logger = logging.getLogger(__name__)

WEIGHT_BYTES_PER_PARAM = 2
OPTIMIZER_BYTES_PER_PARAM = 16


def gpu_load(load_E: np.ndarray, phy2log_R: np.ndarray, share_R: np.ndarray, slots_per_gpu: int) -> np.ndarray:
    """Tokens per GPU (fractional). load_E [E], phy2log_R [R], share_R [R] -> gpu_load_G [G]."""
    return (load_E[phy2log_R] * share_R).reshape(-1, slots_per_gpu).sum(axis=1)


def balance_ratio(gpu_load_G: np.ndarray) -> float:
    """max / mean tokens per GPU; 1.0 when no GPU has any load."""
    mean = float(gpu_load_G.mean())
    return float(gpu_load_G.max()) / mean if mean > 0 else 1.0


@dataclass
class FlexMoEPolicy(Policy):
    name: ClassVar[str] = "flexmoe"
    optimizer_layout: ClassVar[str] = "replica"
    rebalance_every: int = 10
    threshold: float = 1.1
    min_gain_ratio: float = 1.0
    d_model: int = 768
    d_ff: int = 3072

    def __post_init__(self) -> None:
        check_positive_int(self.rebalance_every, "flexmoe: rebalance_every")
        check_number(self.threshold, "flexmoe: threshold (max/mean GPU load)", low=1)
        check_number(self.min_gain_ratio, "flexmoe: min_gain_ratio", low=0)
        for field in ("d_model", "d_ff"):
            check_positive_int(getattr(self, field), f"flexmoe: {field}")

    @property
    def expert_params(self) -> int:
        return 2 * self.d_model * self.d_ff

    @property
    def expert_flops_per_token(self) -> float:
        """Forward + backward FLOPs of one token through one expert."""
        return 6.0 * self.expert_params

    def migration_cost_s(self, cluster: Cluster) -> float:
        """Seconds to move one expert's weights and optimizer state over one NIC."""
        num_bytes = (WEIGHT_BYTES_PER_PARAM + OPTIMIZER_BYTES_PER_PARAM) * self.expert_params
        return num_bytes / (cluster.nic_gbps * BYTES_PER_GBPS)

    def gain_s_per_token(self, cluster: Cluster) -> float:
        """Seconds saved over `rebalance_every` steps per token taken off the busiest GPU."""
        return self.expert_flops_per_token / cluster.achieved_flops * self.rebalance_every

    def _plan(self, load_LE: np.ndarray, cluster: Cluster, previous: Placement | None) -> Placement:
        num_layers, num_experts = load_LE.shape
        if previous is None:
            phy2log_LR = static_phy2log(num_layers=num_layers, num_experts=num_experts, num_slots=cluster.num_slots)
            return Placement.even(phy2log_LR, num_experts)
        cost_s = self.min_gain_ratio * self.migration_cost_s(cluster)
        gain_s_per_token = self.gain_s_per_token(cluster)
        phy2log_LR = previous.phy2log_LR.copy()
        share_LR = previous.share_LR.copy()
        changed = False
        for layer in range(num_layers):
            load_E = load_LE[layer]
            ratio = balance_ratio(gpu_load(load_E, phy2log_LR[layer], share_LR[layer], cluster.slots_per_gpu))
            if ratio < self.threshold:
                continue
            new_R = rebalance_layer(load_E, phy2log_LR[layer], cluster.slots_per_gpu, gain_s_per_token, cost_s)
            num_moves = int((new_R != phy2log_LR[layer]).sum())
            logger.debug("flexmoe layer %d: balance %.3f >= %.3f, %d replica(s) moved", layer, ratio,
                         self.threshold, num_moves)
            if num_moves:
                phy2log_LR[layer] = new_R
                cnt_E = np.bincount(new_R, minlength=num_experts)
                share_LR[layer] = 1.0 / cnt_E[new_R]
                changed = True
        if not changed:
            return previous
        return Placement(phy2log_LR, share_LR, num_experts)


def rebalance_layer(load_E: np.ndarray, phy2log_R: np.ndarray, slots_per_gpu: int, gain_s_per_token: float,
                    cost_s: float) -> np.ndarray:
    """FlexMoE's greedy replica shifting for one layer (even shares). Returns the new phy2log_R [R].

    A move is made while its gain (seconds) exceeds cost_s; cost_s = 0 moves while the max GPU load drops.
    """
    phy2log_R = phy2log_R.copy()
    num_experts = load_E.shape[0]
    gpu_R = np.arange(phy2log_R.shape[0]) // slots_per_gpu
    cnt_E = np.bincount(phy2log_R, minlength=num_experts)
    gpu_G = gpu_load(load_E, phy2log_R, 1.0 / cnt_E[phy2log_R], slots_per_gpu)
    # Each accepted move strictly lowers the max GPU load; R moves is a generous bound on top of that.
    for _ in range(phy2log_R.shape[0]):
        per_replica_E = load_E / cnt_E
        receiver = int(np.argmax(per_replica_E))
        donors = np.where(cnt_E > 1, per_replica_E, np.inf)
        donor = int(np.argmin(donors))
        if not np.isfinite(donors[donor]) or donor == receiver:
            break
        # Moving changes every slot of donor and receiver: donor slots get load/(cnt-1), receiver load/(cnt+1).
        donor_slots = np.flatnonzero(phy2log_R == donor)
        receiver_slots = np.flatnonzero(phy2log_R == receiver)
        base_G = gpu_G.copy()
        np.add.at(base_G, gpu_R[donor_slots], load_E[donor] / (cnt_E[donor] - 1) - per_replica_E[donor])
        np.add.at(base_G, gpu_R[receiver_slots], load_E[receiver] / (cnt_E[receiver] + 1) - per_replica_E[receiver])
        best_max, best_slot = np.inf, -1
        for slot in donor_slots:
            trial_G = base_G.copy()
            trial_G[gpu_R[slot]] += load_E[receiver] / (cnt_E[receiver] + 1) - load_E[donor] / (cnt_E[donor] - 1)
            trial_max = float(trial_G.max())
            if trial_max < best_max:
                best_max, best_slot = trial_max, int(slot)
        gain_s = (float(gpu_G.max()) - best_max) * gain_s_per_token
        if not gain_s > cost_s:
            break
        phy2log_R[best_slot] = receiver
        cnt_E[donor] -= 1
        cnt_E[receiver] += 1
        gpu_G = gpu_load(load_E, phy2log_R, 1.0 / cnt_E[phy2log_R], slots_per_gpu)
    return phy2log_R


POLICY = FlexMoEPolicy
