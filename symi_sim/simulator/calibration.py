"""Measured compute and communication terms of one cluster + model (a Calibration), and the FLOP-model fallback.

The simulator's uncalibrated compute model is peak FLOP/s x compute_efficiency (cluster.py). Measured latencies do
not look like that: the paper's GPT-Small (32 experts, 16 A100s, static placement) needs 455 / 507 / 571 ms per
forward at capacity factor 1 / 2 / 4 where the FLOP model gives 14 / 21 / 36 ms: a large fixed part, and a growth
with the tokens per slot that is neither the FLOP model's slope nor linear. A Calibration holds such measured terms;
`flop_calibration` gives today's model as one, so that the simulator always goes through a Calibration and every
output can say which was used (`source`).

Fields (every one required in a file except `fitted` and `provenance`; `source` is not stored, see below):

  | field                       | unit    | meaning                                             | FLOP fallback     |
  |-----------------------------|---------|-----------------------------------------------------|-------------------|
  | cluster, model              | name    | what the terms were measured on                     | the names given   |
  | layer_forward_fixed_s       | s       | fixed forward cost of one MoE layer (launches,      | 0                 |
  |                             |         | framework, gating), whatever the tokens             |                   |
  | layer_backward_fixed_s      | s       | the same for its backward                           | 0                 |
  | expert_gemm_flops           | FLOP/s  | expert GEMM rate once saturated (compute-bound)     | achieved FLOP/s   |
  | expert_saturation_tokens    | tokens  | n_sat: tokens per GEMM where the small-batch regime | 0 (none)          |
  |                             |         | ends (0: there is none)                             |                   |
  | expert_small_batch_exponent | 1       | p in [0, 1]: below n_sat time grows as tokens**p    | 1                 |
  | expert_fixed_per_gemm_s     | s       | cost of each non-empty expert GEMM (one per slot)   | 0                 |
  | dense_flops                 | FLOP/s  | achieved rate of the dense (non-expert) compute     | achieved FLOP/s   |
  | a2a_efficiency              | 1       | fraction of link bandwidth an all-to-all reaches    | 1                 |
  | a2a_latency_s               | s       | per-message latency of an all-to-all                | link_latency_s    |
  | collective_efficiency       | 1       | fraction of link bandwidth the other transfers      | 1                 |
  |                             |         | reach (dense all-reduce, gradient collection,       |                   |
  |                             |         | weight send-out, popularity, migration, shadows)    |                   |
  | collective_latency_s        | s       | per-message latency of those transfers              | link_latency_s    |
  | state_local_s_per_byte      | s/B     | local memory work of the expert-state phases, per   | 0                 |
  |                             |         | byte the busiest GPU reads or writes in place:      |                   |
  |                             |         | collection (each slot's gradient read, each held    |                   |
  |                             |         | expert's partial sum written), send-out (each       |                   |
  |                             |         | slot's weights written); costs.expert_state_local_  |                   |
  |                             |         | bytes                                               |                   |
  | state_fixed_per_expert_s    | s       | fixed cost of one expert's state in one expert-     | 0                 |
  |                             |         | state phase (collection or send-out) on the busiest |                   |
  |                             |         | GPU: per-expert launches and bookkeeping            |                   |
  | optimizer_bytes_per_s       | bytes/s | optimizer step rate over its state (memory-bound)   | achieved FLOP/s x |
  |                             |         |                                                     | opt. bytes / 12   |
  | optimizer_fixed_per_tensor_s| s       | fixed cost of each optimizer tensor the busiest GPU | 0                 |
  |                             |         | steps: one per layer for SYMI's shards (one block   |                   |
  |                             |         | of every expert's), one per expert held otherwise   |                   |
  | optimizer_state_location    | choice  | "host" or "gpu": where the optimizer state of every | "host" (paper)    |
  |                             |         | policy lives (one choice for all policies alike)    |                   |
  | fitted                      | names   | the fields fitted from measurements; every other    | ()                |
  |                             |         | one is the FLOP fallback                            |                   |
  | provenance                  | text    | what the fitted terms were fitted from, how well    | "FLOP model ..."  |
  | source (not stored)         | text    | where this object came from: FLOP_SOURCE or the     | FLOP_SOURCE       |
  |                             |         | calibration file it was loaded from                 |                   |
(achieved FLOP/s = cluster.gpu_peak_flops x cluster.compute_efficiency; link_latency_s the cluster's.)

The expert GEMM curve (per GEMM of n tokens, F FLOPs per token, r = expert_gemm_flops):
    gemm(n) = F / r * max(n, n_sat ** (1 - p) * n ** p) + expert_fixed_per_gemm_s     (n > 0; gemm(0) = 0)
Above n_sat it is the FLOP model at rate r; below, the time falls only as n**p: small GEMMs underuse the GPU (wave
and tile quantisation, weight reads that do not shrink with n), so halving the tokens saves less than half the time.
p = 0 is a memory-bound floor (time flat), p = 1 (or n_sat = 0) the FLOP model. The form is continuous, monotone
and has three parameters of which a fit can recover two from measurements in the small-batch regime (p, and n_sat
given r; r itself only from points above n_sat). The per-token half-rate form t = fixed + n / (r n / (n + n_half))
(Hockney's n_1/2) was the other candidate; it equals fixed + n_half / r + n / r, i.e. it is affine in n, cannot
bend, and its fixed and n_half terms cannot be told apart by any fit, so it is not used. The paper's three forward
latencies bend a little (doubling the tokens per slot from 512 to 1024 adds 51 ms, doubling again to 2048 only
65 ms), but three rows do not determine the bend (calibrate.py): the shipped paper calibration is linear (p = 1).

How the simulator uses a Calibration (the methods below; arrays are rows of steps x layers):
  expert_time_s      per GPU the sum of its GEMMs' times, the slowest GPU gating the layer
  dense_time_s       FLOPs / dense_flops (the per-layer fixed costs are added by the caller, one per layer)
  a2a_time_s         busiest-link seconds at full bandwidth / a2a_efficiency + messages x a2a_latency_s
  transfer_network_s / transfer_time_s   the same with the collective terms for every other transfer (costs.LinkBytes),
                     plus, for transfer_time_s, its busiest PCIe link at the cluster's bandwidth
  optimizer_time_s   optimizer state bytes / optimizer_bytes_per_s + tensors x optimizer_fixed_per_tensor_s
  (phases.py adds state_fixed_per_expert_s once per expert the busiest GPU handles in each expert-state phase, and
  state_local_s_per_byte x its local bytes)
With `flop_calibration(cluster=..., model=...)` every one returns today's numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from symi_sim.checks import check_choice, check_number, is_int
from symi_sim.cluster import Cluster
from symi_sim.config_files import read_fields_file
from symi_sim.models import ModelConfig
from symi_sim.outputs import atomic_file, write_json
from symi_sim.simulator.costs import OPTIMIZER_LOCATIONS, LinkBytes

OPTIMIZER_FLOPS_PER_PARAM = 12   # the FLOP model's optimizer step (mixed-precision Adam), as bytes/s here
OPTIMIZER_STATE_LOCATIONS = OPTIMIZER_LOCATIONS  # where the optimizer state of every policy lives (costs.py)
FLOP_SOURCE = "flop-model (uncalibrated)"
SCHEMA_VERSION = 1
CALIBRATIONS_DIR = Path(__file__).resolve().parents[1] / "data" / "calibrations"

# (low, high, low_open): the range of every numeric field
_NUMERIC_FIELDS: dict[str, tuple[float | None, float | None, bool]] = {
    "layer_forward_fixed_s": (0.0, None, False),
    "layer_backward_fixed_s": (0.0, None, False),
    "expert_gemm_flops": (0.0, None, True),
    "expert_saturation_tokens": (0.0, None, False),
    "expert_small_batch_exponent": (0.0, 1.0, False),
    "expert_fixed_per_gemm_s": (0.0, None, False),
    "dense_flops": (0.0, None, True),
    "a2a_efficiency": (0.0, 1.0, True),
    "a2a_latency_s": (0.0, None, False),
    "collective_efficiency": (0.0, 1.0, True),
    "collective_latency_s": (0.0, None, False),
    "state_local_s_per_byte": (0.0, None, False),
    "state_fixed_per_expert_s": (0.0, None, False),
    "optimizer_bytes_per_s": (0.0, None, True),
    "optimizer_fixed_per_tensor_s": (0.0, None, False),
}
NUMERIC_FIELDS = tuple(_NUMERIC_FIELDS)


@dataclass(frozen=True)
class Calibration:
    """Measured terms of one cluster + model; see the module docstring for the fields, units and fallbacks."""

    cluster: str
    model: str
    layer_forward_fixed_s: float
    layer_backward_fixed_s: float
    expert_gemm_flops: float
    expert_saturation_tokens: float
    expert_small_batch_exponent: float
    expert_fixed_per_gemm_s: float
    dense_flops: float
    a2a_efficiency: float
    a2a_latency_s: float
    collective_efficiency: float
    collective_latency_s: float
    state_local_s_per_byte: float
    state_fixed_per_expert_s: float
    optimizer_bytes_per_s: float
    optimizer_fixed_per_tensor_s: float
    optimizer_state_location: str
    fitted: tuple[str, ...] = ()
    provenance: str = ""
    source: str = FLOP_SOURCE

    def __post_init__(self) -> None:
        where = f"calibration {self.source!r}"
        for name in ("cluster", "model", "source"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: {name} must be a non-empty string, got {value!r}")
        if not isinstance(self.provenance, str):
            raise ValueError(f"{where}: provenance must be a string, got {self.provenance!r}")
        for name, (low, high, low_open) in _NUMERIC_FIELDS.items():
            value = check_number(getattr(self, name), f"{where}: {name}", low=low, high=high, low_open=low_open)
            object.__setattr__(self, name, value)
        check_choice(self.optimizer_state_location, f"{where}: optimizer_state_location",
                     OPTIMIZER_STATE_LOCATIONS)
        if isinstance(self.fitted, str) or not isinstance(self.fitted, list | tuple):
            raise ValueError(f"{where}: fitted must be a list of field names, got {self.fitted!r}")
        for name in self.fitted:
            check_choice(name, f"{where}: fitted field", NUMERIC_FIELDS)
        if len(set(self.fitted)) != len(self.fitted):
            raise ValueError(f"{where}: fitted names a field twice: {list(self.fitted)}")
        object.__setattr__(self, "fitted", tuple(self.fitted))

    # ------------------------------------------------------------------ what the simulator calls
    def gemm_time_s(self, tokens: Any, *, flops_per_assignment: float) -> np.ndarray:
        """Seconds of expert GEMMs of `tokens` tokens each (any shape, elementwise; 0 tokens cost nothing)."""
        tokens = np.asarray(tokens, dtype=np.float64)
        seconds_per_token = flops_per_assignment / self.expert_gemm_flops
        p, n_sat = self.expert_small_batch_exponent, self.expert_saturation_tokens
        busy = tokens > 0
        if p < 1 and n_sat > 0:
            small = n_sat ** (1 - p) * np.power(np.where(busy, tokens, 1.0), p)
            work = np.maximum(tokens, small)
        else:
            work = tokens
        return np.where(busy, work * seconds_per_token + self.expert_fixed_per_gemm_s, 0.0)

    def expert_time_s(self, *, tokens_row_GS: np.ndarray, flops_per_assignment: float) -> np.ndarray:
        """[rows] expert compute of each (step, layer) row: per GPU the sum of its GEMMs, the slowest GPU gating.

        tokens_row_GS: [rows, G, S] tokens of each GEMM of each GPU: its slots' tokens (slot mode: the padded
        buffer of every busy slot), plus a column of shadowed tokens if any (FasterMoE computes those outside
        the slots, as one more GEMM).
        """
        return self.expert_time_per_gpu_s(tokens_row_GS=tokens_row_GS,
                                          flops_per_assignment=flops_per_assignment).max(axis=1, initial=0.0)

    def expert_time_per_gpu_s(self, *, tokens_row_GS: np.ndarray, flops_per_assignment: float) -> np.ndarray:
        """[rows, G] expert compute of each GPU in each row: the sum of its GEMMs (see expert_time_s)."""
        tokens_row_GS = np.asarray(tokens_row_GS, dtype=np.float64)
        if tokens_row_GS.ndim != 3:
            raise ValueError(f"tokens_row_GS must be [rows, GPUs, GEMMs], got shape {tokens_row_GS.shape}")
        if self.expert_fixed_per_gemm_s == 0 and not (self.expert_small_batch_exponent < 1
                                                      and self.expert_saturation_tokens > 0):
            # linear GEMMs without a fixed cost (the FLOP model among them): a GPU's time is its tokens' time;
            # summing the tokens first keeps large clusters fast
            return tokens_row_GS.sum(axis=2) * (flops_per_assignment / self.expert_gemm_flops)
        return self.gemm_time_s(tokens_row_GS, flops_per_assignment=flops_per_assignment).sum(axis=2)

    def dense_time_s(self, *, flops: Any) -> np.ndarray:
        """Seconds of `flops` dense FLOPs on one GPU (elementwise)."""
        return np.asarray(flops, dtype=np.float64) / self.dense_flops

    def a2a_time_s(self, *, busiest_link_s: Any, num_messages: int) -> np.ndarray:
        """Seconds of all-to-alls whose busiest link needs `busiest_link_s` at full bandwidth (elementwise); the
        per-message latency is paid only when something moves, as costs.LinkBytes does."""
        busiest_link_s = np.asarray(busiest_link_s, dtype=np.float64)
        latency_s = num_messages * self.a2a_latency_s
        return np.where(busiest_link_s > 0, busiest_link_s / self.a2a_efficiency + latency_s, 0.0)

    def transfer_network_s(self, moved: LinkBytes, cluster: Cluster) -> np.ndarray:
        """[L] seconds of a transfer other than the token all-to-all over its busiest NIC or NVLink, plus its
        per-message latency when anything moves (costs.LinkBytes.network_time_L with the collective terms)."""
        moves = (moved.network_L > 0) | (moved.pcie_LG.max(axis=1, initial=0.0) > 0)
        return (moved.busiest_link_s(cluster) / self.collective_efficiency
                + np.where(moves, moved.messages * self.collective_latency_s, 0.0))

    def transfer_time_s(self, moved: LinkBytes, cluster: Cluster) -> np.ndarray:
        """[L] transfer_network_s plus the busiest PCIe link (costs.LinkBytes.time_L with the collective terms)."""
        return self.transfer_network_s(moved, cluster) + moved.pcie_time_L(cluster)

    def optimizer_time_s(self, *, state_bytes: Any, num_tensors: Any = 0) -> np.ndarray:
        """Seconds of an optimizer step over `state_bytes` bytes of optimizer state in `num_tensors` expert tensors
        (elementwise)."""
        return (np.asarray(state_bytes, dtype=np.float64) / self.optimizer_bytes_per_s
                + np.asarray(num_tensors, dtype=np.float64) * self.optimizer_fixed_per_tensor_s)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        """The file's content: every field but `source`, plus the schema version."""
        data = {"schema_version": SCHEMA_VERSION}
        data.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source"})
        data["fitted"] = list(self.fitted)
        return data

    def with_(self, **changes: Any) -> Calibration:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


