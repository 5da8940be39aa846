"""The simpy model of training iterations: streams, overlap and link contention.

Legend: S steps (iterations), K backward segments.

Three resources, each one at a time (capacity 1), stand for the bulk-synchronous ranks:
  gpu   the ranks' compute stream (every rank computes its share; durations are the slowest rank's)
  net   the ranks' network: node NICs + NVLink (collectives; durations are the busiest link's, see costs.py)
  pcie  the ranks' host links (optimizer shards in host memory)
A phase holds one resource for its duration; two phases needing the same resource serialise (contention).

One iteration (durations come in precomputed, vectorised over layers by the caller, see `IterationWork`):
  net:  popularity all-reduce (policies that need it), replica migration (optimizer-coupled policies on
        rebalance steps), FasterMoE shadow-weight broadcast, forward all-to-alls (dispatch + combine)
  gpu:  expert forward, dense forward
  backward in K segments of consecutive MoE layers (last layers first), each: combine all-to-all (net), expert
        backward (gpu), dispatch all-to-all (net), dense backward (gpu); when a segment's dense gradients are
        ready its bucket is all-reduced by a concurrent process on `net` (data-parallel gradient all-reduce
        overlapping the rest of the backward, as DDP buckets do), so later all-to-alls may wait for it
  net:  shadow-gradient reduction; then wait for every bucket
  net + pcie: gradient collection to the optimizer shards; gpu: optimizer step; pcie + net: weight send-out
Forward phases are summed over layers: nothing runs concurrently with the forward pass, so one hold per phase
kind is exact and keeps an iteration at a few tens of events whatever the number of layers.

Time accounting: every instant of the critical path is charged to one phase, so the phases of an iteration sum
to its time: holding a resource charges the phase, waiting for a resource charges the phase holding it, and
waiting for the last buckets charges `dense_allreduce` (its exposed part).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, fields

import numpy as np
import simpy

PHASES = (
    "popularity", "migration", "shadow", "a2a_forward", "expert_forward", "dense_forward", "a2a_backward",
    "expert_backward", "dense_backward", "dense_allreduce", "grad_collect", "optimizer", "weight_sendout",
)
RESOURCES = ("gpu", "net", "pcie")


@dataclass(frozen=True)
class IterationWork:
    """Phase durations (seconds) of S iterations; [S] arrays, or [S, K] for the K backward segments."""

    popularity_s: np.ndarray
    migration_s: np.ndarray
    shadow_broadcast_s: np.ndarray
    a2a_forward_s: np.ndarray
    expert_forward_s: np.ndarray
    dense_forward_s: np.ndarray
    a2a_backward_SK: np.ndarray      # both backward all-to-alls of the segment (half before, half after compute)
    expert_backward_SK: np.ndarray
    dense_backward_SK: np.ndarray
    allreduce_SK: np.ndarray         # the segment's dense-gradient bucket all-reduce
    shadow_reduce_s: np.ndarray
    grad_collect_net_s: np.ndarray
    grad_collect_pcie_s: np.ndarray
    optimizer_s: np.ndarray
    sendout_pcie_s: np.ndarray
    sendout_net_s: np.ndarray

    def __post_init__(self) -> None:
        num_steps = self.popularity_s.shape[0]
        for f in fields(self):
            value = np.asarray(getattr(self, f.name), dtype=np.float64)
            expected_ndim = 2 if f.name.endswith("_SK") else 1
            assert value.ndim == expected_ndim and value.shape[0] == num_steps, (f.name, value.shape)
            assert np.all(np.isfinite(value)) and (value >= 0).all(), f.name
            object.__setattr__(self, f.name, value)

    @property
    def num_steps(self) -> int:
        return self.popularity_s.shape[0]


class Engine:
    """Runs iterations on a simpy Environment; `hold` is the one primitive (a phase on a resource)."""

    def __init__(self) -> None:
        self.env = simpy.Environment()
        self.resources = {name: simpy.Resource(self.env, capacity=1) for name in RESOURCES}
        self._holder: dict[str, str] = {}

    def hold(self, resource: str, duration_s: float, phase: str,
             charge: dict[str, float] | None = None) -> Generator[simpy.Event, None, None]:
        """Process body: wait for `resource`, hold it `duration_s` for `phase`.

        With `charge` (the critical path's phase -> seconds), the wait is charged to the phase that held the
        resource when we asked for it, and the hold to `phase`.
        """
        env = self.env
        res = self.resources[resource]
        blocker = self._holder.get(resource) if res.count else None
        asked_s = env.now
        with res.request() as req:
            yield req
            if charge is not None and env.now > asked_s:
                charge[blocker or phase] += env.now - asked_s
            self._holder[resource] = phase
            yield env.timeout(duration_s)
            if charge is not None:
                charge[phase] += duration_s

    def launch(self, resource: str, duration_s: float, phase: str) -> simpy.Process:
        """Start `phase` on `resource` concurrently; it queues for the resource now, ahead of later requests."""
        request = self.resources[resource].request()
        if request.triggered:  # granted at once: whoever asks next waits for this phase
            self._holder[resource] = phase
        return self.env.process(self._held(resource, request, duration_s, phase))

    def _held(self, resource: str, request: simpy.Event, duration_s: float,
              phase: str) -> Generator[simpy.Event, None, None]:
        with request:
            yield request
            self._holder[resource] = phase
            yield self.env.timeout(duration_s)

    def run_iterations(self, work: IterationWork) -> dict[str, np.ndarray]:
        """Simulate the iterations back to back; returns time_s [S] and phase_<name>_s [S] for every phase."""
        out = {"time_s": np.zeros(work.num_steps)}
        out.update({f"phase_{name}_s": np.zeros(work.num_steps) for name in PHASES})
        self.env.process(self._iterations(work, out))
        self.env.run()
        return out

    def _iterations(self, work: IterationWork, out: dict[str, np.ndarray]) -> Generator[simpy.Event, None, None]:
        env, hold = self.env, self.hold
        num_segments = work.a2a_backward_SK.shape[1]
        for step in range(work.num_steps):
            start_s = env.now
            charge = dict.fromkeys(PHASES, 0.0)
            sequence = (
                ("net", work.popularity_s[step], "popularity"),
                ("net", work.migration_s[step], "migration"),
                ("net", work.shadow_broadcast_s[step], "shadow"),
                ("net", work.a2a_forward_s[step], "a2a_forward"),
                ("gpu", work.expert_forward_s[step], "expert_forward"),
                ("gpu", work.dense_forward_s[step], "dense_forward"),
            )
            for resource, duration_s, phase in sequence:
                if duration_s > 0:
                    yield from hold(resource, duration_s, phase, charge)
            buckets = []
            for k in range(num_segments):
                half_a2a_s = work.a2a_backward_SK[step, k] / 2
                segment = (
                    ("net", half_a2a_s, "a2a_backward"),
                    ("gpu", work.expert_backward_SK[step, k], "expert_backward"),
                    ("net", half_a2a_s, "a2a_backward"),
                    ("gpu", work.dense_backward_SK[step, k], "dense_backward"),
                )
                for resource, duration_s, phase in segment:
                    if duration_s > 0:
                        yield from hold(resource, duration_s, phase, charge)
                if work.allreduce_SK[step, k] > 0:
                    buckets.append(self.launch("net", work.allreduce_SK[step, k], "dense_allreduce"))
            if work.shadow_reduce_s[step] > 0:
                yield from hold("net", work.shadow_reduce_s[step], "shadow", charge)
            if buckets:
                waited_from_s = env.now
                yield env.all_of(buckets)
                charge["dense_allreduce"] += env.now - waited_from_s
            tail = (
                ("net", work.grad_collect_net_s[step], "grad_collect"),
                ("pcie", work.grad_collect_pcie_s[step], "grad_collect"),
                ("gpu", work.optimizer_s[step], "optimizer"),
                ("pcie", work.sendout_pcie_s[step], "weight_sendout"),
                ("net", work.sendout_net_s[step], "weight_sendout"),
            )
            for resource, duration_s, phase in tail:
                if duration_s > 0:
                    yield from hold(resource, duration_s, phase, charge)
            out["time_s"][step] = env.now - start_s
            for name, seconds in charge.items():
                out[f"phase_{name}_s"][step] = seconds
