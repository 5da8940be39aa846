"""The training data (byte-level tokens of a text file), each step's batch, and the learning-rate schedule.

Legend: B sequences per rank, T sequence length, G ranks.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from symi_exec.config import TrainConfig


def load_tokens(path: str | Path) -> np.ndarray:
    """Byte-level tokens of a file (uint8)."""
    return np.fromfile(path, dtype=np.uint8)


def get_batch(tokens: np.ndarray, step: int, *, rank: int, world_size: int, batch_size: int, seq_len: int,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s slice (rows rank*B .. rank*B+B-1) of step `step`'s global batch of G*B random windows.

    The global batch depends only on (seed, step), so any number of ranks, or one process taking all rows,
    sees the same tokens.
    """
    rng = np.random.default_rng([seed, step])
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
