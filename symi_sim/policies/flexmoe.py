"""FlexMoE (re-implemented as in the SYMI paper): migration-based rebalancing whose moves carry optimizer state.

Legend: L MoE layers, E logical experts, R physical slots, G GPUs.

The first plan (no previous placement) is DeepSpeed's even layout (slot p holds expert p % E, as `static`).
The driver asks again only every `rebalance_every` steps; then, per layer:

  balance = max_g gpu_load[g] / mean_g gpu_load[g]        (previous placement, its shares, under load_LE)
  if balance < threshold: keep the layer as it is.
  else repeat (at most R moves):
      donor    = argmin_e load[e] / cnt[e] among experts with cnt[e] > 1      (least popular per replica)
      receiver = argmax_e load[e] / cnt[e]                                    (most popular per replica)
      freed    = the donor slot whose hand-over to the receiver leaves the lowest max GPU load
      move the slot if the rule accepts it, else stop.

Two rules (option `rule`):
  schedule      (default) accept while the max GPU load drops: rebalance on schedule, paying the migration
                whatever it costs. This is what the SYMI authors' re-implementation did, the FlexMoE of the
                paper's comparison, whose rebalance iterations were 2.5-4.1x slower. Every accepted move strictly
                lowers the max GPU load.
  cost_benefit  FlexMoE's own rule: accept while gain_s > min_gain_ratio * cost_s (min_gain_ratio default 1,
                break-even; 0: any positive gain), with
                  gain_s = (tokens off the busiest GPU + tokens no longer dropped) * s_per_token * rebalance_every
                  cost_s = (W + O) / nic_bytes_per_s
                A dropped token is priced as one token's expert forward + backward (s_per_token, the price the
                rule puts on a token taken off the busiest GPU): a dropped token must be computed again in a
                later step for the model to learn as much from the data, so saving it is worth that compute.
                In slot mode, where buffers are padded, balance buys no time and the drops are the whole gain.
                Drops at the capacity the plan is served under (routing.py), with A = load[e] summed:
                  slot  every slot buffers ceil(capacity_factor * A / R) tokens; an expert's tokens split evenly
                        over its replicas: drops[e] = max(load[e] - cnt[e] * capacity, 0)
                  gpu   every GPU buffers ceil(capacity_factor * A / G): drops = sum_g max(gpu_load[g] - budget, 0)
                capacity_factor None (dropless) counts no drops. On compute-light experts (GPT-Small on the
                paper's cluster) a move rarely pays for itself even so, and FlexMoE then behaves like `static`.
`min_gain_ratio` belongs to the cost_benefit rule; under "schedule" it may only be None or 0 (0 was the earlier
spelling of rebalancing on schedule: `flexmoe-10:min_gain_ratio=0` still means it).

  expert_params = 2 * d_model * d_ff                 (two weight matrices, biases ignored)
  s_per_token   = 3 * 2 * expert_params / cluster.achieved_flops   (forward 2 FLOPs per param; backward twice)
  W = weight_bytes, O = optimizer_bytes per param (default 2 and 16: mixed-precision Adam); a new replica
  receives both. nic_bytes_per_s = cluster.nic_gbps * 1.25e8 (one NIC: the transfer crosses the network)

The simulator passes its model's shapes and byte sizes and the capacity mode and factor (driver.resolve_policy).
Loads are tokens (k x tokens routed) per step; a move pays off over the `rebalance_every` steps until the next
plan. Tokens split evenly over an expert's replicas in every rebalanced layer. Ties go to the lowest expert id
and the lowest slot index, so the plan is deterministic. When no layer changes, `previous` itself is returned.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from symi_sim.checks import check_choice, check_number, check_positive_int
from symi_sim.cluster import BYTES_PER_GBPS, Cluster
from symi_sim.placement import Placement
from symi_sim.policies.base import Policy
from symi_sim.policies.static import static_phy2log
from symi_sim.routing import CAPACITY_MODES

logger = logging.getLogger(__name__)

RULES = ("schedule", "cost_benefit")


def gpu_load(load_E: np.ndarray, phy2log_R: np.ndarray, share_R: np.ndarray, slots_per_gpu: int) -> np.ndarray:
    """Tokens per GPU (fractional). load_E [E], phy2log_R [R], share_R [R] -> gpu_load_G [G]."""
    return (load_E[phy2log_R] * share_R).reshape(-1, slots_per_gpu).sum(axis=1)


def balance_ratio(gpu_load_G: np.ndarray) -> float:
    """max / mean tokens per GPU; 1.0 when no GPU has any load."""
    mean = float(gpu_load_G.mean())
    return float(gpu_load_G.max()) / mean if mean > 0 else 1.0


def dropped_tokens(load_E: np.ndarray, cnt_E: np.ndarray, gpu_load_G: np.ndarray, *, capacity_mode: str | None,
                   capacity: float) -> float:
    """Tokens dropped under even splits. load_E [E], cnt_E [E] replicas, gpu_load_G [G]; capacity: tokens per slot
    ("slot") or per GPU ("gpu"); capacity_mode None counts nothing."""
    if capacity_mode is None:
        return 0.0
    if capacity_mode == "slot":
        return float(np.maximum(load_E - cnt_E * capacity, 0.0).sum())
    return float(np.maximum(gpu_load_G - capacity, 0.0).sum())


@dataclass
class FlexMoEPolicy(Policy):
    name: ClassVar[str] = "flexmoe"
    optimizer_layout: ClassVar[str] = "replica"
    rebalance_every: int = 10
    threshold: float = 1.1
    rule: str = "schedule"
    min_gain_ratio: float | None = None
    d_model: int = 768
    d_ff: int = 3072
    weight_bytes: int = 2
    optimizer_bytes: int = 16
    capacity_mode: str = "slot"
    capacity_factor: float | None = 1.0

    def __post_init__(self) -> None:
        check_positive_int(self.rebalance_every, "flexmoe: rebalance_every")
        check_number(self.threshold, "flexmoe: threshold (max/mean GPU load)", low=1)
        check_choice(self.rule, "flexmoe: rule", RULES)
        check_number(self.min_gain_ratio, "flexmoe: min_gain_ratio", low=0, optional=True)
        if self.rule == "schedule" and self.min_gain_ratio:
            raise ValueError(f"flexmoe: min_gain_ratio {self.min_gain_ratio} applies to rule=cost_benefit; "
                             "rule=schedule rebalances whatever a move costs")
        for field in ("d_model", "d_ff", "weight_bytes", "optimizer_bytes"):
            check_positive_int(getattr(self, field), f"flexmoe: {field}")
        check_choice(self.capacity_mode, "flexmoe: capacity_mode", CAPACITY_MODES)
        check_number(self.capacity_factor, "flexmoe: capacity_factor", low=0, low_open=True, optional=True)

    @property
    def expert_params(self) -> int:
        return 2 * self.d_model * self.d_ff

    @property
    def expert_flops_per_token(self) -> float:
        """Forward + backward FLOPs of one token through one expert."""
        return 6.0 * self.expert_params

    def migration_cost_s(self, cluster: Cluster) -> float:
        """Seconds to move one expert's weights and optimizer state over one NIC."""
        num_bytes = (self.weight_bytes + self.optimizer_bytes) * self.expert_params
        return num_bytes / (cluster.nic_gbps * BYTES_PER_GBPS)

    def gain_s_per_token(self, cluster: Cluster) -> float:
        """Seconds saved over `rebalance_every` steps per token taken off the busiest GPU (or not dropped)."""
        return self.expert_flops_per_token / cluster.achieved_flops * self.rebalance_every

    def capacity(self, total_load: float, cluster: Cluster) -> float:
        """Tokens per slot (slot mode) or per GPU (gpu mode) for a layer of `total_load` assignments."""
        num_buffers = cluster.num_slots if self.capacity_mode == "slot" else cluster.num_gpus
        return float(math.ceil(self.capacity_factor * total_load / num_buffers))

    def _plan(self, load_LE: np.ndarray, cluster: Cluster, previous: Placement | None) -> Placement:
        num_layers, num_experts = load_LE.shape
        if previous is None:
            phy2log_LR = static_phy2log(num_layers=num_layers, num_experts=num_experts, num_slots=cluster.num_slots)
            return Placement.even(phy2log_LR, num_experts)
        cost_benefit = self.rule == "cost_benefit"
        margin = 1.0 if self.min_gain_ratio is None else self.min_gain_ratio
        cost_s = margin * self.migration_cost_s(cluster) if cost_benefit else 0.0
        drop_mode = self.capacity_mode if cost_benefit and self.capacity_factor is not None else None
        gain_s_per_token = self.gain_s_per_token(cluster)
        phy2log_LR = previous.phy2log_LR.copy()
        share_LR = previous.share_LR.copy()
        changed = False
        for layer in range(num_layers):
            load_E = load_LE[layer]
            ratio = balance_ratio(gpu_load(load_E, phy2log_LR[layer], share_LR[layer], cluster.slots_per_gpu))
            if ratio < self.threshold:
                continue
            capacity = self.capacity(float(load_E.sum()), cluster) if drop_mode else 0.0
            new_R = rebalance_layer(load_E, phy2log_LR[layer], slots_per_gpu=cluster.slots_per_gpu,
                                    gain_s_per_token=gain_s_per_token, cost_s=cost_s, capacity_mode=drop_mode,
                                    capacity=capacity)
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


