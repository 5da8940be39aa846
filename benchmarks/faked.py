"""What the single-process benchmarks (bench_dispatch, bench_exchange) put in place of a large job: the rows an
all-to-all would deliver, and a skewed expert popularity.

Legend: M rows, D features, E experts.
"""

from __future__ import annotations

import numpy as np
import torch


def skew_probs(num_experts: int, skew: float) -> np.ndarray:
    """[E] (1 + e)^-skew, normalised: expert e's share of a Zipf-like popularity."""
    weights_E = (1.0 + np.arange(num_experts)) ** -skew
    return weights_E / weights_E.sum()


def copy_rows(x_MD: torch.Tensor, num_rows: int) -> torch.Tensor:
    """A buffer of `num_rows` rows holding the first rows of x_MD (zeros past its end): what an all-to-all of that
    received size costs a rank's memory, without the network."""
    out = x_MD.new_empty(num_rows, *x_MD.shape[1:])
    num_copied = min(num_rows, x_MD.shape[0])
    out[:num_copied].copy_(x_MD[:num_copied])
    out[num_copied:].zero_()
    return out
