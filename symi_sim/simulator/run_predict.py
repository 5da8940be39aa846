"""The simulator's phase costs (phases.py) applied to a `symi train` run: what each phase of its steps takes under a
Calibration, composed as the executor runs them.

Legend: L MoE layers, G ranks, S slots per rank, rows = (step, layer) pairs, steps after the run's warm-up.

The executor's loads and placements drive the same cost functions the simulator charges:
  expert_forward  the expert GEMMs of the rows each slot computed (calibration.expert_time_per_gpu_s): the tokens
                  it served, or where the run's slot compute is "padded" (config.json; every CPU run) the rank's
                  largest slot's rows for each of its slots
  a2a_forward     the two all-to-alls (dispatch, combine) of every layer (costs.alltoall_bytes, a2a terms)
  a2a_backward    the same two in the backward
  forward         per layer the fixed forward cost, the dense compute and the expert compute, the all-to-alls and
                  the popularity exchange
  backward        per layer the fixed backward cost, twice the forward's compute, the all-to-alls
  dense_grad      one all-reduce of every dense gradient, charged in full after the backward (the executor now
                  launches it in buckets during the backward and times only the wait after it: on a CPU whose
                  cores the ranks already fill the overlap gains little, elsewhere this phase over-predicts)
  expert_grad     the gradient collection of the run's optimizer layout (phases.expert_state)
  optimizer       phases.optimizer: the busiest rank's expert optimizer state plus every dense parameter's
  send_out        the weight send-out to the next step's placement
  step            their sum: the executor runs its phases one after the other (no overlap, unlike the
                  simulator's engine, which overlaps the dense all-reduce with the backward); planning is not
                  charged (the simulator has no planning cost)
The optimizer state of the executor lives where it computes (the calibration's optimizer_state_location is not
used: a CPU run has no PCIe between them).

Ranks that share CPU cores (cpu_share < 1: more ranks x threads than cores) share them as a processor-sharing queue:
work that every rank does at once (fixed costs, dense compute, the optimizer step, the expert-state phases' local
memory work) takes 1 / cpu_share as long, and a layer's expert compute ends when the slowest rank is done or when
all ranks' work has passed through the cores, whichever is later: max(max_g w_g, mean_g w_g / cpu_share).
Transfers wait on other ranks more than they compute and are not scaled. Measured communication phases are
compared by their shortest over the ranks (MEASURED_AS: the rank that came last waited for no one), which is what
the simulator's phases are.
"""

from __future__ import annotations

import numpy as np

from symi_sim.simulator.calibration import Calibration
from symi_sim.simulator.costs import allreduce_bytes
from symi_sim.simulator.phases import PlacementRuns, expert_state, optimizer, popularity
from symi_sim.simulator.run_dirs import RunData

# measured phase (run_dirs.RunData.measured) -> the predicted phase it is compared with, where they differ
MEASURED_AS = {"dense_grad_least": "dense_grad", "expert_grad_least": "expert_grad", "send_out_least": "send_out"}
PREDICTED_PHASES = ("forward", "backward", "dense_grad", "expert_grad", "optimizer", "send_out", "expert_forward",
                    "a2a_forward", "a2a_backward", "step")
STEP_PHASES = ("forward", "backward", "dense_grad", "expert_grad", "optimizer", "send_out")


def predict_steps(*, run: RunData, calibration: Calibration) -> dict[str, np.ndarray]:
    """Seconds of every phase (PREDICTED_PHASES) of each of the run's steps after its warm-up."""
    model, cluster = run.model, run.cluster
    num_layers, num_steps = model.num_moe_layers, len(run.placements)
    slowdown = 1.0 / run.cpu_share

    def per_step(values_row: np.ndarray) -> np.ndarray:
        return np.asarray(values_row, dtype=np.float64).reshape(num_steps, num_layers).sum(axis=1)

    expert_row_G = calibration.expert_time_per_gpu_s(tokens_row_GS=run.tokens_row_GS,
                                                     flops_per_assignment=model.expert_flops_per_assignment)
    expert_S = per_step(np.maximum(expert_row_G.max(axis=1), expert_row_G.mean(axis=1) * slowdown))
    a2a_S = per_step(calibration.a2a_time_s(busiest_link_s=run.link_s_row, num_messages=cluster.num_gpus - 1))
    dense_s = float(calibration.dense_time_s(flops=run.dense_flops_layer))
    popularity_S, _ = popularity(num_steps=num_steps, num_experts=model.num_experts, num_layers=num_layers,
                                 cluster=cluster, calibration=calibration, needed=True)
    runs = PlacementRuns.of(run.placements)
    state = expert_state(runs, run.next_placement, cluster=cluster, model=model, calibration=calibration,
                         num_experts=model.num_experts, layout=run.layout, location="gpu", accounting="pairs")
    dense_grad = allreduce_bytes(float(model.dense_params * model.grad_bytes), cluster)
    out = {
        "expert_forward": expert_S,
        "a2a_forward": 2 * a2a_S,
        "a2a_backward": 2 * a2a_S,
        "forward": slowdown * num_layers * (calibration.layer_forward_fixed_s + dense_s) + expert_S + 2 * a2a_S
                   + popularity_S,
        "backward": slowdown * num_layers * (calibration.layer_backward_fixed_s + 2 * dense_s) + 2 * expert_S
                    + 2 * a2a_S,
        "dense_grad": np.full(num_steps, float(calibration.transfer_time_s(dense_grad, cluster).sum())),
        "expert_grad": state.collect_net_s + state.collect_pcie_s + slowdown * state.collect_local_s,
        "optimizer": slowdown * optimizer(runs, cluster=cluster, model=model, calibration=calibration,
                                          num_experts=model.num_experts, layout=run.layout),
        "send_out": state.sendout_net_s + state.sendout_pcie_s + slowdown * state.sendout_local_s,
    }
    out["step"] = sum(out[phase] for phase in STEP_PHASES)
    return out


def predicted_phase(measured: str) -> str:
    """The predicted phase a measured one is compared with (MEASURED_AS)."""
    return MEASURED_AS.get(measured, measured)


def predict_run(*, run: RunData, calibration: Calibration) -> dict[str, float]:
    """Median seconds of every phase (PREDICTED_PHASES) over the run's steps after its warm-up."""
    steps = predict_steps(run=run, calibration=calibration)
    return {phase: float(np.median(values)) for phase, values in steps.items()}