def rebalance_layer(load_E: np.ndarray, phy2log_R: np.ndarray, *, slots_per_gpu: int, gain_s_per_token: float,
                    cost_s: float, capacity_mode: str | None = None, capacity: float = 0.0) -> np.ndarray:
    """FlexMoE's greedy replica shifting for one layer (even shares). Returns the new phy2log_R [R].

    A move is made while its gain (seconds: tokens off the max GPU load, plus tokens no longer dropped when
    capacity_mode is "slot" or "gpu", times gain_s_per_token) exceeds cost_s; cost_s = 0 without capacity_mode
    moves while the max GPU load drops.
    """
    phy2log_R = phy2log_R.copy()
    num_experts = load_E.shape[0]
    gpu_R = np.arange(phy2log_R.shape[0]) // slots_per_gpu
    cnt_E = np.bincount(phy2log_R, minlength=num_experts)
    gpu_G = gpu_load(load_E, phy2log_R, 1.0 / cnt_E[phy2log_R], slots_per_gpu)
    drops = dropped_tokens(load_E, cnt_E, gpu_G, capacity_mode=capacity_mode, capacity=capacity)
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
        best_max, best_slot, best_G = np.inf, -1, base_G
        for slot in donor_slots:
            trial_G = base_G.copy()
            trial_G[gpu_R[slot]] += load_E[receiver] / (cnt_E[receiver] + 1) - load_E[donor] / (cnt_E[donor] - 1)
            trial_max = float(trial_G.max())
            if trial_max < best_max:
                best_max, best_slot, best_G = trial_max, int(slot), trial_G
        trial_cnt_E = cnt_E.copy()
        trial_cnt_E[donor] -= 1
        trial_cnt_E[receiver] += 1
        trial_drops = dropped_tokens(load_E, trial_cnt_E, best_G, capacity_mode=capacity_mode, capacity=capacity)
        gain_s = (float(gpu_G.max()) - best_max + drops - trial_drops) * gain_s_per_token
        if not gain_s > cost_s:
            break
        phy2log_R[best_slot] = receiver
        cnt_E, drops = trial_cnt_E, trial_drops
        gpu_G = gpu_load(load_E, phy2log_R, 1.0 / cnt_E[phy2log_R], slots_per_gpu)
    return phy2log_R


POLICY = FlexMoEPolicy
