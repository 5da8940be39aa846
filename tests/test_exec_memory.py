"""Memory per rank independent of the expert count: deterministic per-expert initialisation, expert optimizers that
create only the state their rank keeps (with float32 master state under bfloat16 slots), the export gathered to
rank 0 and a resume that reads only what a rank needs.

Legend: L MoE layers, E experts, P parameters of one expert (flat), G ranks, S slots per rank.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from symi_exec import checkpoint
from symi_exec.comm import Comm
from symi_exec.model import GPT, init_expert, model_config
from symi_exec.optim import ExpertOptimizer, ShardedExpertOptimizer, adamw_update_, holder_ranks, shard_bounds
from symi_exec.optim_group import GroupExpertOptimizer
from symi_exec.optim_replica import ReplicaExpertOptimizer
from symi_sim.placement import Placement

LAYOUTS: dict[str, type[ExpertOptimizer]] = {
    "sharded": ShardedExpertOptimizer, "group": GroupExpertOptimizer, "replica": ReplicaExpertOptimizer}
CFG = model_config("tiny", num_layers=2, d_model=4, num_heads=2, d_ff=6, num_experts=5)   # P = 48
SEED = 3
NAMES = ("weights", "exp_avg", "exp_avg_sq")


def full_init_LEP(num_experts: int = CFG.num_experts) -> list[torch.Tensor]:
    """[L] x [E, P] float64: the single-device model's experts, flattened (w_in then w_out)."""
    cfg = model_config("tiny", num_layers=CFG.num_layers, d_model=CFG.d_model, num_heads=2, d_ff=CFG.d_ff,
                       num_experts=num_experts)
    torch.manual_seed(SEED)
    return [moe.experts.flat_EP().detach().double() for moe in GPT(cfg, seed=SEED).moe_layers]


# ---------------------------------------------------------------------------------------------- initialisation


def test_init_expert_is_deterministic_and_independent_of_the_expert_count() -> None:
    small, large = full_init_LEP(8), full_init_LEP(64)
    for layer in range(CFG.num_layers):
        torch.testing.assert_close(large[layer][:8], small[layer], rtol=0, atol=0)
        for expert in (0, 5, 7):
            again = init_expert(CFG, seed=SEED, layer=layer, expert=expert, dtype=torch.float64)
            assert torch.equal(again, small[layer][expert])
    # every (seed, layer, expert) draws its own numbers
    draws = {(s, layer, e): init_expert(CFG, seed=s, layer=layer, expert=e) for s in (0, 1) for layer in (0, 1)
             for e in (0, 1, 2)}
    keys = list(draws)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not torch.equal(draws[a], draws[b]), (a, b)
    # GPT-2's std: 0.02 for w_in, 0.02 / sqrt(2 L) for w_out
    big = model_config("tiny", num_layers=3, d_model=64, d_ff=256)
    flat = init_expert(big, seed=0, layer=1, expert=2)
    num_dff = big.d_model * big.d_ff
    assert flat.shape == (2 * num_dff,) and flat.dtype == torch.float32
    assert float(flat[:num_dff].std()) == pytest.approx(0.02, rel=0.03)
    assert float(flat[num_dff:].std()) == pytest.approx(0.02 / math.sqrt(6), rel=0.03)
    assert torch.equal(init_expert(big, seed=0, layer=1, expert=2, dtype=torch.bfloat16), flat.bfloat16())
    with pytest.raises(ValueError, match="expert initialisation layer must be a non-negative integer"):
        init_expert(CFG, seed=0, layer=-1, expert=0)


def test_dense_init_does_not_depend_on_the_experts() -> None:
    """The expert-parallel model (no experts) draws the same dense parameters as the single-device one."""
    for num_experts in (2, 16):
        cfg = model_config("tiny", num_experts=num_experts)
        torch.manual_seed(7)
        with_experts = GPT(cfg, seed=7).state_dict()
        torch.manual_seed(7)
        without = GPT(cfg, seed=7, experts=False).state_dict()
        assert set(with_experts) - set(without) == {f"blocks.{layer}.moe.experts.{w}" for layer in range(2)
                                                    for w in ("w_in_EDF", "w_out_EFD")}
        assert all(torch.equal(with_experts[name], value) for name, value in without.items())


