"""The dense parameters (symi_exec/dense.py): buckets in reverse order of use, the tied embedding's gradient whole
when its hook fires, the bucketed all-reduce during the backward equal to the mean of every rank's accumulated
gradients, and the AdamW with float32 master weights under bfloat16."""

from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from symi_exec.comm import Comm
from symi_exec.config import TrainConfig
from symi_exec.dense import DenseGradSync, DenseOptimizer, make_buckets
from symi_exec.model import GPT, model_config, param_groups

CPU = torch.device("cpu")
TINY = model_config("tiny", num_experts=4, top_k=2)


def test_buckets_take_the_parameters_in_reverse_order_and_close_at_the_size() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        dtypes = [torch.float32, torch.float64, torch.bfloat16]
        params = [nn.Parameter(torch.zeros(int(rng.integers(1, 50)), dtype=dtypes[int(rng.integers(0, 3))]))
                  for _ in range(int(rng.integers(1, 30)))]
        bucket_bytes = int(rng.integers(1, 400))
        buckets = make_buckets(params, bucket_bytes)
        assert [i for bucket in buckets for i in bucket] == list(reversed(range(len(params))))
        size = [[params[i].numel() * params[i].element_size() for i in bucket] for bucket in buckets]
        for b, bucket in enumerate(buckets):
            assert len({params[i].dtype for i in bucket}) == 1
            assert sum(size[b][:-1]) < bucket_bytes   # it was still open when its last parameter came
            if b + 1 < len(buckets) and params[buckets[b + 1][0]].dtype == params[bucket[0]].dtype:
                assert sum(size[b]) >= bucket_bytes   # closed only when full


def test_the_tied_embedding_hook_fires_once_with_both_contributions() -> None:
    torch.manual_seed(0)
    model = GPT(TINY).double()
    assert model.lm_head.weight is model.tok_emb.weight
    # the reference: the same model untied, the embedding's and the unembedding's gradients summed by hand
    untied = copy.deepcopy(model)
    untied.lm_head.weight = nn.Parameter(untied.tok_emb.weight.detach().clone())
    x = torch.randint(0, 256, (3, 64), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 256, (3, 64), generator=torch.Generator().manual_seed(2))
    untied(x, y)[1].backward()
    want = untied.tok_emb.weight.grad + untied.lm_head.weight.grad
    assert float(untied.tok_emb.weight.grad.abs().sum()) > 0 and float(untied.lm_head.weight.grad.abs().sum()) > 0

    seen: list[torch.Tensor] = []
    model.tok_emb.weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    model(x, y)[1].backward()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], want, rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------------- 2 gloo ranks

NUM_MICRO = 2


def micro_batch(rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + micro)
    return torch.randint(0, 256, (2, 64), generator=g), torch.randint(0, 256, (2, 64), generator=g)


def sync_worker(rank: int, world_size: int, store_path: str, out_dir: str, bucket_bytes: int) -> None:
    """One rank: NUM_MICRO micro-batches of its own tokens through the tiny GPT with the sync armed for the last."""
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = GPT(TINY).double()
        comm = Comm(rank=rank, world_size=world_size, device=CPU)
        params = list(model.parameters())
        sync = DenseGradSync(params, comm, bucket_bytes=bucket_bytes)
        sync.zero_grads()
        launched, losses = [], []
        for micro in range(NUM_MICRO):
            _, loss = model(*micro_batch(rank, micro))
            losses.append(float(loss.detach()))
            if micro == NUM_MICRO - 1:
                sync.arm(loss.detach())
            (loss / NUM_MICRO).backward()
            launched.append(sync._next)
        in_buffers = all(any(p.grad.data_ptr() == v.data_ptr() for b in sync.buckets for v in b.views)
                         for p in params)
        dense_sq, mean_loss = sync.finish()
        result = {"grads": [p.grad.clone() for p in params], "dense_sq": dense_sq, "mean_loss": mean_loss,
                  "last_loss": losses[-1], "launched": launched, "num_buckets": len(sync.buckets),
                  "bytes": comm.take_bytes()["dense_grad"], "in_buffers": in_buffers}
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_bucketed_all_reduce_during_the_backward_is_the_mean_of_the_accumulated_gradients(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    world_size, bucket_bytes = 2, 64 * 1024
    mp.start_processes(sync_worker, args=(world_size, str(tmp_path / "store"), str(tmp_path), bucket_bytes),
                       nprocs=world_size, start_method="spawn")
    results = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(world_size)]

    # the reference: each rank's accumulated gradients computed here, one after the other, averaged by hand
    torch.manual_seed(0)
    reference = GPT(TINY).double()
    per_rank, last_losses = [], []
    for rank in range(world_size):
        model = copy.deepcopy(reference)
        for micro in range(NUM_MICRO):
            _, loss = model(*micro_batch(rank, micro))
            (loss / NUM_MICRO).backward()
        last_losses.append(float(loss.detach()))
        per_rank.append([p.grad for p in model.parameters()])
    want = [sum(grads) / world_size for grads in zip(*per_rank, strict=True)]
    numel = sum(p.numel() for p in reference.parameters())
    for result in results:
        assert len(result["grads"]) == len(want)
        for got, expected in zip(result["grads"], want, strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-13)
        assert result["dense_sq"] == pytest.approx(sum(float((g ** 2).sum()) for g in want), rel=1e-12)
        assert result["mean_loss"] == pytest.approx(np.mean(last_losses), rel=1e-12)   # the rider: mean over ranks
        assert result["num_buckets"] >= 3
        # nothing launched in the first micro-batch's backward; every bucket launched inside the last one's
        assert result["launched"] == [0, result["num_buckets"]]
        assert result["in_buffers"]   # the gradients are the buckets: no copy
        assert result["bytes"] == 2 * (world_size - 1) * numel * 8 // world_size   # ring model, gradients only


