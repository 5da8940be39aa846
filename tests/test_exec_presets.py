"""The executor's model presets and size options: the gpt-* presets are the simulator's models (same shapes, same
expert and total parameter counts), `symi train --n-layer ...` overrides them, and the CLI lists every preset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli
import symi_exec.launch
from symi_exec.config import TrainConfig
from symi_exec.model import GPT, MODEL_PRESETS
from symi_exec.prepare import token_dtype
from symi_sim.models import PRESETS as SIM_PRESETS

SHARED = sorted(set(MODEL_PRESETS) & set(SIM_PRESETS))
# GPT-3's heads (Brown et al. 2020, table 2.1), typed in by hand
GPT3_HEADS = {"gpt-small": 12, "gpt-medium": 16, "gpt-large": 16}


def _gpt2_vocab_folder(folder: Path) -> Path:
    """A prepared-data folder whose meta.json says GPT-2's vocabulary (the simulator's 50257)."""
    folder.mkdir()
    dtype = token_dtype(50257)
    for split in ("train", "val"):
        np.random.default_rng(0).integers(0, 50257, size=1_000).astype(dtype).tofile(folder / f"{split}.bin")
    (folder / "meta.json").write_text(json.dumps({"vocab_size": 50257, "dtype": dtype}))
    return folder


def test_gpt_presets_are_the_simulators_models(tmp_path: Path) -> None:
    assert SHARED == ["gpt-large", "gpt-medium", "gpt-small"]
    data = _gpt2_vocab_folder(tmp_path / "gpt2")
    for name in SHARED:
        sim = SIM_PRESETS[name]
        config = TrainConfig(out=str(tmp_path / "run"), model=name, data=str(data), num_experts=sim.num_experts,
                             top_k=sim.top_k)
        cfg = config.model_config()
        assert (cfg.num_layers, cfg.d_model, cfg.d_ff, cfg.seq_len, cfg.vocab_size, cfg.num_experts, cfg.top_k) == (
            sim.num_moe_layers, sim.d_model, sim.expert_d_ff, sim.seq_len, sim.vocab_size, sim.num_experts, sim.top_k)
        assert sim.num_layers == sim.num_moe_layers and sim.d_ff == sim.expert_d_ff   # every block is MoE
        assert cfg.num_heads == GPT3_HEADS[name] and cfg.expert_numel == sim.expert_params
        with torch.device("meta"):   # shapes only: gpt-large's 16 experts hold 7 billion parameters
            model = GPT(cfg)
        # the simulator counts matrices only (layer norms and biases ignored), the tied head once
        matrices = {n: p.numel() for n, p in model.named_parameters() if p.dim() >= 2}
        assert matrices["tok_emb.weight"] + matrices["pos_emb.weight"] == sim.embedding_params
        attention = sum(v for n, v in matrices.items() if n.startswith("blocks.0.attn."))
        assert attention == sim.attention_params
        experts = sum(v for n, v in matrices.items() if ".experts." in n)
        assert experts == sim.num_moe_layers * sim.num_experts * sim.expert_params
        assert sum(matrices.values()) == sim.total_params
    assert TrainConfig(out="x", model="gpt-small").model_config().vocab_size == 256   # raw bytes: byte vocabulary


def test_cli_lists_every_executor_preset() -> None:
    assert cli.TRAIN_MODEL_PRESETS == tuple(MODEL_PRESETS)
    option = next(p for p in cli.symi.commands["train"].params if p.name == "model")
    assert tuple(option.type.choices) == tuple(MODEL_PRESETS)


@pytest.mark.parametrize("args,overrides", [
    ([], {}),
    (["--n-layer", "3"], {"num_layers": 3}),
    (["--model", "gpt-small", "--n-layer", "2", "--seq-len", "64", "--d-model", "256", "--n-head", "8",
      "--d-ff", "512"], {"num_layers": 2, "seq_len": 64, "d_model": 256, "num_heads": 8, "d_ff": 512}),
])
def test_size_options_override_the_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str],
                                          overrides: dict[str, int]) -> None:
    launched: list[TrainConfig] = []

    def fake_launch(config: TrainConfig, nproc_per_node: int, **_: object) -> Path:
        launched.append(config)
        raise symi_exec.launch.JobFailed("not launched")

    monkeypatch.setattr(symi_exec.launch, "launch", fake_launch)
    result = CliRunner().invoke(cli.symi, ["train", "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 1 and "not launched" in result.output, result.output
    assert launched[0].model_overrides == overrides
    cfg, preset = launched[0].model_config(), MODEL_PRESETS[launched[0].model]
    for name in ("num_layers", "d_model", "num_heads", "d_ff", "seq_len"):
        assert getattr(cfg, name) == overrides.get(name, preset[name])


@pytest.mark.parametrize("args,message", [
    (["--d-model", "100", "--n-head", "3"], "d_model 100 is not divisible by num_heads 3"),
    (["--n-layer", "0"], "model num_layers must be a positive integer, got 0"),
    (["--seq-len", "-4"], "model seq_len must be a positive integer, got -4"),
    (["--model", "gpt-huge"], "Invalid value for '--model'"),
])
def test_bad_size_options_fail_cleanly(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli.symi, ["train", "--out", str(tmp_path / "run"), *args])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
