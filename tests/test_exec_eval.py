"""Validation loss on 2 gloo ranks: equal to a single-process computation of the same batches with the run's
checkpoint.pt (float64, dropless), without disturbing training (the same run without evaluations is identical);
and a reduced gpt-small trains on `symi data prepare` output and reports it."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cli import symi
from symi_exec.config import DEFAULT_DATA, TrainConfig
from symi_exec.data import load_data, val_batch
from symi_exec.launch import launch
from symi_exec.model import GPT, ModelConfig
from symi_exec.prepare import prepare_data

# spawns training ranks: `make test-fast` (pytest -m "not slow") leaves this module out
pytestmark = pytest.mark.slow

NUM_RANKS = 2
TIMING = ("step_s", "tokens_per_s", "peak_memory_mib")   # measured, not computed


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMING and not k.startswith("time_")}
                for row in csv.DictReader(f)]


def reference_val_loss(out: Path, config: TrainConfig) -> float:
    """The mean cross-entropy of the validation batches over all G*B rows, by a single-device GPT loading
    checkpoint.pt (every expert local, nothing dropped)."""
    saved = torch.load(out / "checkpoint.pt")
    model = GPT(ModelConfig(**saved["model_config"])).to(torch.float64)
    model.load_state_dict(saved["model"])
    val = load_data(config.data_path()).val
    losses = []
    with torch.no_grad():
        for index in range(config.eval_batches):
            x, y = val_batch(val, index, rank=0, world_size=1, batch_size=NUM_RANKS * config.batch_size,
                             seq_len=model.config.seq_len, seed=config.seed)
            logits, _ = model(x)
            losses.append(float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))))
    return sum(losses) / len(losses)


def test_validation_loss_equals_the_single_process_model_and_leaves_training_alone(tmp_path: Path) -> None:
    data = tmp_path / "data"
    text = tmp_path / "t.txt"
    text.write_text(DEFAULT_DATA.read_text()[:60_000])
    prepare_data(sources=[text], vocab_size=400, out=data)
    config = TrainConfig(out=str(tmp_path / "eval"), data=str(data), num_experts=4, slots_per_rank=3, top_k=2,
                         policy="symi", steps=5, batch_size=2, dtype="float64", capacity_factor=None, lr=1e-2,
                         eval_every=2, eval_batches=3, seed=1, model_overrides={"seq_len": 32})
    plain = dataclasses.replace(config, out=str(tmp_path / "plain"), eval_every=0)
    launch(config, NUM_RANKS)
    launch(plain, NUM_RANKS)
    evaluated, not_evaluated = _rows(Path(config.out)), _rows(Path(plain.out))
    # after steps 2 and 4 (1-based) and after the last one; empty elsewhere
    assert [row["val_loss"] != "" for row in evaluated] == [False, True, False, True, True]
    assert all(row["val_loss"] == "" for row in not_evaluated)
    assert float(evaluated[-1]["val_loss"]) == pytest.approx(reference_val_loss(Path(config.out), config), rel=1e-12)
    assert float(evaluated[1]["val_loss"]) != float(evaluated[3]["val_loss"])   # the model changed in between
    assert math.log(400) - 1 < float(evaluated[1]["val_loss"]) < math.log(400) + 0.5
    # training is untouched: every other column (losses, gradient norms, bytes per kind, drops, moves), every
    # placement and every final weight
    for row, plain_row in zip(evaluated, not_evaluated, strict=True):
        assert {k: v for k, v in row.items() if k != "val_loss"} == {k: v for k, v in plain_row.items()
                                                                     if k != "val_loss"}
    assert sum(int(row["replica_moves"]) for row in evaluated) > 0
    assert (Path(config.out) / "placements.jsonl").read_text() == (Path(plain.out) / "placements.jsonl").read_text()
    state, plain_state = (torch.load(Path(c.out) / "checkpoint.pt")["model"] for c in (config, plain))
    assert all(torch.equal(state[name], plain_state[name]) for name in plain_state)


def test_reduced_gpt_small_trains_on_prepared_data_and_reports_validation_loss(tmp_path: Path) -> None:
    data = tmp_path / "data"
    runner = CliRunner()
    result = runner.invoke(symi, ["data", "prepare", str(DEFAULT_DATA), "--vocab-size", "512", "--out", str(data)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "run"
    result = runner.invoke(symi, ["train", "--model", "gpt-small", "--n-layer", "2", "--seq-len", "64", "--data",
                                  str(data), "--experts", "4", "--slots", "2", "--batch-size", "1", "--steps", "3",
                                  "--eval-every", "2", "--eval-batches", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    model = json.loads((out / "config.json").read_text())["model"]
    assert {k: model[k] for k in ("num_layers", "d_model", "num_heads", "d_ff", "seq_len", "vocab_size")} == {
        "num_layers": 2, "d_model": 768, "num_heads": 12, "d_ff": 3072, "seq_len": 64, "vocab_size": 512}
    rows = _rows(out)
    assert [row["val_loss"] != "" for row in rows] == [False, True, True]
    for row in rows[1:]:   # near a uniform guess over 512 tokens after 2 and 3 steps
        assert abs(float(row["val_loss"]) - math.log(512)) < 1.0
