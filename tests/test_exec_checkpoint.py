"""Checkpoints of the executor: a job killed after a checkpoint and resumed ends bit-identical to one that never
stopped; a checkpoint of N ranks resumes on N-1 ranks (optimizer state re-sharded, placement re-planned) and
continues exactly as the single-process reference that starts from the checkpoint's full state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_jobs import finish, kill_once, read_rows, symi_train

from symi_exec import checkpoint
from symi_exec.config import TrainConfig
from symi_exec.data import get_batch, load_tokens, lr_at
from symi_exec.launch import launch
from symi_exec.model import GPT, param_groups

STEPS = 30


@pytest.mark.slow
def test_killed_job_resumes_bit_identical(tmp_path: Path) -> None:
    reference = symi_train("--steps", str(STEPS), "--out", str(tmp_path / "reference"))
    ckpt = tmp_path / "ckpt"
    job = symi_train("--steps", str(STEPS), "--checkpoint-every", "3", "--checkpoint-dir", str(ckpt),
                     "--out", str(tmp_path / "killed"))
    kill_once(job, checkpoint.step_dir(ckpt, 3) / checkpoint.MARKER)
    latest = checkpoint.latest_complete(ckpt)
    assert latest is not None
    killed_at = checkpoint.read_meta(latest)["step"]
    assert 3 <= killed_at < STEPS and not (tmp_path / "killed" / "COMPLETE").exists()   # it really died mid-run

    # checkpoints of the resumed job go to the --resume directory by default
    finish(symi_train("--steps", str(STEPS), "--checkpoint-every", "3", "--resume", str(ckpt), "--out",
                      str(tmp_path / "resumed")))
    finish(reference)
    want = torch.load(tmp_path / "reference" / "checkpoint.pt", weights_only=False)
    got = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert set(got["model"]) == set(want["model"])
    for name, value in want["model"].items():
        assert torch.equal(got["model"][name], value), name
    assert got["placement"] == want["placement"]
    # losses, drops, moves and bytes of every step (the resumed run's history comes from the checkpoint)
    assert read_rows(tmp_path / "resumed") == read_rows(tmp_path / "reference")
    assert checkpoint.latest_complete(ckpt) == checkpoint.step_dir(ckpt, STEPS)   # it kept checkpointing


@pytest.mark.slow
def test_resume_picks_latest_complete_checkpoint_flexmoe(tmp_path: Path) -> None:
    """FlexMoE's per-holder layout (optimizer state migrating between ranks) resumes bit-identical too; a step
    directory without the completion marker is ignored."""
    config = TrainConfig(out=str(tmp_path / "full"), num_experts=4, slots_per_rank=3, top_k=2, policy="flexmoe-2",
                         policy_options={"min_gain_ratio": 0.0}, steps=6, batch_size=2, checkpoint_every=2,
                         capacity_factor=1.0, log_interval=1000, seed=1)   # seed 1: moves after step 2
    launch(config, 2)
    ckpt = config.checkpoint_root()
    assert [d.name for d in sorted(ckpt.glob("step-*"))] == ["step-00000002", "step-00000004", "step-00000006"]
    (checkpoint.step_dir(ckpt, 6) / checkpoint.MARKER).unlink()        # as if the job died writing step 6
    (checkpoint.step_dir(ckpt, 4) / checkpoint.MARKER).unlink()
    assert checkpoint.latest_complete(ckpt) == checkpoint.step_dir(ckpt, 2)
    resumed = TrainConfig(**{**config.__dict__, "out": str(tmp_path / "resumed"), "resume": str(ckpt)})
    launch(resumed, 2)
    want = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    got = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    for name, value in want["model"].items():
        assert torch.equal(got["model"][name], value), name
    rows = read_rows(tmp_path / "full")
    assert read_rows(tmp_path / "resumed") == rows
    assert sum(float(row["bytes_optimizer_state"]) for row in rows[2:]) > 0   # moments did migrate after resuming


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["symi", "static"])
def test_resume_on_fewer_ranks_matches_single_process(tmp_path: Path, policy: str) -> None:
    """3 ranks train 2 steps and checkpoint; 2 ranks resume from it for 2 more steps. The reference is one process
    (torch's AdamW, clip_grad_norm_) loaded with the checkpoint's full state: dense weights and AdamW state,
    every expert's weights and moments assembled from the shards (symi: 3 shards of 1/3 each; static, DeepSpeed's
    group layout: slots 0 1 | 2 3 | 0 1, so experts 0 and 1 in halves on ranks 0 and 2, experts 2 and 3 whole on
    rank 1). Float64, dropless: equal to 1e-10."""
    config = TrainConfig(out=str(tmp_path / "three"), num_experts=4, slots_per_rank=2, top_k=2, policy=policy,
                         steps=2, batch_size=2, dtype="float64", checkpoint_every=2, lr=1e-2, log_interval=1000,
                         capacity_factor=None)
    launch(config, 3)
    ckpt = config.checkpoint_root()
    saved = checkpoint.step_dir(ckpt, 2)
    states = [checkpoint.load_rank(saved, rank) for rank in range(3)]
    full = checkpoint.assemble_expert_state(states)

    resumed = TrainConfig(**{**config.__dict__, "out": str(tmp_path / "two"), "steps": 4, "resume": str(ckpt),
                             "checkpoint_dir": str(tmp_path / "two-ckpt")})
    launch(resumed, 2)
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    assert len(two["placement"]["layers"][0]["phy2log"]) == 2 * 2                 # re-placed on 4 slots
    final_states = [checkpoint.load_rank(checkpoint.step_dir(tmp_path / "two-ckpt", 4), r) for r in range(2)]
    numel = full["weights"][0].shape[1]
    if policy == "symi":
        assert [s["expert_optimizer"]["stop"] - s["expert_optimizer"]["start"] for s in final_states] == \
            [numel // 2] * 2                                                     # re-sharded in halves
    else:
        assert [s["expert_optimizer"]["layout"] for s in states] == ["group"] * 3
        assert (states[0]["expert_optimizer"]["bounds"][0, 0], states[2]["expert_optimizer"]["bounds"][0, 0]) == \
            ((0, numel // 2), (numel // 2, numel))
        # static on 2 ranks x 2 slots holds every expert once (slots 0 1 | 2 3): whole experts, re-sharded
        assert [sorted(s["expert_optimizer"]["bounds"].items()) for s in final_states] == \
            [[((layer, e), (0, numel)) for layer in range(2) for e in experts] for experts in ((0, 1), (2, 3))]
    final = checkpoint.assemble_expert_state(final_states)

    # the reference, from the checkpoint's full state
    cfg = config.model_config()
    model = GPT(cfg).to(torch.float64)
    state = {k: v for k, v in states[0]["dense"].items()}
    num_dff = cfg.d_model * cfg.d_ff

    def split(flat_EP: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (flat_EP[:, :num_dff].reshape(-1, cfg.d_model, cfg.d_ff),
                flat_EP[:, num_dff:].reshape(-1, cfg.d_ff, cfg.d_model))

    for layer, flat_EP in enumerate(full["weights"]):
        w_in, w_out = split(flat_EP)
        state[f"blocks.{layer}.moe.experts.w_in_EDF"], state[f"blocks.{layer}.moe.experts.w_out_EFD"] = w_in, w_out
    model.load_state_dict(state)
    named = dict(model.named_parameters())
    dense_named = [(n, p) for n, p in named.items() if ".moe.experts." not in n]
    dense_opt = torch.optim.AdamW(param_groups(dense_named, config.weight_decay), lr=config.lr,
                                  betas=(config.beta1, config.beta2), eps=1e-8, foreach=False)
    dense_opt.load_state_dict(states[0]["dense_optimizer"])
    expert_params = [named[f"blocks.{layer}.moe.experts.{w}"] for layer in range(cfg.num_layers)
                     for w in ("w_in_EDF", "w_out_EFD")]
    expert_opt = torch.optim.AdamW(expert_params, lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8,
                                   weight_decay=config.weight_decay, foreach=False)
    for layer in range(cfg.num_layers):
        m_in, m_out = split(full["exp_avg"][layer])
        v_in, v_out = split(full["exp_avg_sq"][layer])
        for param, m, v in ((expert_params[2 * layer], m_in, v_in), (expert_params[2 * layer + 1], m_out, v_out)):
            expert_opt.state[param] = {"step": torch.tensor(float(full["num_steps"])), "exp_avg": m.clone(),
                                       "exp_avg_sq": v.clone()}
    tokens = load_tokens(config.data_path())
    for step in range(2, 4):   # the resume keeps the global batch: 3 ranks x 2 = 2 ranks x 3 = 6 sequences
        x, y = get_batch(tokens, step, rank=0, world_size=1, batch_size=3 * config.batch_size, seq_len=cfg.seq_len,
                         seed=config.seed)
        for opt in (dense_opt, expert_opt):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, resumed)
        _, loss = model(x, y)
        model.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        dense_opt.step()
        expert_opt.step()

    ref_state = model.state_dict()
    for name, value in ref_state.items():
        torch.testing.assert_close(two["model"][name], value, rtol=0, atol=1e-10, msg=name)
    for layer in range(cfg.num_layers):   # the moments continued from the re-sharded ones too
        m_in, m_out = split(final["exp_avg"][layer])
        torch.testing.assert_close(m_in, expert_opt.state[expert_params[2 * layer]]["exp_avg"], rtol=0, atol=1e-10)
        torch.testing.assert_close(m_out, expert_opt.state[expert_params[2 * layer + 1]]["exp_avg"], rtol=0,
                                   atol=1e-10)
    # the 2 resumed steps really trained (the reference moved) and the history kept the 3-rank steps
    assert max(float((ref_state[n] - state[n]).abs().max()) for n in state) > 1e-4
    assert [int(row["step"]) for row in read_rows(tmp_path / "two")] == [0, 1, 2, 3]


def test_resume_refuses_missing_or_incompatible_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no complete checkpoint"):
        TrainConfig(out=str(tmp_path / "a"), resume=str(tmp_path / "nothing")).validate(2)
    with pytest.raises(ValueError, match="checkpoint_every must be"):
        TrainConfig(out=str(tmp_path / "a"), checkpoint_every=-1).validate(2)
