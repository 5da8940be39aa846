"""The training data, each step's batch, the fixed validation batches, and the learning-rate schedule.

Two kinds of data (TrainConfig.data):
  a folder   `symi data prepare` output (prepare.py): train.bin and val.bin, flat token ids of meta.json's dtype,
             read by memory map (nothing copied into RAM); the vocabulary is meta.json's vocab_size
  a file     raw bytes are the tokens (vocabulary 256): the first 90% train, the last 10% (VAL_FRACTION) validate

Legend: B sequences per rank, T sequence length, G ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from symi_exec.config import TrainConfig, byte_split
from symi_exec.model import VOCAB_SIZE

# a validation batch's random stream: [seed, index, VAL_STREAM], never equal to a training step's [seed, step]
VAL_STREAM = 1


@dataclass(frozen=True)
class TokenData:
    train: np.ndarray      # token ids (a read-only memory map)
    val: np.ndarray
    vocab_size: int


def load_data(path: str | Path) -> TokenData:
    """The training and validation tokens of a prepared folder or a text file (see the module doc)."""
    path = Path(path)
    if path.is_dir():
        from symi_exec.prepare import read_meta

        meta = read_meta(path)
        return TokenData(np.memmap(path / "train.bin", dtype=meta["dtype"], mode="r"),
                         np.memmap(path / "val.bin", dtype=meta["dtype"], mode="r"), int(meta["vocab_size"]))
    tokens = np.memmap(path, dtype=np.uint8, mode="r")
    num_train, _ = byte_split(tokens.size)
    return TokenData(tokens[:num_train], tokens[num_train:], VOCAB_SIZE)


def load_tokens(path: str | Path) -> np.ndarray:
    """The training tokens of `path` (load_data(path).train)."""
    return load_data(path).train


def get_batch(tokens: np.ndarray, step: int, *, rank: int, world_size: int, batch_size: int, seq_len: int,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s slice (rows rank*B .. rank*B+B-1) of step `step`'s global batch of G*B random windows, as
    inputs and targets [B, T] (int64).

    The global batch depends only on (seed, step), so any number of ranks, or one process taking all rows,
    sees the same tokens.
    """
    return _windows(tokens, np.random.default_rng([seed, step]), rank=rank, world_size=world_size,
                    batch_size=batch_size, seq_len=seq_len)


def val_batch(tokens: np.ndarray, index: int, *, rank: int, world_size: int, batch_size: int, seq_len: int,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Like get_batch, validation batch `index` of the validation tokens: a stream of its own, so the same batches at
    every evaluation, whatever the step."""
    return _windows(tokens, np.random.default_rng([seed, index, VAL_STREAM]), rank=rank, world_size=world_size,
                    batch_size=batch_size, seq_len=seq_len)


def _windows(tokens: np.ndarray, rng: np.random.Generator, *, rank: int, world_size: int, batch_size: int,
             seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    starts = rng.integers(0, tokens.size - seq_len - 1, size=world_size * batch_size)
    mine = starts[rank * batch_size:(rank + 1) * batch_size]
    window = np.stack([tokens[s:s + seq_len + 1] for s in mine]).astype(np.int64)
    return torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay from lr to min_lr over the run (nanoGPT's schedule)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)
