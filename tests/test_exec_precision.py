"""`symi train` precision and batch options: bfloat16 against float32 over 200 steps, gradient accumulation equal to
the single-process model on the whole batch, the options on the CLI and their checks, the policy's byte facts."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import one_error_line
from click.testing import CliRunner
from test_exec_train import assert_same_parameters, read_metrics, train_single_process

import symi_exec.launch
from cli import symi
from symi_exec.comm import Comm
from symi_exec.config import DTYPE_NAMES, TrainConfig
from symi_exec.data import get_batch, load_tokens
from symi_exec.launch import launch
from symi_exec.loop import executor_policy, step_batch
from symi_sim.traces.format import read_trace

# ---------------------------------------------------------------------------------------------- options


def test_precision_and_batch_options_reach_the_train_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    launched: list[TrainConfig] = []

    def fake_launch(config: TrainConfig, nproc_per_node: int, **_: object) -> Path:
        launched.append(config)
        raise symi_exec.launch.JobFailed("not launched")

    monkeypatch.setattr(symi_exec.launch, "launch", fake_launch)
    result = CliRunner().invoke(symi, ["train", "--out", str(tmp_path / "run"), "--grad-accum", "3", "--warmup-steps",
                                       "5", "--weight-decay", "0.02", "--clip-grad", "0", "--bucket-mb", "1.5",
                                       "--dtype", "bfloat16"])
    assert "not launched" in result.output, result.output
    config = launched[0]
    assert (config.grad_accum, config.warmup_steps, config.weight_decay, config.grad_clip, config.bucket_mb,
            config.dtype) == (3, 5, 0.02, 0.0, 1.5, "bfloat16")
    # the CLI lists the dtypes the executor knows, no more, no fewer
    dtype_option = next(p for p in symi.commands["train"].params if p.name == "dtype")
    assert tuple(dtype_option.type.choices) == DTYPE_NAMES


@pytest.mark.parametrize("args,message", [
    (["--grad-accum", "0"], "grad_accum must be a positive integer, got 0"),
    (["--grad-accum", "-2"], "grad_accum must be a positive integer, got -2"),
    (["--warmup-steps", "-1"], "warmup_steps must be an integer >= 0, got -1"),
    (["--weight-decay", "-0.1"], "weight_decay must be a finite number >= 0, got -0.1"),
    (["--weight-decay", "inf"], "weight_decay must be a finite number >= 0, got inf"),
    (["--clip-grad", "-1"], "grad_clip (--clip-grad) must be a finite number >= 0, got -1.0"),
    (["--clip-grad", "nan"], "grad_clip (--clip-grad) must be a finite number >= 0, got nan"),
    (["--bucket-mb", "0"], "bucket_mb must be a finite number > 0, got 0.0"),
    (["--dtype", "bfloat16", "--lr", "1e38"], "lr 1e+38 is too large for bfloat16"),
])
def test_bad_precision_and_batch_options_are_one_error_line(tmp_path: Path, args: list[str], message: str) -> None:
    line = one_error_line(tmp_path, "train", "--out", tmp_path / "run", *args)
    assert message in line


def test_policy_facts_count_float32_masters_under_bfloat16() -> None:
    for dtype, value_bytes, optimizer_bytes in (("float32", 4, 12), ("float64", 8, 24), ("bfloat16", 2, 12)):
        flexmoe = executor_policy(TrainConfig(out="unused", policy="flexmoe", dtype=dtype))
        assert (flexmoe.weight_bytes, flexmoe.optimizer_bytes) == (value_bytes, optimizer_bytes)
        fastermoe = executor_policy(TrainConfig(out="unused", policy="fastermoe", dtype=dtype))
        assert (fastermoe.weight_bytes, fastermoe.activation_bytes) == (value_bytes, value_bytes)


def test_micro_batches_tile_the_same_global_batch_for_any_ranks_times_micro_batches() -> None:
    tokens = load_tokens(TrainConfig(out="unused").data_path())
    for total in (1, 2, 4, 6):
        for step in (0, 3):
            whole_x, whole_y = get_batch(tokens, step, rank=0, world_size=1, batch_size=2 * total, seq_len=64,
                                         seed=7)
            for world_size in (g for g in range(1, total + 1) if total % g == 0):
                config = TrainConfig(out="unused", batch_size=2, grad_accum=total // world_size, seed=7)
                for rank in range(world_size):
                    comm = Comm(rank=rank, world_size=world_size, device=torch.device("cpu"))
                    for micro in range(config.grad_accum):
                        x, y = step_batch(tokens, step, micro, config=config, comm=comm)
                        row = 2 * (micro * world_size + rank)
                        assert torch.equal(x, whole_x[row:row + 2]) and torch.equal(y, whole_y[row:row + 2])


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_two_ranks_two_micro_batches_equal_one_process_on_the_whole_batch(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """float64, dropless, no auxiliary loss: the mean over micro-batches of the ranks' mean losses is the loss of the
    whole G B M batch, so its gradients, clipping and AdamW steps are the single-process model's."""
    num_ranks, num_micro = 2, 2
    config = TrainConfig(out=str(tmp_path / "run"), num_experts=4, slots_per_rank=3, top_k=2, policy="symi",
                         steps=3, batch_size=2, grad_accum=num_micro, dtype="float64", seed=3, lr=1e-2,
                         capacity_factor=None, aux_loss_coef=0.0, record_trace=True, bucket_mb=0.05)
    launch(config, num_ranks)
    out = Path(config.out)
    norms: list[float] = []   # the reference's gradient norms, as its clip_grad_norm_ returns them
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: norms.append(float(clip(*a, **k))))
    reference, losses, counts_SLEH = train_single_process(config, num_ranks * num_micro)
    assert_same_parameters(out, reference, config.seed)
    rows = read_metrics(out)
    assert [row["loss"] for row in rows] == pytest.approx(losses, rel=1e-12)
    # the gradient itself, not only its direction (clipping and AdamW would hide a factor): the whole batch's norm
    assert [row["grad_norm"] for row in rows] == pytest.approx(norms, rel=1e-10)
    assert all(norm > config.grad_clip for norm in norms)   # clipping active
    # counts summed over the micro-batches: reference "rank" h = micro m G + rank r of the executor
    counts_SLEG = counts_SLEH.reshape(*counts_SLEH.shape[:3], num_micro, num_ranks).sum(axis=3)
    trace = read_trace(out / "trace.parquet")
    np.testing.assert_array_equal(trace.src_counts_SLEG, counts_SLEG)
    assert trace.tokens_per_step == num_ranks * num_micro * 2 * 64
    assert all(row["bytes_dense_grad"] > 0 for row in rows)


