"""The run's checkpoint.pt streamed a few experts at a time (export.save_streamed, ExpertOptimizer.export_chunks):
the file loads (weights_only too) and equals, bit for bit and tensor by tensor, the single-device state dict built
whole and torch.save'd (outputs.single_device_state_dict over gather_weights), for float32, float64 and bfloat16, on
1 and 3 gloo ranks; every zip member's CRC-32 checks.

Legend: L MoE layers, E experts, D d_model, F d_ff, P = 2 D F parameters of one expert.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from symi_exec.comm import Comm
from symi_exec.export import expert_names, save_streamed
from symi_exec.model import GPT, init_expert, model_config
from symi_exec.optim import ShardedExpertOptimizer
from symi_exec.optim_group import GroupExpertOptimizer
from symi_exec.optim_replica import ReplicaExpertOptimizer
from symi_exec.outputs import dense_state_dict, single_device_state_dict
from symi_sim.placement import Placement

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
LAYOUTS = {"sharded": ShardedExpertOptimizer, "group": GroupExpertOptimizer, "replica": ReplicaExpertOptimizer}
EXTRA = {"model_config": {"d_model": 4}, "steps": 3, "placement": {"phy2log": [[0, 1]], "share": [[0.5, 0.5]]}}


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes: equal bits, NaN payloads and signed zeros included."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same_file_contents(got_path: Path, want_path: Path) -> None:
    """Both files load with weights_only=True to the same dict: same names in the same order, every tensor the same
    shape, strides, dtype and bits; the streamed file's zip members all check, and its storage records carry the
    CRC-32s torch.save gave the same records."""
    got, want = (torch.load(p, weights_only=True) for p in (got_path, want_path))
    assert list(got) == list(want) and list(got["model"]) == list(want["model"])
    for name, value in want["model"].items():
        mine = got["model"][name]
        assert type(mine) is torch.Tensor and mine.dtype == value.dtype, name
        assert mine.shape == value.shape and mine.stride() == value.stride(), name
        assert torch.equal(bits(mine), bits(value)), name
    assert {k: v for k, v in got.items() if k != "model"} == {k: v for k, v in want.items() if k != "model"}
    with zipfile.ZipFile(got_path) as zg, zipfile.ZipFile(want_path) as zw:
        assert zg.testzip() is None
        got_crc = {i.filename.split("/", 1)[1]: i.CRC for i in zg.infolist() if "/data/" in i.filename}
        want_crc = {i.filename.split("/", 1)[1]: i.CRC for i in zw.infolist() if "/data/" in i.filename}
    assert got_crc == want_crc and len(got_crc) == len(want["model"])


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_streamed_file_equals_the_state_dict_saved_whole(tmp_path: Path, dtype: str) -> None:
    """Random shapes (one expert, one layer, an empty and a 0-d dense tensor) and values with NaN, infinities and
    -0.0: the streamed file equals torch.save of the dict built whole, and GPT(cfg) loads a real model's export."""
    torch_dtype = DTYPES[dtype]
    rng = np.random.default_rng(0)
    for trial in range(12):
        layers, experts = int(rng.integers(1, 4)), int(rng.integers(1, 7))
        d_model, d_ff = int(rng.integers(1, 6)), int(rng.integers(1, 9))
        cfg = model_config("tiny", num_layers=layers, d_model=d_model, num_heads=1, d_ff=d_ff, num_experts=experts)
        gen = torch.Generator().manual_seed(trial)
        dense = {f"dense.{i}": torch.randn(tuple(map(int, rng.integers(0 if i == 1 else 1, 5, size=i))), generator=gen,
                                           dtype=torch.float64).to(torch_dtype) for i in range(4)}
        layers_LEP = [torch.randn(experts, cfg.expert_numel, generator=gen, dtype=torch.float64).to(torch_dtype)
                      for _ in range(layers)]
        specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=torch_dtype)
        layers_LEP[0].view(-1)[:4] = specials[:layers_LEP[0].numel()]
        want = {**dense, **{name: value for layer, flat_EP in enumerate(layers_LEP)
                            for name, value in zip(expert_names(layer),
                                                   (flat_EP[:, :d_model * d_ff].reshape(-1, d_model, d_ff).clone(),
                                                    flat_EP[:, d_model * d_ff:].reshape(-1, d_ff, d_model).clone()),
                                                   strict=True)}}
        torch.save({"model": want, **EXTRA}, tmp_path / "whole.pt")
        # chunks of random sizes, a layer's last one cut at its end
        chunks = []
        for layer, flat_EP in enumerate(layers_LEP):
            first = 0
            while first < experts:
                stop = min(experts, first + int(rng.integers(1, 4)))
                chunks.append((layer, flat_EP[first:stop]))
                first = stop
        save_streamed(tmp_path / "streamed.pt", dense=dense, cfg=cfg, dtype=torch_dtype, chunks=iter(chunks),
                      extra=EXTRA)
        assert_same_file_contents(tmp_path / "streamed.pt", tmp_path / "whole.pt")
        assert not (tmp_path / "streamed.pt.tmp").exists()

    cfg = model_config("tiny", num_experts=3)
    torch.manual_seed(1)
    model = GPT(cfg, seed=1).to(torch_dtype)
    single = model.state_dict()
    torch.manual_seed(1)   # the dense part draws the same numbers without the experts
    dense = dense_state_dict(GPT(cfg, seed=1, experts=False).to(torch_dtype))
    save_streamed(tmp_path / "model.pt", dense=dense, cfg=cfg, dtype=torch_dtype,
                  chunks=((layer, moe.experts.flat_EP().detach()) for layer, moe in enumerate(model.moe_layers)),
                  extra=EXTRA)
    fresh = GPT(cfg, seed=2).to(torch_dtype)
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True)["model"])
    assert all(torch.equal(bits(value), bits(fresh.state_dict()[name])) for name, value in single.items())


