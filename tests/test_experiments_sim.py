"""The simulator studies under experiments/ (paper_comparison, scale_out, sensitivity): their --quick variants run
and write tables and figures whose content holds the properties that must hold. (sensitivity's aux-loss axis also
trains: two short gloo runs on CPU.) Also: the shared harness (run directory with config.json), every study runs as
`python -m experiments.<study>`, and no source file of the repository edits the import path or loads a module from a
file path."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from experiments import harness
from experiments.paper_comparison import study as paper_comparison
from experiments.scale_out import study as scale_out
from experiments.sensitivity import study as sensitivity_study
from symi_sim.outputs import timestamped_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STUDIES = ("paper_comparison", "scale_out", "sensitivity", "capacity_factor", "convergence_calibration")
MODULES = {"paper_comparison": paper_comparison, "scale_out": scale_out, "sensitivity": sensitivity_study}


def _run_quick(study: str, tmp_path_factory) -> tuple[object, Path]:
    module = MODULES[study]
    out = tmp_path_factory.mktemp(study) / "run"
    assert module.main(["--quick", "--out", str(out)]) == out
    return module, out


def _check_config(out: Path, study: str) -> dict:
    """config.json of a quick run made by _run_quick: the study, its resolved arguments and its command line."""
    config = json.loads((out / "config.json").read_text())
    assert config["study"] == study
    assert config["args"]["quick"] is True and config["args"]["out"] == str(out)
    assert config["argv"] == ["--quick", "--out", str(out)]
    assert config["command"] == f"python -m experiments.{study} --quick --out {out}"
    return config["args"]


def _check_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000, path


def _check_common(table: pd.DataFrame, group_keys: list[str]) -> None:
    """Properties of any simulator summary table grouped into runs by `group_keys`."""
    phases = [c for c in table.columns if c.startswith("phase_") and c.endswith("_s")]
    assert len(phases) == 13
    # the critical-path phases add up to the iteration time (means of sums = sums of means)
    np.testing.assert_allclose(table[phases].sum(axis=1), table["mean_time_s"], rtol=1e-9)
    np.testing.assert_allclose(table["time_to_target_s"], table["iterations_to_target"] * table["mean_time_s"],
                               rtol=1e-9)
    assert ((table["survival"] > 0) & (table["survival"] <= 1)).all()
    for _, rows in table.groupby(group_keys):
        assert rows["policy"].is_unique
        static = rows[rows["policy"] == "static"]
        assert len(static) == 1
        assert static["speedup_vs_static"].iloc[0] == pytest.approx(1.0)
        np.testing.assert_allclose(rows["speedup_vs_static"],
                                   static["time_to_target_s"].iloc[0] / rows["time_to_target_s"], rtol=1e-9)


# ---------------------------------------------------------------- paper_comparison


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    return _run_quick("paper_comparison", tmp_path_factory)


def test_paper_comparison_outputs(paper):
    module, out = paper
    table = pd.read_csv(out / "table.csv")
    summary = json.loads((out / "summary.json").read_text())
    traces = list(module.QUICK_TRACES)
    assert list(dict.fromkeys(table["trace"])) == traces
    for trace in traces:
        assert table.loc[table["trace"] == trace, "policy"].tolist() == list(module.POLICIES) + [
            p + module.PAPER_ACCOUNTING_SUFFIX for p in module.PAPER_ACCOUNTING]
        _check_png(out / f"comparison-{trace}.png")
    _check_png(out / "speedup.png")
    assert summary["paper"]["reduction_vs_static"] == 0.305 and summary["paper"]["reduction_vs_flexmoe"] == 0.259
    assert [t["trace"] for t in summary["traces"]] == traces
    assert all(t["steps"] == 20 for t in summary["traces"])
    assert "tiled" in summary["traces"][0]["mapping"]
    assert set(summary["headline"]) == set(traces)
    args = _check_config(out, "paper_comparison")
    assert args["steps"] == 20 and args["traces"] == traces
    # the paper's configuration runs on the calibration fitted to the paper's measured latencies
    assert args["calibration"] == summary["calibration"] == module.CALIBRATION == "paper-a100-16-gpt-small"
    assert all(t["calibration"].startswith("paper-a100-16-gpt-small") for t in summary["traces"])


def test_paper_comparison_consistency(paper):
    module, out = paper
    table = pd.read_csv(out / "table.csv")
    _check_common(table, ["trace"])
    np.testing.assert_allclose(table["reduction_vs_static"], 1 - 1 / table["speedup_vs_static"], rtol=1e-9,
                               atol=1e-12)
    for _, rows in table.groupby("trace"):
        by = rows.set_index("policy")
        # the best FlexMoE is the reference of reduction_vs_flexmoe: its own reduction is 0, no FlexMoE beats it
        best = by["best_flexmoe"].iloc[0]
        assert best in module.FLEXMOE_SCHEDULED
        assert by.loc[best, "reduction_vs_flexmoe"] == pytest.approx(0.0)
        assert (by.loc[list(module.FLEXMOE_SCHEDULED), "reduction_vs_flexmoe"] <= 1e-12).all()
        assert (by.loc[list(module.FLEXMOE_RULE), "reduction_vs_flexmoe_rule"] <= 1e-12).all()
        # SYMI-system policies never move optimizer state; FlexMoE's layout sends no weights over the network
        for policy in ("symi", "symi-balanced", "symi-balanced:packing=grouped", "eplb", "oracle:packing=grouped"):
            assert by.loc[policy, "bytes_migration"] == 0
        for policy in (*module.FLEXMOE_RULE, *module.FLEXMOE_SCHEDULED):
            assert by.loc[policy, "bytes_weight_sendout"] == 0
        # the paper's accounting counts every slot of an expert as a sender: same plans and drops, never fewer bytes
        for policy in module.PAPER_ACCOUNTING:
            paper = policy + module.PAPER_ACCOUNTING_SUFFIX
            assert by.loc[paper, "survival"] == by.loc[policy, "survival"]
            assert by.loc[paper, "bytes_grad_collect"] >= by.loc[policy, "bytes_grad_collect"] > 0
        # packing changes where replicas go, not how many: in slot mode drops are the same
        assert by.loc["symi-balanced", "survival"] == by.loc["symi-balanced:packing=grouped", "survival"]
        # grouped packing puts each expert on fewer GPUs: less gradient collection than balanced packing
        assert by.loc["symi-balanced:packing=grouped", "bytes_grad_collect"] < by.loc["symi-balanced",
                                                                                     "bytes_grad_collect"]


def test_paper_comparison_layer_mapping(paper):
    module, _ = paper
    model, trace, mapping = module.load_case("recorded-tile12")
    recorded = module.read_trace(module.RECORDED)
    assert model.num_moe_layers == model.num_layers == 12 and trace.num_layers == 12
    assert trace.tokens_per_step == model.tokens_per_step == 32768
    # block b replays recorded layer b % 2: same popularity (up to the rescale's rounding)
    share = trace.counts_SLE / trace.counts_SLE.sum(axis=2, keepdims=True)
    recorded_share = recorded.counts_SLE / recorded.counts_SLE.sum(axis=2, keepdims=True)
    for block in range(12):
        np.testing.assert_allclose(share[:, block], recorded_share[:, block % 2], atol=1e-4)
    adopt_model, adopt_trace, _ = module.load_case("recorded-adopt2")
    assert adopt_model.num_moe_layers == 2 and adopt_model.num_layers == 12 and adopt_trace.num_layers == 2


# ---------------------------------------------------------------- scale_out


@pytest.fixture(scope="module")
def scale(tmp_path_factory):
    return _run_quick("scale_out", tmp_path_factory)


def test_scale_out_outputs(scale):
    module, out = scale
    table = pd.read_csv(out / "table.csv")
    summary = json.loads((out / "summary.json").read_text())
    _check_png(out / "phases.png")
    _check_png(out / "time_to_target.png")
    points = [p.label for p in module.QUICK_POINTS]
    assert list(dict.fromkeys(table["point"])) == points
    assert [p["point"] for p in summary["points"]] == points
    for point in points:
        assert table.loc[table["point"] == point, "policy"].tolist() == list(module.POLICIES)
    _check_common(table, ["point"])
    assert (table["num_gpus"] == table["num_nodes"] * table["gpus_per_node"]).all()
    args = _check_config(out, "scale_out")
    assert args["small_steps"] == 4 and args["large_steps"] == 4 and args["skip"] == 100 and args["points"] == points
    # weak scaling: every GPU sees the same tokens per step within a model family
    per_gpu = table["tokens_per_step"] / table["num_gpus"]
    for _, rows in table.groupby("model"):
        assert per_gpu[rows.index].nunique() == 1
    # every GPU holds slots for every expert of every layer: the experts fit in the slots
    assert (table["num_gpus"] * table["slots_per_gpu"] >= table["num_experts"]).all()


def test_scale_out_full_points():
    module = scale_out
    gpus = sorted({p.num_gpus for p in module.POINTS})
    assert gpus == [16, 64, 256, 1024, 2048]
    assert any(p.preset == "paper-a100-16" for p in module.POINTS)
    for point in module.POINTS:
        model = module.point_model(point)
        assert point.cluster.num_slots >= model.num_experts
        if point.model == "deepseek-v3":
            assert model.tokens_per_step / point.num_gpus == 7.5 * 4096
    at_2048 = [p for p in module.POINTS if p.num_gpus == 2048]
    assert module.point_model(at_2048[0]).global_batch == 15360  # DeepSeek-V3's own batch


# ---------------------------------------------------------------- sensitivity


@pytest.fixture(scope="module")
def sensitivity(tmp_path_factory):
    return _run_quick("sensitivity", tmp_path_factory)


@pytest.mark.slow   # the quick sensitivity study takes about 40 s
def test_sensitivity_outputs(sensitivity):
    module, out = sensitivity
    table = pd.read_csv(out / "table.csv")
    summary = json.loads((out / "summary.json").read_text())
    _check_png(out / "sensitivity.png")
    assert summary["quick"] and summary["axes"] == {k: list(v) for k, v in module.AXES.items()}
    assert set(table["policy"]) == set(module.POLICIES)
    for axis, values in module.AXES.items():
        for trace in module.TRACES:
            got = sorted(table.loc[(table["axis"] == axis) & (table["trace"] == trace), "value"].unique())
            expected = [float(v) for v in values if not (trace == "recorded" and axis == "top_k" and v == 4)]
            assert got == expected, (axis, trace)
    _check_common(table, ["axis", "value", "trace"])
    args = _check_config(out, "sensitivity")
    assert args["steps"] == 8 and not args["no_aux"]
    assert args["aux_steps"] == module.aux_loss.QUICK_STEPS and args["aux_coefs"] == list(module.aux_loss.QUICK_COEFS)


@pytest.mark.slow   # the quick sensitivity study takes about 40 s
def test_sensitivity_properties(sensitivity):
    _, out = sensitivity
    table = pd.read_csv(out / "table.csv")
    # one slot per GPU = 16 slots for 16 experts: every policy must give each expert one slot, so the same drops
    one_slot = table[(table["axis"] == "slots") & (table["value"] == 1)]
    for _, rows in one_slot.groupby("trace"):
        assert rows["survival"].nunique() == 1
    # static ignores the popularity window
    static_window = table[(table["axis"] == "window") & (table["policy"] == "static")]
    for _, rows in static_window.groupby("trace"):
        assert rows["survival"].nunique() == 1 and rows["mean_time_s"].nunique() == 1
    # placements do not depend on the capacity factor: bigger buffers never drop more
    capacity = table[table["axis"] == "capacity"]
    for _, rows in capacity.groupby(["trace", "policy"]):
        survival = rows.sort_values("value")["survival"].to_numpy()
        assert (np.diff(survival) >= -1e-12).all()
    # top-k: the model follows the trace (k x tokens assignments); slot buffers grow with k, so static's
    # iteration gets slower
    static_k = table[(table["axis"] == "top_k") & (table["policy"] == "static") & (table["trace"] == "synthetic")]
    assert (np.diff(static_k.sort_values("value")["mean_time_s"].to_numpy()) > 0).all()


@pytest.mark.slow   # the quick sensitivity study takes about 40 s
def test_sensitivity_aux_loss_axis(sensitivity):
    """The aux-loss axis: every quick coefficient trained and simulated; the table's skew and static survival are
    those of the recorded trace, computed here without the simulator."""
    from symi_sim.cluster import load_cluster
    from symi_sim.models import load_model
    from symi_sim.placement import Placement
    from symi_sim.routing import route
    from symi_sim.traces.fit import fit_trace, tile_layers
    from symi_sim.traces.format import read_trace

    module, out = sensitivity
    aux = module.aux_loss
    table = pd.read_csv(out / "table.csv")
    summary = json.loads((out / "summary.json").read_text())
    rows = table[table["axis"] == aux.AXIS]
    assert sorted(rows["value"].unique()) == sorted(aux.QUICK_COEFS)
    assert set(rows["trace"]) == {"recorded"}
    assert summary["aux_loss"]["coefs"] == list(aux.QUICK_COEFS)
    assert [r["coef"] for r in summary["aux_loss"]["runs"]] == list(aux.QUICK_COEFS)
    cluster = load_cluster(module.CLUSTER)
    for coef, group in rows.groupby("value"):
        assert sorted(group["policy"]) == sorted(module.POLICIES)
        assert ((group["survival"] >= 0) & (group["survival"] <= 1)).all()
        assert (group["cfg_aux_loss_coef"] == coef).all()
        recorded = read_trace(out / group["trace_path"].iloc[0])
        assert recorded.num_steps == aux.QUICK_STEPS and recorded.num_experts == 16
        skew = np.median(recorded.counts_SLE.max(axis=2) / recorded.counts_SLE.mean(axis=2), axis=0).mean()
        assert group["trace_skew"].iloc[0] == pytest.approx(skew, rel=1e-9) and skew >= 1
        # static: slot p holds expert p % 16 on all 12 tiled layers; steps 1..n routed at capacity factor 1.0
        model, trace = fit_trace(load_model(module.MODEL), tile_layers(recorded, 12))
        placement = Placement.even(np.tile(np.arange(cluster.num_slots) % 16, (12, 1)), 16)
        n = int(group["trace_steps"].iloc[0])
        dropped = assignments = 0
        for step in range(1, n + 1):
            routing = route(trace.counts_SLE[step], placement, slots_per_gpu=cluster.slots_per_gpu,
                            capacity_factor=1.0, num_assignments_L=trace.num_assignments_L(step))
            dropped += routing.dropped_LE.sum()
            assignments += routing.num_assignments_L.sum()
        static = group[group["policy"] == "static"]["survival"].iloc[0]
        assert static == pytest.approx(1 - dropped / assignments, rel=1e-9)
        assert static == pytest.approx(next(r["static_survival"] for r in summary["aux_loss"]["runs"]
                                            if r["coef"] == coef), abs=1e-4)


# ---------------------------------------------------------------- the harness and the package


def test_timestamped_run_directory(tmp_path):
    assert re.fullmatch(r"runs/study-\d{8}-\d{6}", timestamped_dir("study").as_posix())
    assert re.fullmatch(r"x-\d{8}-\d{6}", timestamped_dir("x", tmp_path).name)
    assert timestamped_dir("x", tmp_path).parent == tmp_path
    assert harness.run_path("scale_out", None).parent == Path("runs")
    assert harness.run_path("scale_out", tmp_path / "here") == tmp_path / "here"


def test_run_dir_writes_config_and_refuses_a_non_empty_directory(tmp_path):
    out = tmp_path / "run"
    with harness.run_dir(out, study="demo", args={"steps": np.int64(3), "out": out}, argv=["--steps", "3"]) as tmp:
        assert not out.exists()
        harness.write_json(tmp / "summary.json", {"x": np.float64(0.5)})
    config = json.loads((out / "config.json").read_text())
    assert config["study"] == "demo" and config["args"] == {"steps": 3, "out": str(out)}
    assert config["command"] == "python -m experiments.demo --steps 3"
    assert json.loads((out / "summary.json").read_text()) == {"x": 0.5}
    with pytest.raises(ValueError, match="not empty"):
        with harness.run_dir(out, study="demo", args={}, argv=[]):
            pass
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "summary.json"]


def test_write_rows_leaves_none_empty(tmp_path):
    harness.write_rows(tmp_path / "t.csv", ["a", "b"], [{"a": 1, "b": None}, [2.5, "x"]])
    assert (tmp_path / "t.csv").read_bytes() == b"a,b\r\n1,\r\n2.5,x\r\n"


@pytest.mark.parametrize("study", STUDIES)
def test_every_study_runs_as_a_module(study):
    result = subprocess.run([sys.executable, "-m", f"experiments.{study}", "--help"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m experiments.{study}")
    assert "--quick" in result.stdout and "--out" in result.stdout


# Edits of the import path and loading modules from file paths. Each pattern is written so that this file's own
# text does not match it (an escaped dot, or a final letter in brackets).
FORBIDDEN = re.compile(
    r"\bsys\.path\s*(\.\s*(insert|append|extend|remove|pop|clear)\b|\[[^\]]*\]\s*=|\+?=(?!=))"
    r"|spec_from_file_locatio[n]|SourceFileLoade[r]|SourcelessFileLoade[r]|runpy\.run_path|imp\.load_source"
    r"|site\.addsitedir")
SKIPPED_DIRS = {".venv", ".git", "__pycache__", "build", "dist", "runs"}


def _sources() -> list[Path]:
    found = []
    for path in sorted(REPO_ROOT.rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).parts[:-1]
        if not any(part in SKIPPED_DIRS or part.startswith(".") or part.endswith(".egg-info") for part in parts):
            found.append(path)
    return found


def test_forbidden_pattern_catches_path_edits():
    bad = ["sys.path" + ".insert(0, str(ROOT))", "sys.path" + ".append(here)", "sys.path" + "[:0] = [root]",
           "sys.path" + " += [root]", "sys.path" + " = [root]",
           "importlib.util.spec_from_file" + "_location(name, path)", "runpy.run" + "_path('x.py')"]
    for line in bad:
        assert FORBIDDEN.search(line), line
    for line in ["if root in sys.path" + ":", "print(sys.path" + ")", "sys.path" + " == before",
                 "importlib.import_module('symi_sim.policies.eplb')"]:
        assert not FORBIDDEN.search(line), line


def test_no_source_edits_the_import_path_or_loads_modules_by_path():
    sources = _sources()
    assert Path(__file__).resolve() in sources and REPO_ROOT / "experiments" / "harness.py" in sources
    offenders = [f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}"
                 for path in sources
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
                 if FORBIDDEN.search(line)]
    assert not offenders, "import path edits or file-path module loading:\n" + "\n".join(offenders)