# ---------------------------------------------------------------------------------------------- optimizer


def toy_named(dtype: torch.dtype, seed: int = 0) -> list[tuple[str, nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    return [("w", nn.Parameter(torch.randn(5, 3, generator=g).to(dtype))),
            ("b", nn.Parameter(torch.randn(3, generator=g).to(dtype)))]


def set_grads(named: list[tuple[str, nn.Parameter]], step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for _, p in named:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


CONFIG = TrainConfig(out="unused", lr=1e-2, weight_decay=0.1)
ONE = Comm(rank=0, world_size=1, device=CPU)


def test_float32_dense_optimizer_is_torch_adamw_with_the_clip_scale() -> None:
    named, ref_named = toy_named(torch.float32), toy_named(torch.float32)
    opt = DenseOptimizer(named, CONFIG, ONE)
    assert opt.masters is None   # float32: the parameters are their own masters
    ref = torch.optim.AdamW(param_groups(ref_named, CONFIG.weight_decay), lr=CONFIG.lr, betas=(CONFIG.beta1,
                            CONFIG.beta2), eps=1e-8)
    for step, (lr, scale) in enumerate([(1e-2, 1.0), (5e-3, 0.3), (2e-3, 0.7)]):
        set_grads(named, step)
        set_grads(ref_named, step)
        opt.step(lr, scale)
        for group in ref.param_groups:
            group["lr"] = lr
        for _, p in ref_named:
            p.grad.mul_(scale)
        ref.step()
        for (_, p), (_, q) in zip(named, ref_named, strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    # the checkpoint format stays torch's: a plain AdamW loads it
    plain = torch.optim.AdamW(param_groups(toy_named(torch.float32), 0.1), lr=1.0)
    plain.load_state_dict(opt.state_dict())
    for a, b in zip(plain.state.values(), ref.state.values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_bfloat16_dense_optimizer_keeps_float32_masters() -> None:
    named = toy_named(torch.bfloat16)
    masters = [(n, nn.Parameter(p.detach().float())) for n, p in named]   # the reference: float32 AdamW
    opt = DenseOptimizer(named, CONFIG, ONE)
    assert [m.dtype for m in opt.masters] == [torch.float32] * 2
    assert all(p.dtype == torch.bfloat16 for _, p in named)
    ref = torch.optim.AdamW(param_groups(masters, CONFIG.weight_decay), lr=CONFIG.lr,
                            betas=(CONFIG.beta1, CONFIG.beta2), eps=1e-8)
    for step in range(20):
        set_grads(named, step)
        for (_, m), (_, p) in zip(masters, named, strict=True):
            m.grad = p.grad.float() * 0.5
        opt.step(1e-3, 0.5)
        for group in ref.param_groups:
            group["lr"] = 1e-3
        ref.step()
        for (_, p), (_, m), master in zip(named, masters, opt.masters, strict=True):
            torch.testing.assert_close(master, m, rtol=0, atol=0)
            assert torch.equal(p, m.detach().to(torch.bfloat16))   # the parameter holds the master's cast
    # 20 steps of 1e-3 move the masters by ~2e-2; bfloat16 alone would lose the steps below its spacing
    assert any(not torch.equal(m.detach().to(torch.bfloat16).float(), m.detach()) for m in opt.masters)

    state = opt.state_dict()
    again = DenseOptimizer(toy_named(torch.bfloat16, seed=5), CONFIG, ONE)
    again.load_state_dict(state)
    for a, b in zip(again.masters, opt.masters, strict=True):
        assert torch.equal(a, b)
    # a state without master weights (a float32 run's): the masters start from the parameters as loaded
    named_3 = toy_named(torch.bfloat16, seed=7)
    third = DenseOptimizer(named_3, CONFIG, ONE)
    third.load_state_dict({k: v for k, v in state.items() if k != "master_weights"})
    for m, (_, p) in zip(third.masters, named_3, strict=True):
        assert torch.equal(m, p.detach().float())
