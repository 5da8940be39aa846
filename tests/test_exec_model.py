"""Single-process checks of the executor's pieces against independent references (explicit loops, torch's AdamW)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from dispatch_rule import locality_counts, pieces

from symi_exec.comm import Comm
from symi_exec.model import GPT, MoE, expert_mlp, model_config, route_topk
from symi_exec.moe import ReplicatedMoE, plan_dispatch, rank_dispatch, send_order
from symi_exec.optim import adamw_update_, shard_bounds
from symi_sim.placement import Placement
from symi_sim.routing import route


def random_placement(rng: np.random.Generator, num_experts: int, num_slots: int) -> Placement:
    """One layer: every expert >= 1 replica, replicas anywhere, uneven random shares."""
    phy2log = np.concatenate([np.arange(num_experts), rng.integers(0, num_experts, num_slots - num_experts)])
    phy2log = rng.permutation(phy2log)[None, :]
    share = rng.uniform(0.2, 1.0, num_slots)
    for e in range(num_experts):
        share[phy2log[0] == e] /= share[phy2log[0] == e].sum()
    return Placement(phy2log, share[None, :], num_experts)


def loop_dispatch(expert_GA: list[np.ndarray], placement: Placement, served_R: np.ndarray, assigned_R: np.ndarray,
                  slots_per_rank: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The documented rule, by explicit loops (tests/dispatch_rule.py: locality first, then per expert the rest by
    source rank over the replicas in slot order; each rank's assignments cut into pieces in slot order); of its piece,
    each rank keeps the first floor(piece * served / assigned) + (1 for the largest remainders, ties to the lower
    rank), exact fractions."""
    phy2log = placement.phy2log_LR[0]
    count_GE = [[int((a == e).sum()) for e in range(placement.num_experts)] for a in expert_GA]
    split = locality_counts(count_GE, phy2log.tolist(), assigned_R.tolist(), slots_per_rank)
    slot_GA = [np.full(a.size, -1) for a in expert_GA]
    kept_GA = [np.zeros(a.size, dtype=bool) for a in expert_GA]
    for p, parts in enumerate(pieces(expert_GA, phy2log.tolist(), split)):
        total = sum(len(items) for items in parts.values())
        assert total == assigned_R[p]
        for g, items in parts.items():
            for a in items:
                slot_GA[g][a] = p
        if total == 0:
            continue
        exact = {g: Fraction(len(items) * int(served_R[p]), total) for g, items in parts.items()}
        quota = {g: int(x) for g, x in exact.items()}   # floor (x >= 0)
        leftover = int(served_R[p]) - sum(quota.values())
        for g in sorted(parts, key=lambda g: (-(exact[g] - quota[g]), g))[:leftover]:
            quota[g] += 1
        for g, items in parts.items():
            for a in items[:quota[g]]:
                kept_GA[g][a] = True
    assert all((s >= 0).all() for s in slot_GA)
    return slot_GA, kept_GA


def test_reference_moe_equals_per_token_sum() -> None:
    torch.manual_seed(0)
    cfg = model_config("tiny", num_experts=5, top_k=2)
    moe = MoE(cfg).double()
    torch.nn.init.normal_(moe.experts.w_in_EDF, std=0.3)
    torch.nn.init.normal_(moe.experts.w_out_EFD, std=0.3)
    x_BTD = torch.randn(2, 7, cfg.d_model, dtype=torch.float64)
    out = moe(x_BTD).reshape(-1, cfg.d_model)
    probs = torch.softmax(x_BTD.reshape(-1, cfg.d_model) @ moe.router.weight.T, dim=-1)
    for n, x_D in enumerate(x_BTD.reshape(-1, cfg.d_model)):
        top = torch.argsort(probs[n], descending=True)[:2]
        want = sum(probs[n, e] * torch.nn.functional.gelu(x_D @ moe.experts.w_in_EDF[e]) @ moe.experts.w_out_EFD[e]
                   for e in top.tolist())
        torch.testing.assert_close(out[n], want, rtol=0, atol=1e-12)
    # Switch aux loss by hand: E * sum_e (assignments to e / all assignments) * mean router probability
    counts = np.bincount(torch.topk(probs, 2, dim=-1).indices.reshape(-1).numpy(), minlength=5)
    want_aux = 5 * float(np.sum(counts / counts.sum() * probs.mean(dim=0).detach().numpy()))
    assert float(moe.aux_loss.detach()) == pytest.approx(want_aux, rel=1e-12)


