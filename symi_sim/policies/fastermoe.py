"""FasterMoE's dynamic shadowing on DeepSpeed's static layout.

Legend: L MoE layers, E logical experts, R physical slots.

Slots keep the static layout (slot p holds expert p % E, even shares). Per layer the hottest experts are
"shadowed": their weights are broadcast to every GPU, their tokens are computed where they come from, and
their gradients are reduced back to the owner (routing spreads a shadowed expert's tokens over all GPUs).
The choice follows the FasterMoE paper's model (PPoPP '22) as its public code applies it:

  B          = the layer's expert loads sorted descending (ties: lower expert id first); B[0] is the hottest
  feat       = d_model * activation_bytes / bw_net              s per token of features over the network
  send_model = 2 * alpha * d_model^2 * weight_bytes / bw_net    s to broadcast one expert's weights
  comp       = 4 * alpha * d_model^2 / bw_mm                    s of one token's forward GEMMs
  alpha = d_ff / d_model,  bw_net = cluster.nic_gbps * 1.25e8 bytes/s,  bw_mm = cluster.achieved_flops

  lat = 3 * comp * B[0] + 4 * feat * B[0]              (no shadow: the busiest expert gates the layer)
  for i = 0, 1, ..., E - 2:
      lat_new = 3 * comp * B[i+1] + 4 * feat * B[i+1] + (i + 1) * send_model
      if lat_new < lat: shadow the expert of B[i]; lat = lat_new      (each extra shadow must lower the estimate)
      else: stop

The coldest expert is never shadowed (there is no B[E] to compare with), and `max_shadow` (None: no limit)
caps the shadows per layer.

Byte sizes: FasterMoE's public code trains in fp32, hence the defaults weight_bytes = activation_bytes = 4. The
simulator passes its model's sizes (2-byte weights and activations by default, driver.resolve_policy) so that the
decision prices the bytes the simulator charges for the broadcast and the all-to-all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from symi_sim.checks import check_int, check_positive_int
from symi_sim.cluster import BYTES_PER_GBPS, Cluster
from symi_sim.placement import Placement
from symi_sim.policies.base import Policy
from symi_sim.policies.static import static_phy2log

FP32_BYTES = 4  # FasterMoE's public code: fp32 weights and features


def shadow_mask(load_E: np.ndarray, comp_s: float, feat_s: float, send_model_s: float,
                max_shadow: int | None = None) -> np.ndarray:
    """FasterMoE's greedy shadow choice for one layer. load_E [E] -> shadow_E [E] bool."""
    order_E = np.argsort(-load_E, kind="stable")
    b_E = load_E[order_E]
    shadow_E = np.zeros(load_E.shape[0], dtype=bool)
    limit = load_E.shape[0] - 1 if max_shadow is None else min(max_shadow, load_E.shape[0] - 1)
    lat_s = 3 * comp_s * b_E[0] + 4 * feat_s * b_E[0]
    for i in range(limit):
        lat_new_s = 3 * comp_s * b_E[i + 1] + 4 * feat_s * b_E[i + 1] + (i + 1) * send_model_s
        if not lat_new_s < lat_s:
            break
        shadow_E[order_E[i]] = True
        lat_s = lat_new_s
    return shadow_E


@dataclass
class FasterMoEPolicy(Policy):
    name: ClassVar[str] = "fastermoe"
    optimizer_layout: ClassVar[str] = "group"  # FasterMoE runs on DeepSpeed's data-parallel expert groups
    shadows_experts: ClassVar[bool] = True
    d_model: int = 768
    d_ff: int = 3072
    max_shadow: int | None = None
    weight_bytes: int = FP32_BYTES
    activation_bytes: int = FP32_BYTES

    def __post_init__(self) -> None:
        for field in ("d_model", "d_ff", "weight_bytes", "activation_bytes"):
            check_positive_int(getattr(self, field), f"fastermoe: {field}")
        check_int(self.max_shadow, "fastermoe: max_shadow", minimum=0, optional=True)

    def times_s(self, cluster: Cluster) -> tuple[float, float, float]:
        """(comp, feat, send_model) in seconds: per token compute, per token features, per expert weights."""
        alpha = self.d_ff / self.d_model
        bw_net = cluster.nic_gbps * BYTES_PER_GBPS
        feat_s = self.d_model * self.activation_bytes / bw_net
        send_model_s = 2 * alpha * self.d_model**2 * self.weight_bytes / bw_net
        comp_s = 4 * alpha * self.d_model**2 / cluster.achieved_flops
        return comp_s, feat_s, send_model_s

    def _plan(self, load_LE: np.ndarray, cluster: Cluster, previous: Placement | None) -> Placement:
        num_layers, num_experts = load_LE.shape
        comp_s, feat_s, send_model_s = self.times_s(cluster)
        shadow_LE = np.stack([shadow_mask(load_E, comp_s, feat_s, send_model_s, self.max_shadow)
                              for load_E in load_LE])
        phy2log_LR = static_phy2log(num_layers=num_layers, num_experts=num_experts, num_slots=cluster.num_slots)
        return Placement.even(phy2log_LR, num_experts, shadow_LE)


POLICY = FasterMoEPolicy