# ---------------------------------------------------------------------------------------------- bf16 slots


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bfloat16_slots_float32_master_state(layout: str) -> None:
    """One rank, every expert on it: master weights and moments float32, slots bfloat16 (the master cast); one
    step equals AdamW in float32 on the bfloat16 gradients summed in float32."""
    comm = Comm(0, 1, torch.device("cpu"))
    init = full_init_LEP()
    placement = Placement.even(np.array([[0, 1, 2, 3, 4, 0], [4, 3, 2, 1, 0, 1]]), CFG.num_experts)
    opt = LAYOUTS[layout].from_weights([w.float() for w in init], comm, slots_per_rank=6, lr=1e-2,
                                       dtype=torch.bfloat16, master_dtype=torch.float32, weight_decay=0.1)
    slots_LSP = [torch.zeros(6, CFG.expert_numel, dtype=torch.bfloat16) for _ in range(CFG.num_layers)]
    opt.send_out(placement, slots_LSP)
    for layer in range(CFG.num_layers):
        assert torch.equal(slots_LSP[layer], init[layer][placement.phy2log_LR[layer]].float().bfloat16())
    gen = torch.Generator().manual_seed(0)
    grads_LSP = [torch.randn(6, CFG.expert_numel, generator=gen).bfloat16() for _ in range(CFG.num_layers)]
    opt.collect_gradients(grads_LSP, placement)
    opt.step(1e-2)
    opt.send_out(placement, slots_LSP)
    state = checkpoint.FullStateSource(checkpoint.assemble_expert_state([{"expert_optimizer": opt.state_dict()}]))
    for layer in range(CFG.num_layers):
        for expert in range(CFG.num_experts):
            want = init[layer][expert].float().clone()
            grad = grads_LSP[layer][placement.phy2log_LR[layer] == expert].float().sum(dim=0)
            m, v = torch.zeros_like(want), torch.zeros_like(want)
            adamw_update_(want, grad, m, v, step=1, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
            got = state.read(layer, expert, 0, CFG.expert_numel)
            assert all(value.dtype == torch.float32 for value in got.values())
            assert torch.equal(got["weights"], want) and torch.equal(got["exp_avg"], m)
            assert torch.equal(got["exp_avg_sq"], v)
            for s in np.flatnonzero(placement.phy2log_LR[layer] == expert):
                assert torch.equal(slots_LSP[layer][s], want.bfloat16())


# ---------------------------------------------------------------------------------------------- 3 gloo ranks

PLACEMENT = Placement.even(np.array([[0, 1, 2, 3, 4, 0], [3, 3, 1, 4, 0, 2]]), CFG.num_experts)   # 3 ranks x 2


def layout_worker(rank: int, world_size: int, init_file: str, out_dir: str, layout: str) -> None:
    """One rank: init (recording which experts it creates), a step on rank-seeded gradients, its checkpoint file,
    the export gathered to rank 0."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    comm = Comm(rank, world_size, torch.device("cpu"))
    created: list[tuple[int, int]] = []

    def init(layer: int, expert: int) -> torch.Tensor:
        created.append((layer, expert))
        return init_expert(CFG, seed=SEED, layer=layer, expert=expert, dtype=torch.float64)

    opt = LAYOUTS[layout](init, comm, num_layers=CFG.num_layers, num_experts=CFG.num_experts,
                          expert_numel=CFG.expert_numel, slots_per_rank=2, lr=1e-2, dtype=torch.float64)
    slots_LSP = [torch.zeros(2, CFG.expert_numel, dtype=torch.float64) for _ in range(CFG.num_layers)]
    opt.send_out(PLACEMENT, slots_LSP)
    initial = opt.state_dict()
    gen = torch.Generator().manual_seed(rank)
    opt.collect_gradients([torch.randn(2, CFG.expert_numel, generator=gen, dtype=torch.float64)
                           for _ in range(CFG.num_layers)], PLACEMENT)
    opt.step(1e-2)
    opt.send_out(PLACEMENT, slots_LSP)
    checkpoint.save_rank(Path(out_dir), rank, {"expert_optimizer": opt.state_dict(), "created": created,
                                               "initial": initial})
    gathered = opt.gather_weights()
    dist.barrier()
    if rank == 0:
        torch.save(gathered, Path(out_dir) / "gathered.pt")
    else:
        assert gathered is None
    dist.destroy_process_group()


def held_keys(placement: Placement, rank: int, slots_per_rank: int) -> set[tuple[int, int]]:
    return {(layer, int(e)) for layer, phy2log_R in enumerate(placement.phy2log_LR)
            for e in phy2log_R[rank * slots_per_rank:(rank + 1) * slots_per_rank]}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_on_three_ranks_init_export_and_resume(tmp_path: Path, layout: str) -> None:
    """3 gloo ranks: each rank creates only the experts it keeps and its state equals slices of the full init;
    the export gathered to rank 0 equals every rank's parts assembled (what the all-gather gave every rank); a
    resume on 1, 2, 3 or 4 ranks (any placement) reads exactly what assembling and re-sharding gave, and on the
    same world size and placement each rank opens its own file only (FlexMoE's layout: also those of the lowest
    holders of the experts it hosts, which store them)."""
    world_size = 3
    mp.start_processes(layout_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path), layout),
                       nprocs=world_size, join=True, start_method="spawn")
    init = full_init_LEP()
    states = [checkpoint.load_rank(tmp_path, rank) for rank in range(world_size)]
    numel = CFG.expert_numel
    for rank, state in enumerate(states):
        created = set(state["created"])
        assert len(created) == len(state["created"])   # each expert created at most once
        if layout == "sharded":
            assert created == {(layer, e) for layer in range(CFG.num_layers) for e in range(CFG.num_experts)}
        else:
            assert created == held_keys(PLACEMENT, rank, 2)
        part = state["initial"]
        shard = shard_bounds(numel, world_size, rank)
        num_pieces = 0
        for key in [(layer, e) for layer in range(CFG.num_layers) for e in range(CFG.num_experts)]:
            for start, stop, saved in checkpoint.saved_pieces(part, key, shard=shard):
                num_pieces += 1
                assert torch.equal(saved["weights"], init[key[0]][key[1]][start:stop]), (rank, key)
                assert not saved["exp_avg"].any() and not saved["exp_avg_sq"].any()
        assert num_pieces > 0
    full = checkpoint.assemble_expert_state(states)
    gathered = torch.load(tmp_path / "gathered.pt")
    assert len(gathered) == CFG.num_layers
    for layer in range(CFG.num_layers):
        assert torch.equal(gathered[layer], full["weights"][layer])
        assert not torch.equal(gathered[layer], init[layer])   # the step changed them

    def loaded(source: object, rank: int, new_world: int, slots: int, placement: Placement) -> dict:
        opt = LAYOUTS[layout](lambda layer, e: init[layer][e], Comm(rank, new_world, torch.device("cpu")),
                              num_layers=CFG.num_layers, num_experts=CFG.num_experts, expert_numel=numel,
                              slots_per_rank=slots, lr=1e-2, dtype=torch.float64)
        opt.load_state(source, placement)
        return opt.state_dict()

    rng = np.random.default_rng(0)
    for new_world, slots in ((1, 5), (2, 3), (3, 2), (4, 2)):
        same = (new_world, slots) == (world_size, 2)
        if same:
            placement = PLACEMENT
        else:
            phy2log_LR = np.stack([np.concatenate([rng.permutation(CFG.num_experts),
                                                   rng.integers(0, CFG.num_experts, new_world * slots - 5)])
                                   for _ in range(CFG.num_layers)])
            placement = Placement.even(phy2log_LR, CFG.num_experts)
        for rank in range(new_world):
            files = checkpoint.RankFiles(tmp_path, world_size)
            reader = checkpoint.ExpertStateReader(files, layout=layout, expert_numel=numel, rank=rank)
            got = loaded(reader, rank, new_world, slots, placement)
            want = loaded(checkpoint.FullStateSource(full), rank, new_world, slots, placement)
            assert got["num_steps"] == want["num_steps"] == 1
            for name in NAMES:
                values = zip(got[name], want[name], strict=True) if layout == "sharded" else \
                    ((got[name][k], want[name][k]) for k in sorted(want[name]))
                assert set(got[name]) == set(want[name]) if layout != "sharded" else True
                assert all(torch.equal(a, b) for a, b in values), (new_world, rank, name)
            if same and layout == "replica":   # an expert is stored once: by its lowest holder
                assert files.opened == sorted({rank} | {holder_ranks(PLACEMENT.phy2log_LR[layer], e, 2)[0]
                                                        for layer, e in held_keys(PLACEMENT, rank, 2)})
            elif same:
                assert files.opened == [rank]
            elif layout == "sharded":   # the files whose shard overlaps this rank's, and one for the step count
                mine = shard_bounds(numel, new_world, rank)
                overlapping = {r for r in range(world_size) if max(mine[0], shard_bounds(numel, world_size, r)[0])
                               < min(mine[1], shard_bounds(numel, world_size, r)[1])}
                assert files.opened == sorted(overlapping | {rank if rank < world_size else 0})
                assert len(files.opened) < world_size or new_world == 1
            if layout == "replica":   # whole experts, those the new placement hosts on this rank
                assert set(got["weights"]) == {key for key in held_keys(placement, rank, slots)
                                               if holder_ranks(placement.phy2log_LR[key[0]], key[1], slots)[0]
                                               == rank}
