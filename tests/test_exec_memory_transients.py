"""What a rank holds beyond its own state, checked where it used to be a full extra copy: a blocking checkpoint
saves the expert optimizer's live tensors (an overlapped one copies them), and a resume keeps nothing memory-mapped
from the checkpoint files once it has read them.

Legend: L MoE layers, E experts, P parameters of one expert (flat), S slots per rank.
"""

from __future__ import annotations

import gc
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_jobs import finish, symi_train

from symi_exec import checkpoint, snapshots
from symi_exec.comm import Comm
from symi_exec.model import model_config
from symi_exec.optim import ExpertOptimizer, ShardedExpertOptimizer
from symi_exec.optim_group import GroupExpertOptimizer
from symi_exec.optim_replica import ReplicaExpertOptimizer
from symi_sim.placement import Placement

LAYOUTS: dict[str, type[ExpertOptimizer]] = {
    "sharded": ShardedExpertOptimizer, "group": GroupExpertOptimizer, "replica": ReplicaExpertOptimizer}
CFG = model_config("tiny", num_layers=2, d_model=4, num_heads=2, d_ff=6, num_experts=3)   # P = 48


def state_tensors(state: dict) -> list[torch.Tensor]:
    """The weights and both moments of a state_dict, in a fixed order (lists per layer or dicts per expert)."""
    out = []
    for name in checkpoint.STATE_NAMES:
        table = state[name]
        out += list(table) if isinstance(table, list) else [table[key] for key in sorted(table)]
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_state_dict_copies_only_when_asked(layout: str) -> None:
    """One rank: state_dict(clone=False) hands out the live tensors (a step changes them: they follow it), the
    default clone=True copies (they keep the values of the moment they were taken)."""
    comm = Comm(0, 1, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    weights_LEP = [torch.randn(CFG.num_experts, CFG.expert_numel, generator=gen, dtype=torch.float64)
                   for _ in range(CFG.num_layers)]
    opt = LAYOUTS[layout].from_weights(weights_LEP, comm, slots_per_rank=4, lr=1e-2)
    placement = Placement.even(np.array([[0, 1, 2, 0], [2, 1, 0, 1]]), CFG.num_experts)
    slots_LSP = [torch.zeros(4, CFG.expert_numel, dtype=torch.float64) for _ in range(CFG.num_layers)]
    opt.send_out(placement, slots_LSP)
    live, copied = state_tensors(opt.state_dict(clone=False)), state_tensors(opt.state_dict())
    before = [t.clone() for t in copied]
    opt.collect_gradients([torch.randn(4, CFG.expert_numel, generator=gen, dtype=torch.float64)
                           for _ in range(CFG.num_layers)], placement)
    opt.step(1e-2)
    after = state_tensors(opt.state_dict())
    assert len(live) == len(after) == len(before) == 3 * (CFG.num_layers if layout == "sharded"
                                                          else CFG.num_layers * CFG.num_experts)
    for got_live, got_copy, want_before, want_after in zip(live, copied, before, after, strict=True):
        assert not torch.equal(want_before, want_after)   # the step moved every weight and moment
        assert torch.equal(got_live, want_after) and torch.equal(got_copy, want_before)


def mapped_files() -> set[str]:
    """The files this process has memory-mapped (/proc/self/maps)."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    return {line.split(maxsplit=5)[5] for line in maps if len(line.split(maxsplit=5)) == 6}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux's /proc/self/maps")
def test_recovered_state_keeps_no_checkpoint_file_mapped(tmp_path: Path) -> None:
    """A 2-rank job's checkpoint, read as each rank reads it: while the reader lives the rank files are mapped (the
    expert state is read from the mapping); once the resume has taken what it keeps (the RNG states, the tracker,
    the placement and loads) and dropped the reader, no rank file is mapped any more - a kept tensor of the file
    would keep the whole file mapped, and every page the resume read in this rank's RSS."""
    ckpt = tmp_path / "ckpt"
    finish(symi_train("--steps", "2", "--checkpoint-every", "2", "--checkpoint-dir", str(ckpt),
                      "--out", str(tmp_path / "run")))
    cfg = model_config("tiny", num_experts=4)
    rank_files = {str(checkpoint.rank_file(checkpoint.step_dir(ckpt, 2), rank)) for rank in range(2)}
    for rank in range(2):
        recovered = snapshots.recover(ckpt, cfg.num_layers, cfg.num_experts, rank=rank)
        recovered.experts.read(0, 0, 0, 1)
        assert rank_files & mapped_files()   # the reader maps the files: the check below can fail
        kept = recovered.rng, recovered.tracker, recovered.head["phy2log_LR"], recovered.head["load_LE"]
        del recovered
        gc.collect()
        assert not rank_files & mapped_files(), rank
        assert isinstance(kept[0]["torch"], torch.Tensor) and kept[0]["torch"].numel() > 0


def test_grad_norm_sums_in_chunks_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """The squared norm over gradients longer than a chunk (float32 and float64, contiguous or not) is the exact
    sum of squares to float64 rounding, with chunks of 5 elements as with one chunk."""
    from symi_exec import optim

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(23, generator=gen), torch.randn(4, 6, generator=gen, dtype=torch.float64).t(),
             torch.zeros(0), torch.randn(3, generator=gen)]
    exact = math.fsum(float(v) ** 2 for g in grads for v in g.double().reshape(-1))
    one = optim.global_sq_norm(grads, Comm(0, 1, torch.device("cpu")))
    monkeypatch.setattr(optim, "SQ_NORM_CHUNK", 5)
    chunked = optim.global_sq_norm(grads, Comm(0, 1, torch.device("cpu")))
    assert one.dtype == chunked.dtype == torch.float64
    assert float(one) == pytest.approx(exact, rel=1e-14)
    assert float(chunked) == pytest.approx(exact, rel=1e-14)


def test_grad_norm_holds_no_float64_copy_of_a_gradient(tmp_path: Path) -> None:
    """A 64 MiB float32 gradient: its norm raises the process's peak memory by about 64 MiB (a chunk's float64 copy
    and its square), not the 256 MiB of a whole float64 copy and its square (measured in a fresh process: the peak
    resident set; 258 MiB before the chunks)."""
    script = tmp_path / "peak.py"
    script.write_text(
        "import resource, torch\n"
        "from symi_exec.comm import Comm\n"
        "from symi_exec.optim import global_sq_norm\n"
        "grad = torch.ones(1 << 24)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "sq = global_sq_norm([grad], Comm(0, 1, torch.device('cpu')))\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(float(sq), (after - before) / 1024)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert float(out[0]) == 1 << 24
    assert float(out[1]) < 128   # MiB: a chunk and its square, 64; a whole float64 copy and its square would add 256
