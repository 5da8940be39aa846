"""SimulationConfig: everything one simulation is given, validated and resolved once. `symi simulate`, the
experiments and the benchmarks build one; the simulator runs it; config.json is its to_dict(), field by field.

Resolved at construction (so that the object, and config.json, say what was simulated, not what was omitted):
  calibration         None -> the FLOP model of the cluster and model (calibration.flop_calibration); an explicit
                      optimizer_location overrides the calibration's (one location for every policy)
  optimizer_location  None -> the calibration's
  steps               None -> every step the trace has after the first (which only seeds the first plan)
  convergence         None -> the paper-fitted survival -> iterations curve (convergence.paper_model)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from symi_sim.checks import check_choice, check_positive_int
from symi_sim.cluster import Cluster
from symi_sim.failures.model import FailureModel
from symi_sim.models import ModelConfig
from symi_sim.policies import Policy, get_policy, with_context
from symi_sim.routing import CAPACITY_MODES, check_capacity_factor
from symi_sim.simulator.calibration import Calibration, flop_calibration
from symi_sim.simulator.convergence import ConvergenceModel, paper_model
from symi_sim.simulator.costs import EXPERT_STATE_ACCOUNTINGS, OPTIMIZER_LOCATIONS
from symi_sim.simulator.replay import check_replayable
from symi_sim.traces.format import LoadTrace

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate (see the module docstring for what None resolves to)."""

    trace: LoadTrace                       # already fitted to `model` (traces.fit.fit_trace)
    cluster: Cluster
    model: ModelConfig
    policies: Sequence[str | Policy]       # names (with options, e.g. "flexmoe-10:rule=cost_benefit") or Policies
    capacity_factor: float | None = 1.0    # None: dropless
    capacity_mode: str = "slot"
    steps: int | None = None               # steps 1..steps of the trace are simulated
    loop: bool = False                     # cycle a shorter trace up to `steps`
    window: int = 1                        # steps of popularity each plan sees
    calibration: Calibration | None = None
    optimizer_location: str | None = None  # "host" | "gpu"
    expert_state_accounting: str = "pairs"  # SYMI's traffic per (expert, GPU) pair, or "paper": per slot
    convergence: ConvergenceModel | None = None
    failures: FailureModel | None = None   # add the expected cost of rank failures to the summary
    trace_path: str | None = None          # where the trace was read from (recorded only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "policies", tuple(self.policies))
        check_choice(self.capacity_mode, "capacity mode", CAPACITY_MODES)
        check_capacity_factor(self.capacity_factor)
        check_positive_int(self.window, "window")
        check_choice(self.expert_state_accounting, "expert-state accounting", EXPERT_STATE_ACCOUNTINGS)
        if not self.policies:
            raise ValueError("no policy to simulate")
        trace, cluster, model = self.trace, self.cluster, self.model
        cluster.check_experts(trace.num_experts)
        if (model.num_experts, model.num_moe_layers, model.top_k) != (trace.num_experts, trace.num_layers,
                                                                      trace.top_k):
            raise ValueError(
                f"model {model.name!r} ({model.num_experts} experts, {model.num_moe_layers} MoE layers, "
                f"top-{model.top_k}) does not match the trace ({trace.num_experts} experts, {trace.num_layers} "
                f"layers, top-{trace.top_k}); fit them with models.fit_trace")
        if trace.tokens_per_step != model.tokens_per_step:
            raise ValueError(f"trace has {trace.tokens_per_step} tokens per step, model {model.name!r} "
                             f"{model.tokens_per_step}; rescale with models.fit_trace")
        if self.failures is not None and not isinstance(self.failures, FailureModel):
            raise ValueError(f"failures must be a failures.FailureModel, got {self.failures!r}")
        check_replayable(trace.num_steps, "simulate")
        available = trace.num_steps - 1
        steps = available if self.steps is None else self.steps
        check_positive_int(steps, "steps")
        if steps > available and not self.loop:
            raise ValueError(f"the trace has {trace.num_steps} steps ({available} to simulate), {steps} asked; "
                             "pass --loop to cycle it")
        object.__setattr__(self, "steps", steps)
        calibration = self._resolved_calibration()
        object.__setattr__(self, "calibration", calibration)
        object.__setattr__(self, "optimizer_location", calibration.optimizer_state_location)
        if self.convergence is None:
            object.__setattr__(self, "convergence", paper_model())
        labels = [label for label, _ in self.resolved_policies()]
        if len(set(labels)) != len(labels):
            raise ValueError(f"policies are listed more than once: {labels}")

    def _resolved_calibration(self) -> Calibration:
        calibration = self.calibration
        if calibration is None:
            calibration = flop_calibration(cluster=self.cluster, model=self.model)
        elif not isinstance(calibration, Calibration):
            raise ValueError(f"calibration must be a calibration.Calibration, got {calibration!r}")
        elif (calibration.cluster, calibration.model) != (self.cluster.name, self.model.name):
            logger.warning("calibration %s was measured on cluster %r, model %r; simulating cluster %r, model %r",
                           calibration.source, calibration.cluster, calibration.model, self.cluster.name,
                           self.model.name)
        if self.optimizer_location is not None:
            check_choice(self.optimizer_location, "optimizer location", OPTIMIZER_LOCATIONS)
            calibration = calibration.with_(optimizer_state_location=self.optimizer_location)
        return calibration

    def resolved_policies(self) -> list[tuple[str, Policy]]:
        """(label, policy) of every policy, given the facts of this run it takes as options (resolve_policy)."""
        return [resolve_policy(spec, self.model, self.capacity_mode, self.capacity_factor) for spec in self.policies]

    def with_(self, **changes: Any) -> SimulationConfig:
        """A copy with some fields changed (validated and resolved again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """config.json: every field, in order, as JSON values."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "trace":
                value = {"num_steps": value.num_steps, "num_layers": value.num_layers,
                         "num_experts": value.num_experts, "top_k": int(value.top_k),
                         "tokens_per_step": value.tokens_per_step, "model": value.model, "source": value.source,
                         "provenance": value.provenance}
            elif f.name in ("cluster", "model"):
                value = value.to_dict()
            elif f.name == "policies":
                value = [{"label": label, "optimizer_layout": policy.optimizer_layout, **policy.config()}
                         for label, policy in self.resolved_policies()]
            elif f.name == "calibration":
                value = {"source": value.source, **value.to_dict()}
            elif f.name == "convergence":
                value = value.describe()
            elif f.name == "failures":
                value = None if value is None else value.describe(self.cluster)
            out[f.name] = value
        return out


def resolve_policy(spec: str | Policy, model: ModelConfig, capacity_mode: str = "slot",
                   capacity_factor: float | None = 1.0) -> tuple[str, Policy]:
    """(label, policy): a name (with an optional period suffix) or a Policy instance, given the context it may take
    as options: the simulated model's d_model / d_ff (d_ff = one routed expert's width), its bytes per weight,
    activation and optimizer value, and the capacity mode and factor."""
    if isinstance(spec, Policy):
        policy, label = spec, spec.name
    elif isinstance(spec, str):
        policy, label = get_policy(spec), spec
    else:
        raise ValueError(f"a policy must be a name or a Policy, got {spec!r}")
    return label, with_context(policy, d_model=model.d_model, d_ff=model.expert_d_ff,
                               weight_bytes=model.weight_bytes, activation_bytes=model.activation_bytes,
                               optimizer_bytes=model.optimizer_bytes, capacity_mode=capacity_mode,
                               capacity_factor=capacity_factor)