def test_gpt_forward_shapes_and_loss_near_uniform() -> None:
    torch.manual_seed(0)
    model = GPT(model_config("tiny", num_experts=4, aux_loss_coef=0.0))
    idx, targets = torch.randint(0, 256, (2, 3, 64))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 64, 256)
    assert abs(float(loss.detach()) - np.log(256)) < 0.1   # small init: close to a uniform guess over 256 bytes
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 65, dtype=torch.int64))


def test_router_skew_biases_the_logits_zipf_like() -> None:
    cfg = model_config("tiny", num_experts=4, top_k=1, router_skew=1.0)
    moe = MoE(cfg).double()
    torch.nn.init.zeros_(moe.router.weight)   # logits 0: the probabilities are the bias alone, (1 + e)^-1 normalised
    x_BTD = torch.randn(1, 5, cfg.d_model, dtype=torch.float64)
    routed = route_topk(x_BTD.reshape(-1, cfg.d_model), moe.router, 1, cfg.router_skew)
    want = torch.tensor([1.0, 1 / 2, 1 / 3, 1 / 4], dtype=torch.float64)
    torch.testing.assert_close(routed.probs_NE, (want / want.sum()).expand(5, 4), rtol=0, atol=1e-15)
    assert routed.count_E.tolist() == [5, 0, 0, 0]
    moe(x_BTD)
    assert moe.count_E.tolist() == [5, 0, 0, 0]   # the layer routes with its config's skew


@pytest.mark.parametrize("bad", [{"num_heads": 5}, {"top_k": 9}, {"num_layers": 0}, {"aux_loss_coef": -1.0},
                                 {"router_skew": -0.5}, {"router_skew": float("nan")}])
def test_model_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        model_config("tiny", num_experts=8, **bad)
    with pytest.raises(ValueError, match="huge"):
        model_config("huge")


def test_shard_bounds_tile_the_vector() -> None:
    for numel, shards in [(10, 3), (7, 7), (5, 8), (4096, 2)]:
        bounds = [shard_bounds(numel, shards, r) for r in range(shards)]
        assert bounds[0][0] == 0 and bounds[-1][1] == numel
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        sizes = [stop - start for start, stop in bounds]
        assert max(sizes) - min(sizes) <= 1