@pytest.mark.slow
def test_bfloat16_trains_like_float32_over_200_steps(tmp_path: Path) -> None:
    """The tiny model, 200 steps, one rank, same seed: bfloat16's loss curve stays near float32's (README: mean
    |difference| over the last 50 steps measured 0.021-0.037 nats over seeds 0-2; final 0.07-0.34%)."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        config = TrainConfig(out=str(tmp_path / dtype), num_experts=4, slots_per_rank=4, steps=200, dtype=dtype,
                             seed=0, log_interval=1000)
        launch(config, 1)
        with open(tmp_path / dtype / "metrics.csv") as f:
            losses[dtype] = np.array([float(row["loss"]) for row in csv.DictReader(f)])
    fp32, bf16 = losses["float32"], losses["bfloat16"]
    assert fp32[-50:].mean() < fp32[0] - 1.5   # it learned: the comparison is of two trained curves
    assert np.abs(fp32 - bf16)[-50:].mean() < 0.075
    assert abs(bf16[-1] - fp32[-1]) < 0.02 * fp32[-1]
    assert not np.array_equal(fp32, bf16)   # really another precision
    state = torch.load(tmp_path / "bfloat16" / "checkpoint.pt")["model"]
    assert {value.dtype for value in state.values()} == {torch.bfloat16}


def test_dtype_names_cover_every_known_dtype_and_config_checks_them(tmp_path: Path) -> None:
    for dtype in DTYPE_NAMES:
        dataclasses.replace(TrainConfig(out=str(tmp_path / "run")), dtype=dtype).validate(2)
    with pytest.raises(ValueError, match="unknown dtype 'float16'"):
        TrainConfig(out=str(tmp_path / "run"), dtype="float16").validate(2)


@pytest.mark.slow
def test_bfloat16_resume_continues_exactly_from_the_float32_masters(tmp_path: Path) -> None:
    """A bfloat16 run killed after two steps and resumed ends bit for bit where the uninterrupted run ends: the
    checkpoint carries the dense float32 master weights, not only their bfloat16 cast."""
    from symi_exec.supervise import JobFailed

    common = {"num_experts": 2, "slots_per_rank": 2, "steps": 4, "dtype": "bfloat16", "seed": 4, "log_interval": 1000}
    straight = TrainConfig(out=str(tmp_path / "straight"), **common)
    launch(straight, 1)
    root = tmp_path / "checkpoints"
    killed = TrainConfig(out=str(tmp_path / "killed"), checkpoint_every=1, checkpoint_dir=str(root), fail_at_step=2,
                         **common)
    with pytest.raises(JobFailed):
        launch(killed, 1)
    launch(dataclasses.replace(killed, out=str(tmp_path / "resumed"), resume=str(root), checkpoint_dir=None,
                               fail_at_step=None), 1)
    want = torch.load(tmp_path / "straight" / "checkpoint.pt")["model"]
    got = torch.load(tmp_path / "resumed" / "checkpoint.pt")["model"]
    assert set(got) == set(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    with open(tmp_path / "resumed" / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