FILE_FIELDS = tuple(f.name for f in dataclasses.fields(Calibration) if f.name != "source")
_REQUIRED_FIELDS = tuple(name for name in FILE_FIELDS if name not in ("fitted", "provenance"))


def flop_calibration(*, cluster: Cluster, model: ModelConfig) -> Calibration:
    """Today's compute model as a Calibration: every method returns what phases.py computes without one."""
    achieved = cluster.achieved_flops
    return Calibration(
        cluster=cluster.name, model=model.name, layer_forward_fixed_s=0.0, layer_backward_fixed_s=0.0,
        expert_gemm_flops=achieved, expert_saturation_tokens=0.0, expert_small_batch_exponent=1.0,
        expert_fixed_per_gemm_s=0.0, dense_flops=achieved, a2a_efficiency=1.0, a2a_latency_s=cluster.link_latency_s,
        collective_efficiency=1.0, collective_latency_s=cluster.link_latency_s, state_local_s_per_byte=0.0,
        state_fixed_per_expert_s=0.0,
        optimizer_fixed_per_tensor_s=0.0,
        optimizer_bytes_per_s=achieved * model.optimizer_bytes / OPTIMIZER_FLOPS_PER_PARAM,
        optimizer_state_location="host", fitted=(),
        provenance=(f"FLOP model: {cluster.gpu_peak_flops:g} peak FLOP/s x compute_efficiency "
                    f"{cluster.compute_efficiency:g} of cluster {cluster.name!r}, link latency "
                    f"{cluster.link_latency_s:g} s"),
        source=FLOP_SOURCE,
    )