def test_adamw_update_matches_torch_adamw() -> None:
    torch.manual_seed(1)
    p_ref = torch.nn.Parameter(torch.randn(50, dtype=torch.float64))
    opt = torch.optim.AdamW([p_ref], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    p = p_ref.detach().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for step in range(1, 6):
        grad = torch.randn(50, dtype=torch.float64)
        p_ref.grad = grad.clone()
        opt.step()
        adamw_update_(p, grad, m, v, step=step, lr=0.01, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    torch.testing.assert_close(p, p_ref.detach(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("mode,factor", [("slot", None), ("slot", 0.7), ("gpu", 0.8), ("slot", 1.5)])
def test_dispatch_matches_loop_and_simulator(mode: str, factor: float | None) -> None:
    rng = np.random.default_rng(7)
    num_ranks, slots_per_rank, num_experts = 3, 3, 5
    for _ in range(5):
        placement = random_placement(rng, num_experts, num_ranks * slots_per_rank)
        skew = rng.dirichlet(np.ones(num_experts) * 0.5)
        expert_GA = [rng.choice(num_experts, size=rng.integers(20, 40), p=skew) for _ in range(num_ranks)]
        count_GE = np.stack([np.bincount(a, minlength=num_experts) for a in expert_GA])
        plan = plan_dispatch(count_GE, placement, slots_per_rank=slots_per_rank, capacity_factor=factor,
                             capacity_mode=mode)
        sim = route(count_GE.sum(0)[None], placement, slots_per_gpu=slots_per_rank, capacity_factor=factor,
                    capacity_mode=mode)
        np.testing.assert_array_equal(plan.served_R, sim.served_LR[0])
        slot_GA, kept_GA = loop_dispatch(expert_GA, placement, sim.served_LR[0], sim.assigned_LR[0],
                                         slots_per_rank)
        dropped_E = np.zeros(num_experts, dtype=np.int64)
        for g in range(num_ranks):
            dispatch = rank_dispatch(plan, g, slots_per_rank=slots_per_rank, padded=False)
            send_M, row_A = send_order(torch.as_tensor(expert_GA[g]), dispatch,
                                       torch.as_tensor(dispatch.sort_len_J), torch.as_tensor(dispatch.sort_delta_J))
            np.testing.assert_array_equal(row_A.numpy() < dispatch.num_kept, kept_GA[g])
            # the send buffer: kept assignments by slot, then by index (the global key order within a rank)
            kept_idx = np.flatnonzero(kept_GA[g])
            np.testing.assert_array_equal(send_M.numpy(), kept_idx[np.lexsort((kept_idx, slot_GA[g][kept_idx]))])
            np.testing.assert_array_equal(plan.send_GR[g], np.bincount(slot_GA[g][kept_GA[g]],
                                                                       minlength=placement.num_slots))
            np.testing.assert_array_equal(plan.assigned_GR[g], np.bincount(slot_GA[g], minlength=placement.num_slots))
            np.testing.assert_array_equal(dispatch.dropped_E, np.bincount(expert_GA[g][~kept_GA[g]],
                                                                          minlength=num_experts))
            dropped_E += dispatch.dropped_E
        np.testing.assert_array_equal(dropped_E, sim.dropped_LE[0])
        if factor == 0.7:
            assert dropped_E.sum() > 0


@pytest.mark.parametrize("slot_compute", ["auto", "padded", "loop"])
def test_replicated_moe_one_rank_drops_to_residual_and_backprops(slot_compute: str) -> None:
    """World of one rank holding every slot: output and expert gradients equal an explicit masked sum."""
    rng = np.random.default_rng(3)
    torch.manual_seed(3)
    cfg = model_config("tiny", num_experts=4, top_k=2)
    ref = MoE(cfg).double()
    torch.nn.init.normal_(ref.experts.w_in_EDF, std=0.3)
    torch.nn.init.normal_(ref.experts.w_out_EFD, std=0.3)
    torch.nn.init.normal_(ref.router.weight, std=0.5)
    num_slots = 7
    placement = random_placement(rng, 4, num_slots)
    layer = ReplicatedMoE(ref.router, cfg, slots_per_rank=num_slots, comm=Comm(0, 1, torch.device("cpu")),
                          capacity_factor=0.6, capacity_mode="slot", slot_compute=slot_compute)
    with torch.no_grad():
        layer.slot_weights_SP.copy_(ref.experts.flat_EP()[placement.phy2log_LR[0]])
    layer.placement = placement
    x_BTD = torch.randn(2, 16, cfg.d_model, dtype=torch.float64)
    out = layer(x_BTD).reshape(-1, cfg.d_model)
    out.square().sum().backward()

    probs = torch.softmax(x_BTD.reshape(-1, cfg.d_model) @ ref.router.weight.T, dim=-1)
    gate, expert_NK = torch.topk(probs, 2, dim=-1)
    count_E = np.bincount(expert_NK.reshape(-1).numpy(), minlength=4)
    sim = route(count_E[None], placement, slots_per_gpu=num_slots, capacity_factor=0.6)
    assert sim.dropped_LE.sum() > 0
    _, kept_GA = loop_dispatch([expert_NK.reshape(-1).numpy()], placement, sim.served_LR[0], sim.assigned_LR[0],
                                num_slots)
    np.testing.assert_array_equal(layer.kept_A.numpy(), kept_GA[0])
    np.testing.assert_array_equal(layer.dropped_E, sim.dropped_LE[0])
    w_in = ref.experts.w_in_EDF.detach().clone().requires_grad_(True)
    w_out = ref.experts.w_out_EFD.detach().clone().requires_grad_(True)
    rows = []
    for n, x_D in enumerate(x_BTD.reshape(-1, cfg.d_model)):
        y = torch.zeros(cfg.d_model, dtype=torch.float64)
        for k in range(2):
            if kept_GA[0][n * 2 + k]:
                e = int(expert_NK[n, k])
                y = y + gate[n, k].detach() * expert_mlp(x_D[None], w_in[e], w_out[e])[0]
        rows.append(y)
    want = torch.stack(rows)
    torch.testing.assert_close(out.detach(), want.detach(), rtol=0, atol=1e-12)
    want.square().sum().backward()
    grad_EP = torch.cat([w_in.grad.reshape(4, -1), w_out.grad.reshape(4, -1)], dim=1)
    got_EP = torch.zeros_like(grad_EP).index_add(0, torch.as_tensor(placement.phy2log_LR[0]),
                                                 layer.slot_weights_SP.grad)
    torch.testing.assert_close(got_EP, grad_EP, rtol=0, atol=1e-12)
