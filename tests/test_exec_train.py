"""THE correctness bar: k steps of expert-parallel training on 2 gloo ranks, with placements that change every
step, give the same parameters (float64) as the same model trained in one process without expert parallelism."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from symi_exec.config import TrainConfig
from symi_exec.data import get_batch, load_tokens, lr_at
from symi_exec.launch import launch
from symi_exec.model import GPT, param_groups
from symi_sim.traces.format import read_trace

# spawns training ranks: `make test-fast` (pytest -m "not slow") leaves this module out
pytestmark = pytest.mark.slow

NUM_RANKS = 2


def train_single_process(config: TrainConfig, world_size: int,
                         keep_rules: Callable[[int], list[Callable[[torch.Tensor], torch.Tensor]]] | None = None
                         ) -> tuple[GPT, list[float], np.ndarray]:
    """The reference: one process, all experts local, torch's AdamW and clip_grad_norm_ on the global batch.

    keep_rules(step): each MoE layer's rule for which assignments the step serves (model.MoE.keep_rule), applied to
    the step's training forward (default: every assignment served). Returns the model, the loss per step and the
    router counts per (step, layer, expert, source rank).
    """
    cfg = config.model_config()
    torch.manual_seed(config.seed)
    model = GPT(cfg, seed=config.seed).to(torch.float64)
    opt = torch.optim.AdamW(param_groups(list(model.named_parameters()), config.weight_decay), lr=config.lr,
                            betas=(config.beta1, config.beta2), eps=1e-8, foreach=False)
    tokens = load_tokens(config.data_path())
    losses, counts = [], []
    for step in range(config.steps):
        x, y = get_batch(tokens, step, rank=0, world_size=1, batch_size=world_size * config.batch_size,
                         seq_len=cfg.seq_len, seed=config.seed)
        with torch.no_grad():   # per-source-rank counts: the router on each rank's rows
            per_rank = []
            for rank in range(world_size):
                model(x[rank * config.batch_size:(rank + 1) * config.batch_size])
                per_rank.append([moe.count_E.numpy() for moe in model.moe_layers])
        counts.append(np.array(per_rank).transpose(1, 2, 0))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config)
        rules = keep_rules(step) if keep_rules is not None else [None] * cfg.num_layers
        for moe, rule in zip(model.moe_layers, rules, strict=True):
            moe.keep_rule = rule
        _, loss = model(x, y)
        for moe in model.moe_layers:
            moe.keep_rule = None
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
    return model, losses, np.stack(counts)


def scheme_bytes(phy2log_LR: np.ndarray, next_phy2log_LR: np.ndarray, slots_per_rank: int, num_ranks: int,
                 expert_numel: int, elem_bytes: int) -> dict[str, int]:
    """SYMI's per-step expert traffic, summed over ranks, counted by hand from the placements.

    collection (the paper's replica sync and collection fused): every holder rank of an expert sends every other
    rank that rank's shard of its partial gradient, P - (its own shard) elements per holder; send-out: every holder
    of the next placement receives every shard it does not own itself. Shards: P split evenly (the first P % G
    shards one larger).
    """
    shard = [expert_numel // num_ranks + (r < expert_numel % num_ranks) for r in range(num_ranks)]
    collect = sendout = 0
    for phy2log_R, next_R in zip(phy2log_LR, next_phy2log_LR, strict=True):
        for e in range(phy2log_R.max() + 1):
            holders = set(np.flatnonzero(phy2log_R == e) // slots_per_rank)
            collect += sum(expert_numel - shard[h] for h in holders)
            next_holders = set(np.flatnonzero(next_R == e) // slots_per_rank)
            sendout += sum(expert_numel - shard[d] for d in next_holders)
    return {"bytes_replica_grad_sync": 0, "bytes_grad_collection": collect * elem_bytes,
            "bytes_weight_sendout": sendout * elem_bytes}


def replica_sync_bytes(phy2log_LR: np.ndarray, slots_per_rank: int, expert_numel: int, elem_bytes: int) -> int:
    """The replica layout's gradient all-reduce among an expert's h holder ranks, as reduce-scatter + all-gather:
    2 (h - 1) P elements per expert, summed over ranks."""
    total = 0
    for phy2log_R in phy2log_LR:
        for e in range(phy2log_R.max() + 1):
            total += 2 * (len(set(np.flatnonzero(phy2log_R == e) // slots_per_rank)) - 1) * expert_numel
    return total * elem_bytes


def read_metrics(out: Path) -> list[dict[str, float]]:
    with open(out / "metrics.csv") as f:
        return [{k: float(v or "nan") for k, v in row.items()} for row in csv.DictReader(f)]


def assert_same_parameters(out: Path, reference: GPT, seed: int) -> None:
    state = torch.load(out / "checkpoint.pt")["model"]
    ref_state = reference.state_dict()
    assert set(state) == set(ref_state)
    for name, value in ref_state.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=1e-10, msg=name)
    # the run really trained: parameters moved away from the initial ones
    torch.manual_seed(seed)
    init = GPT(reference.config, seed=seed).to(torch.float64).state_dict()
    assert max(float((state[n] - init[n]).abs().max()) for n in init) > 1e-3


def train_and_compare(config: TrainConfig, planner=None, *, num_ranks: int = NUM_RANKS
                      ) -> tuple[Path, list[dict[str, float]], np.ndarray]:
    """Train `config` on `num_ranks` gloo ranks and in one process without expert parallelism; assert equal
    parameters and per-step losses. Returns (run directory, metrics rows, the reference's per-rank counts)."""
    launch(config, num_ranks, planner=planner)
    out = Path(config.out)
    reference, losses, counts_SLEG = train_single_process(config, num_ranks)
    assert_same_parameters(out, reference, config.seed)
    rows = read_metrics(out)
    assert [row["loss"] for row in rows] == pytest.approx(losses, rel=1e-12)
    return out, rows, counts_SLEG


def test_symi_matches_single_process_and_moves_no_optimizer_state(tmp_path: Path) -> None:
    config = TrainConfig(out=str(tmp_path / "run"), num_experts=4, slots_per_rank=3, top_k=2, policy="symi",
                         steps=3, batch_size=2, dtype="float64", record_trace=True, seed=0, lr=1e-2,
                         capacity_factor=None)
    out, rows, counts_SLEG = train_and_compare(config)
    assert sum(row["replica_moves"] for row in rows[:-1]) > 0        # the placement did change between steps
    assert all(row["bytes_optimizer_state"] == 0 for row in rows)    # SYMI never moves optimizer state
    assert all(row["bytes_weight_sendout"] > 0 and row["bytes_grad_collection"] > 0 for row in rows)
    assert all(row["dropped_fraction"] == 0 for row in rows)
    # every expert byte the run moved is a gradient or a weight of the paper's scheme: none is optimizer state
    lines = (out / "placements.jsonl").read_text().splitlines()
    phy2log_SLR = [np.array(json.loads(line)["phy2log"]) for line in lines]
    final = torch.load(out / "checkpoint.pt")["placement"]   # the placement after the last step
    phy2log_SLR.append(np.array([layer["phy2log"] for layer in final["layers"]]))
    cfg = config.model_config()
    for step, row in enumerate(rows):
        want = scheme_bytes(phy2log_SLR[step], phy2log_SLR[step + 1], config.slots_per_rank, NUM_RANKS,
                            cfg.expert_numel, 8)
        assert {kind: row[kind] for kind in want} == want
    # some expert had replicas on both ranks: the fused collection summed them, no separate replica sync
    assert any(len(set(np.flatnonzero(phy2log_R == e) // config.slots_per_rank)) > 1
               for phy2log_LR in phy2log_SLR for phy2log_R in phy2log_LR for e in range(config.num_experts))
    assert all(row["bytes_replica_grad_sync"] == 0 for row in rows)

    trace = read_trace(out / "trace.parquet")
    np.testing.assert_array_equal(trace.counts_SLE, counts_SLEG.sum(axis=3))
    np.testing.assert_array_equal(trace.src_counts_SLEG, counts_SLEG)
    assert trace.top_k == 2 and trace.tokens_per_step == NUM_RANKS * 2 * 64
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["world_size"] == NUM_RANKS and resolved["backend"] == "gloo"