def test_a_wrong_export_leaves_no_file(tmp_path: Path) -> None:
    """Too few layers or experts, too many, out of order, a wrong shape or dtype: one ValueError naming it, and
    neither checkpoint.pt nor its temporary file is left."""
    cfg = model_config("tiny", num_layers=2, d_model=4, num_heads=1, d_ff=6, num_experts=3)   # P = 48
    good = torch.zeros(3, 48)
    cases = {"1 complete layers of 2": [(0, good)], "0 complete layers of 2": [(0, good[:2])],
             "layer 2, expected .* layer 2 \\(of 2\\)": [(0, good), (1, good), (2, good)],
             "of layer 1, expected .* of layer 0": [(0, good[:1]), (1, good)],
             "expected up to 2 experts": [(0, good[:1]), (0, good)],
             r"\(3, 47\) torch.float32 of layer 1": [(0, good), (1, good[:, :47])],
             "float64 of layer 0": [(0, good.double()), (1, good)]}
    for message, chunks in cases.items():
        with pytest.raises(ValueError, match=message):
            save_streamed(tmp_path / "checkpoint.pt", dense={"a": torch.ones(2)}, cfg=cfg, dtype=torch.float32,
                          chunks=iter(chunks), extra={})
        assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- 1 and 3 gloo ranks

CFG = model_config("tiny", num_layers=2, d_model=4, num_heads=2, d_ff=6, num_experts=5)   # P = 48
PLACEMENTS = {1: Placement.even(np.array([[0, 1, 2, 3, 4, 0], [3, 3, 1, 4, 0, 2]]), CFG.num_experts),
              3: Placement.even(np.array([[0, 1, 2, 3, 4, 0], [3, 3, 1, 4, 0, 2]]), CFG.num_experts)}


def export_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One rank, per dtype and expert layout: a step on rank-seeded gradients, then rank 0 writes the old way's
    file (gather_weights, single_device_state_dict, torch.save) and the streamed one (export_layers)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    comm = Comm(rank, world_size, torch.device("cpu"))
    slots = 6 // world_size
    placement = PLACEMENTS[world_size]
    for dtype_name, dtype in DTYPES.items():
        master = torch.float32 if dtype == torch.bfloat16 else dtype
        torch.manual_seed(5)
        model = GPT(CFG, seed=5, experts=False).to(dtype)
        for layout, opt_type in LAYOUTS.items():
            opt = opt_type(lambda layer, e, m=master: init_expert(CFG, seed=5, layer=layer, expert=e, dtype=m), comm,
                           num_layers=CFG.num_layers, num_experts=CFG.num_experts, expert_numel=CFG.expert_numel,
                           slots_per_rank=slots, lr=1e-2, dtype=dtype, master_dtype=master)
            slots_LSP = [torch.zeros(slots, CFG.expert_numel, dtype=dtype) for _ in range(CFG.num_layers)]
            opt.send_out(placement, slots_LSP)
            gen = torch.Generator().manual_seed(rank)
            opt.collect_gradients([torch.randn(slots, CFG.expert_numel, generator=gen).to(dtype)
                                   for _ in range(CFG.num_layers)], placement)
            opt.step(1e-2)
            extra = {"steps": 1, "layout": layout}
            full_LEP = opt.gather_weights(dtype)
            chunks = opt.export_chunks(dtype, experts_per_chunk=2)   # 5 experts: chunks of 2, 2, 1
            if rank == 0:
                assert full_LEP is not None
                torch.save({"model": single_device_state_dict(model, full_LEP, CFG), **extra},
                           Path(out_dir, f"whole-{dtype_name}-{layout}.pt"))
                shapes: list[tuple[int, int]] = []

                def seen(chunks: Iterator[tuple[int, torch.Tensor | None]], shapes: list = shapes) -> Iterator:
                    for layer, chunk_nP in chunks:
                        assert chunk_nP is not None
                        shapes.append((layer, chunk_nP.shape[0]))
                        yield layer, chunk_nP

                save_streamed(Path(out_dir, f"streamed-{dtype_name}-{layout}.pt"), dense=dense_state_dict(model),
                              cfg=CFG, dtype=dtype, chunks=seen(chunks), extra=extra)
                assert shapes == [(layer, n) for layer in range(CFG.num_layers) for n in (2, 2, 1)]
            else:
                assert full_LEP is None
                assert list(chunks) == [(layer, None) for layer in range(CFG.num_layers) for _ in range(3)]
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 3])
def test_streamed_export_equals_the_old_export_on_gloo_ranks(tmp_path: Path, world_size: int) -> None:
    mp.start_processes(export_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size,
                       join=True, start_method="spawn")
    for dtype_name in DTYPES:
        for layout in LAYOUTS:
            streamed = tmp_path / f"streamed-{dtype_name}-{layout}.pt"
            assert_same_file_contents(streamed, tmp_path / f"whole-{dtype_name}-{layout}.pt")
            state = torch.load(streamed, weights_only=True)["model"]
            # the step moved the experts away from their initialisation
            first = init_expert(CFG, seed=5, layer=0, expert=0).to(DTYPES[dtype_name])
            assert not torch.equal(state[expert_names(0)[0]][0].reshape(-1), first[:CFG.d_model * CFG.d_ff])
