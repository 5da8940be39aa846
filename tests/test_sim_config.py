"""SimulationConfig: one validated, resolved description of a simulation, whose to_dict() is config.json."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli import symi
from symi_sim.cluster import Cluster
from symi_sim.models import ModelConfig
from symi_sim.simulator.calibration import FLOP_SOURCE, load_calibration
from symi_sim.simulator.convergence import paper_model
from symi_sim.simulator.driver import simulate
from symi_sim.simulator.sim_config import SimulationConfig
from symi_sim.traces.format import LoadTrace, write_trace

MODEL = ModelConfig(name="tiny", num_layers=2, num_moe_layers=2, d_model=64, d_ff=128, expert_d_ff=128,
                    vocab_size=100, num_experts=2, top_k=1, seq_len=8, global_batch=4)
CLUSTER = Cluster(name="two", num_nodes=2, gpus_per_node=1, slots_per_gpu=2)
TRACE = LoadTrace(np.tile(np.array([20, 12]), (5, 2, 1)), top_k=1, tokens_per_step=32)


def test_omitted_fields_resolve_to_what_is_simulated():
    config = SimulationConfig(trace=TRACE, cluster=CLUSTER, model=MODEL, policies=["static", "symi"])
    assert config.steps == 4 and config.policies == ("static", "symi")
    assert config.calibration.source == FLOP_SOURCE and config.optimizer_location == "host"
    assert config.convergence.describe() == paper_model().describe()
    gpu = config.with_(optimizer_location="gpu", steps=2)
    assert gpu.calibration.optimizer_state_location == "gpu" and gpu.steps == 2


def test_to_dict_is_every_field_in_order():
    config = SimulationConfig(trace=TRACE, cluster=CLUSTER, model=MODEL, policies=["symi-balanced"],
                              calibration=load_calibration("paper-a100-16-gpt-small"), trace_path="t.parquet")
    data = config.to_dict()
    assert list(data) == [f.name for f in dataclasses.fields(SimulationConfig)]
    assert data["policies"][0]["label"] == "symi-balanced" and data["policies"][0]["optimizer_layout"] == "sharded"
    assert data["calibration"]["source"].startswith("paper-a100-16-gpt-small")
    assert data["trace"]["num_steps"] == 5 and data["trace_path"] == "t.parquet" and data["failures"] is None
    json.dumps(data)   # plain JSON values only
    result = simulate(config, progress=False)
    assert result.config == data


@pytest.mark.parametrize(("change", "message"), [
    ({"policies": []}, "no policy to simulate"),
    ({"policies": ["symi", "symi"]}, "listed more than once"),
    ({"steps": 9}, "pass --loop"),
    ({"capacity_factor": 0}, "capacity factor"),
    ({"capacity_mode": "node"}, "capacity mode"),
    ({"window": 0}, "window"),
    ({"optimizer_location": "disk"}, "optimizer location"),
    ({"expert_state_accounting": "slots"}, "expert-state accounting"),
    ({"failures": "full-10"}, "failures must be"),
    ({"calibration": "paper"}, "calibration must be"),
])
def test_bad_configurations_are_refused(change, message):
    fields = {"trace": TRACE, "cluster": CLUSTER, "model": MODEL, "policies": ["static"], **change}
    with pytest.raises(ValueError, match=message):
        SimulationConfig(**fields)
    with pytest.raises(ValueError, match="not both"):
        simulate(SimulationConfig(trace=TRACE, cluster=CLUSTER, model=MODEL, policies=["static"]), steps=2)


def test_cli_config_json_is_the_configs_dict(tmp_path):
    trace_path = tmp_path / "t.parquet"
    write_trace(LoadTrace(np.tile(np.array([40, 24]), (4, 12, 1)), top_k=1, tokens_per_step=64 * 512),
                trace_path)
    out = tmp_path / "run"
    result = CliRunner().invoke(symi, ["simulate", "--trace", str(trace_path), "--cluster", "paper-a100-16",
                                       "--model", "gpt-small", "--policies", "static,symi", "--slots", "1",
                                       "--fit-model-to-trace", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "config.json").read_text())
    assert list(data) == [f.name for f in dataclasses.fields(SimulationConfig)]
    assert data["trace_path"] == str(trace_path) and data["steps"] == 3
    assert [p["label"] for p in data["policies"]] == ["static", "symi"]