def available_calibrations() -> list[str]:
    """Names of the shipped calibrations (symi_sim/data/calibrations/<name>.json)."""
    return sorted(p.stem for p in CALIBRATIONS_DIR.glob("*.json"))


def load_calibration(spec: str | Path) -> Calibration:
    """A shipped calibration by name (see available_calibrations) or a .json / .toml file.

    The file holds the fields at top level (TOML: or under a [calibration] table); unknown fields are refused
    with the list of known ones, missing ones named. `source` becomes the file's path (and name)."""
    spec_str = str(spec)
    if spec_str in available_calibrations():
        path = CALIBRATIONS_DIR / f"{spec_str}.json"
        source = f"{spec_str} ({path})"
    else:
        path = Path(spec_str)
        source = spec_str
        if path.suffix.lower() not in (".json", ".toml"):
            raise ValueError(f"unknown calibration {spec_str!r}: give a shipped one "
                             f"({', '.join(available_calibrations()) or 'none'}) or a .json/.toml file")
        if not path.is_file():
            raise ValueError(f"calibration file {spec_str!r} does not exist")
    data = read_fields_file(path, kind="calibration")
    return calibration_from_dict(data, where=f"calibration file {str(path)!r}", source=source)


def calibration_from_dict(data: dict[str, Any], *, where: str, source: str) -> Calibration:
    """A Calibration of a file's fields; ValueError naming `where` and the field."""
    data = dict(data)
    version = data.pop("schema_version", SCHEMA_VERSION)
    if not is_int(version) or version != SCHEMA_VERSION:
        raise ValueError(f"{where}: schema_version must be {SCHEMA_VERSION}, got {version!r}")
    unknown = sorted(set(data) - set(FILE_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known fields: {['schema_version', *FILE_FIELDS]}")
    missing = [name for name in _REQUIRED_FIELDS if name not in data]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    if isinstance(data.get("fitted"), list):
        data["fitted"] = tuple(data["fitted"])
    try:
        return Calibration(**data, source=source)
    except TypeError as exc:  # a field of the wrong kind that the dataclass itself rejects
        raise ValueError(f"{where}: {exc}") from None


def write_calibration(path: str | Path, calibration: Calibration) -> None:
    """Write `calibration` to a .json file atomically (TOML would need a writer dependency; load reads both)."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        raise ValueError(f"calibration output {str(path)!r} must be a .json file")
    with atomic_file(path) as tmp:
        write_json(tmp, calibration.to_dict())
