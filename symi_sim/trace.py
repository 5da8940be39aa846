"""LoadTrace: per-step, per-layer, per-expert token counts, and the trace file format.

Legend: S steps, L MoE layers, E logical experts, G source ranks.

In memory a trace is dense numpy: counts_SLE[s, l, e] = tokens routed to expert e of MoE layer l at step s
(top-k assignments, so a step's layer total is k x tokens when every token is routed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True, eq=False)
class LoadTrace:
    counts_SLE: np.ndarray
    top_k: int = 1
    tokens_per_step: int | None = None     # tokens per step (before top-k); None when unknown
    model: str = "unknown"
    source: str = "unknown"
    provenance: str = ""
    src_counts_SLEG: np.ndarray | None = None   # optional per-source-rank counts, summing to counts_SLE
    meta: dict[str, Any] = field(default_factory=dict)   # anything else (original layer ids, domains, ...)

    def __post_init__(self) -> None:
        counts = np.asarray(self.counts_SLE)
        if counts.ndim != 3 or 0 in counts.shape:
            raise ValueError(f"trace counts must be a non-empty 3-D array [steps, layers, experts], got {counts.shape}")
        if np.issubdtype(counts.dtype, np.floating):
            if not np.all(np.isfinite(counts)):
                raise ValueError("trace counts hold NaN or infinite values")
            if not np.all(counts == np.round(counts)):
                raise ValueError("trace counts must be whole numbers of tokens")
        elif not np.issubdtype(counts.dtype, np.integer):
            raise ValueError(f"trace counts must be integers, got dtype {counts.dtype}")
        if (counts < 0).any():
            s, layer, e = np.argwhere(counts < 0)[0]
            raise ValueError(f"trace counts are negative (step {s}, layer {layer}, expert {e}: {counts[s, layer, e]})")
        object.__setattr__(self, "counts_SLE", counts.astype(np.int64))
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} exceeds the number of experts {self.num_experts}")
        if self.tokens_per_step is not None:
            if self.tokens_per_step < 1:
                raise ValueError(f"tokens_per_step must be positive, got {self.tokens_per_step!r}")
            totals = self.counts_SLE.sum(axis=2)
            expected = self.top_k * self.tokens_per_step
            bad = np.argwhere(totals > expected)
            if len(bad):
                s, layer = bad[0]
                raise ValueError(
                    f"step {s} layer {layer} routes {totals[s, layer]} tokens, more than top_k x tokens_per_step "
                    f"= {expected}"
                )
        if self.src_counts_SLEG is not None:
            src = np.asarray(self.src_counts_SLEG)
            if src.ndim != 4 or src.shape[:3] != self.counts_SLE.shape:
                raise ValueError(
                    f"src_counts shape {src.shape} does not match counts {self.counts_SLE.shape} + [ranks]"
                )
            if (src < 0).any() or not np.array_equal(src.sum(axis=3), self.counts_SLE):
                raise ValueError("per-source-rank counts must be non-negative and sum to the expert counts")
            object.__setattr__(self, "src_counts_SLEG", src.astype(np.int64))

    @property
    def num_steps(self) -> int:
        return self.counts_SLE.shape[0]

    @property
    def num_layers(self) -> int:
        return self.counts_SLE.shape[1]

    @property
    def num_experts(self) -> int:
        return self.counts_SLE.shape[2]

    def num_assignments_L(self, step: int) -> np.ndarray:
        """[L] k x tokens at `step`: the capacity reference (the routed total when tokens_per_step is unknown)."""
        if self.tokens_per_step is not None:
            return np.full(self.num_layers, self.top_k * self.tokens_per_step, dtype=np.int64)
        return self.counts_SLE[step].sum(axis=1)
