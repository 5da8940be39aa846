"""The simulated (or real) cluster: topology, slots, link bandwidths and compute rates.

Slot p lives on GPU p // slots_per_gpu; GPU g lives on node g // gpus_per_node.
Bandwidths are in gigabits per second (`_gbps`, 1 Gb/s = 1e9 bit/s = 1.25e8 bytes/s) for every link,
PCIe included, so that all transfer times come from one formula (see costs.bytes_time_s).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from symi_sim.checks import check_number, check_positive_int
from symi_sim.config_files import load_preset_or_file

BYTES_PER_GBPS = 1.25e8  # 1 Gb/s = 1e9 bit/s = 1.25e8 bytes/s: every link's bandwidth is in Gb/s
# Size ceilings, refused up front: arrays of slots x layers x steps would exhaust memory long before a result.
MAX_GPUS = 65_536          # 32x the largest preset (h100-2048)
MAX_SLOTS = 1_048_576      # expert slots per MoE layer over the whole cluster


@dataclass(frozen=True)
class Cluster:
    """A homogeneous GPU cluster.

    num_nodes, gpus_per_node, slots_per_gpu: topology; slots_per_gpu expert slots per MoE layer per GPU.
    nic_gbps, nics_per_node: inter-node network per node (all GPUs of a node share its NICs).
    intra_node_gbps: per-GPU bandwidth to the other GPUs of its node (NVLink / NVSwitch).
    pcie_gbps: per-GPU bandwidth to host memory (where SYMI's optimizer shards may live).
    link_latency_s: per-message latency (the alpha of the alpha-beta model).
    gpu_peak_flops, compute_efficiency: achieved FLOP/s = gpu_peak_flops * compute_efficiency.
    gpu_memory_bytes: per-GPU memory.
    """

    name: str = "custom"
    num_nodes: int = 1
    gpus_per_node: int = 1
    slots_per_gpu: int = 1
    nic_gbps: float = 100.0
    nics_per_node: int = 1
    intra_node_gbps: float = 2400.0
    pcie_gbps: float = 256.0
    link_latency_s: float = 5e-6
    gpu_peak_flops: float = 312e12
    compute_efficiency: float = 0.4
    gpu_memory_bytes: float = 80e9

    def __post_init__(self) -> None:
        where = f"cluster {self.name!r}"
        for field in ("num_nodes", "gpus_per_node", "slots_per_gpu", "nics_per_node"):
            check_positive_int(getattr(self, field), f"{where}: {field}")
        for field in ("nic_gbps", "intra_node_gbps", "pcie_gbps", "gpu_peak_flops", "gpu_memory_bytes"):
            check_number(getattr(self, field), f"{where}: {field}", low=0, low_open=True)
        check_number(self.link_latency_s, f"{where}: link_latency_s", low=0)
        check_number(self.compute_efficiency, f"{where}: compute_efficiency", low=0, high=1, low_open=True)
        if self.num_gpus > MAX_GPUS:
            raise ValueError(f"{where}: {self.num_nodes} nodes x {self.gpus_per_node} GPUs = {self.num_gpus} GPUs, "
                             f"more than the {MAX_GPUS} a cluster may have")
        if self.num_slots > MAX_SLOTS:
            raise ValueError(f"{where}: {self.num_gpus} GPUs x {self.slots_per_gpu} slots = {self.num_slots} slots "
                             f"per layer, more than the {MAX_SLOTS} a cluster may have")

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def num_slots(self) -> int:
        """R: physical expert slots per MoE layer over the whole cluster."""
        return self.num_gpus * self.slots_per_gpu

    @property
    def achieved_flops(self) -> float:
        return self.gpu_peak_flops * self.compute_efficiency

    def gpu_of_slot(self, slot: Any) -> Any:
        """GPU index of slot index/array `slot`."""
        return slot // self.slots_per_gpu

    def node_of_gpu(self, gpu: Any) -> Any:
        """Node index of GPU index/array `gpu`."""
        return gpu // self.gpus_per_node

    def with_(self, **changes: Any) -> Cluster:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check_experts(self, num_experts: int) -> None:
        """Raise ValueError if this cluster cannot hold `num_experts` experts (each needs >= 1 slot)."""
        if num_experts > self.num_slots:
            raise ValueError(
                f"impossible cluster: {num_experts} experts need at least {num_experts} slots per layer, "
                f"but cluster {self.name!r} has {self.num_gpus} GPUs x {self.slots_per_gpu} slots = "
                f"{self.num_slots} slots"
            )


PRESETS: dict[str, Cluster] = {
    # The SYMI paper's testbed: 16 nodes x 1 A100 80 GB, PCIe 4.0 at 32 GB/s, one 100 Gb/s NIC, 4 slots per GPU.
    "paper-a100-16": Cluster(
        name="paper-a100-16", num_nodes=16, gpus_per_node=1, slots_per_gpu=4,
        nic_gbps=100.0, nics_per_node=1, intra_node_gbps=2400.0, pcie_gbps=256.0,
        link_latency_s=10e-6, gpu_peak_flops=312e12, compute_efficiency=0.4, gpu_memory_bytes=80e9,
    ),
    # A DGX-H100-like node: 8 GPUs on NVSwitch (450 GB/s per direction), 8 x 400 Gb/s NICs, PCIe 5.0.
    "h100-8x8": Cluster(
        name="h100-8x8", num_nodes=8, gpus_per_node=8, slots_per_gpu=5,
        nic_gbps=400.0, nics_per_node=8, intra_node_gbps=3600.0, pcie_gbps=512.0,
        link_latency_s=5e-6, gpu_peak_flops=989e12, compute_efficiency=0.4, gpu_memory_bytes=80e9,
    ),
    # The same node type at large scale (DeepSeek-V3-like what-ifs): 256 nodes x 8 H100 = 2,048 GPUs.
    "h100-2048": Cluster(
        name="h100-2048", num_nodes=256, gpus_per_node=8, slots_per_gpu=5,
        nic_gbps=400.0, nics_per_node=8, intra_node_gbps=3600.0, pcie_gbps=512.0,
        link_latency_s=5e-6, gpu_peak_flops=989e12, compute_efficiency=0.4, gpu_memory_bytes=80e9,
    ),
    # A laptop/CPU box treated as a 4-rank "cluster" (what `symi train` runs on in tests).
    "cpu-4": Cluster(
        name="cpu-4", num_nodes=1, gpus_per_node=4, slots_per_gpu=4,
        nic_gbps=10.0, nics_per_node=1, intra_node_gbps=80.0, pcie_gbps=80.0,
        link_latency_s=20e-6, gpu_peak_flops=2e11, compute_efficiency=0.5, gpu_memory_bytes=8e9,
    ),
}


def available_clusters() -> list[str]:
    return sorted(PRESETS)


def load_cluster(spec: str | Path, **overrides: Any) -> Cluster:
    """A preset name or a TOML/JSON file path, with optional field overrides (e.g. slots_per_gpu=2).

    A file holds the Cluster fields at top level (or under a [cluster] table); it may name a preset
    under `base` and override some of its fields.
    """
    return load_preset_or_file(spec, kind="cluster", cls=Cluster, presets=PRESETS, **overrides)
