"""The simulated model: transformer shapes, MoE configuration, batch, precision; parameter counts and FLOPs.

Legend: S steps, L MoE layers, E logical experts, K top-k.

Presets:
  gpt-small / gpt-medium / gpt-large  the SYMI paper's bases (GPT-3 shapes 12L-768, 24L-1024, 24L-1536,
      d_ff = 4 d_model, vocabulary 50257, learned positions, tied embeddings), 16 experts, top-1, sequence 512,
      global batch 64. Every block's MLP is an MoE layer: the paper does not say which blocks are MoE, and a
      trace recorded from such a model (and the shipped synthetic-drift trace: 12 layers for GPT-Small) has one
      entry per MoE block, so "every block" is what makes model and trace agree.
  deepseek-v3  61 blocks, the first 3 dense (d_ff 18432), 58 MoE blocks with 256 routed experts (d_ff 2048),
      one shared expert, top-8 in 8 groups, SwiGLU MLPs, MLA attention, vocabulary 129280, untied head.
      Sequence 4096 and global batch 15360 sequences (the DeepSeek-V3 report's final batch size: 62.9M tokens
      per step). Pipeline parallelism is not modelled: every GPU holds slots of every MoE layer.

Precision (PAPER_NOTES): weights, gradients and activations 2 bytes; mixed-precision Adam state 16 bytes/param.
FLOPs: 2 x params per token for every matmul forward, backward = 2 x forward, plus the attention core
(QK^T and AV: 2 x seq x (qk_dim + v_dim) per token per block, full, not causal-halved, as Megatron counts).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from symi_sim.checks import check_non_negative_int, check_positive_int
from symi_sim.config_files import load_preset_or_file

logger = logging.getLogger(__name__)

_POSITIVE_INT_FIELDS = (
    "num_layers", "num_moe_layers", "d_model", "d_ff", "expert_d_ff", "mlp_matrices", "vocab_size", "num_experts",
    "top_k", "num_expert_groups", "seq_len", "global_batch", "weight_bytes", "grad_bytes", "activation_bytes",
    "optimizer_bytes",
)
_NON_NEGATIVE_INT_FIELDS = ("shared_expert_d_ff", "attn_params_per_layer", "qk_dim", "v_dim")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer with MoE blocks (the last `num_moe_layers` of `num_layers` blocks).

    d_ff: the dense MLP width (blocks that are not MoE); expert_d_ff: one routed expert's width;
    shared_expert_d_ff: width of an always-on shared expert in every MoE block (0: none).
    mlp_matrices: 2 for a GELU MLP (up, down), 3 for SwiGLU (gate, up, down).
    attn_params_per_layer: attention parameters per block (0: 4 d_model^2, standard multi-head attention).
    qk_dim, v_dim: total query/key and value widths over all heads for the attention core (0: d_model).
    global_batch sequences of seq_len tokens per step.
    """

    name: str = "custom"
    num_layers: int = 12
    num_moe_layers: int = 12
    d_model: int = 768
    d_ff: int = 3072
    expert_d_ff: int = 3072
    shared_expert_d_ff: int = 0
    mlp_matrices: int = 2
    attn_params_per_layer: int = 0
    qk_dim: int = 0
    v_dim: int = 0
    vocab_size: int = 50257
    tied_embeddings: bool = True
    learned_positions: bool = True
    num_experts: int = 16
    top_k: int = 1
    num_expert_groups: int = 1
    seq_len: int = 512
    global_batch: int = 64
    weight_bytes: int = 2
    grad_bytes: int = 2
    activation_bytes: int = 2
    optimizer_bytes: int = 16

    def __post_init__(self) -> None:
        for name in _POSITIVE_INT_FIELDS:
            check_positive_int(getattr(self, name), f"model {self.name!r}: {name}")
        for name in _NON_NEGATIVE_INT_FIELDS:
            check_non_negative_int(getattr(self, name), f"model {self.name!r}: {name}")
        for name in ("tied_embeddings", "learned_positions"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model {self.name!r}: {name} must be true or false, got {getattr(self, name)!r}")
        if self.num_moe_layers > self.num_layers:
            raise ValueError(
                f"model {self.name!r}: num_moe_layers {self.num_moe_layers} exceeds num_layers {self.num_layers}"
            )
        if self.top_k > self.num_experts:
            raise ValueError(f"model {self.name!r}: top_k {self.top_k} exceeds num_experts {self.num_experts}")
        if self.num_experts % self.num_expert_groups:
            raise ValueError(
                f"model {self.name!r}: {self.num_experts} experts do not split into {self.num_expert_groups} groups"
            )

    # ------------------------------------------------------------------ sizes
    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.global_batch

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert."""
        return self.mlp_matrices * self.d_model * self.expert_d_ff

    @property
    def expert_weight_bytes(self) -> int:
        return self.expert_params * self.weight_bytes

    @property
    def expert_grad_bytes(self) -> int:
        return self.expert_params * self.grad_bytes

    @property
    def expert_optimizer_bytes(self) -> int:
        return self.expert_params * self.optimizer_bytes

    @property
    def attention_params(self) -> int:
        """Attention parameters of one block."""
        return self.attn_params_per_layer or 4 * self.d_model * self.d_model

    @property
    def embedding_params(self) -> int:
        params = self.vocab_size * self.d_model
        if not self.tied_embeddings:
            params *= 2
        if self.learned_positions:
            params += self.seq_len * self.d_model
        return params

    @property
    def dense_params(self) -> int:
        """Parameters trained data-parallel (everything but the routed experts; layer norms ignored)."""
        dense_mlp = self.mlp_matrices * self.d_model * self.d_ff
        shared_mlp = self.mlp_matrices * self.d_model * self.shared_expert_d_ff
        router = self.d_model * self.num_experts
        return (self.embedding_params + self.num_layers * self.attention_params
                + self.num_dense_layers * dense_mlp + self.num_moe_layers * (shared_mlp + router))

    @property
    def total_params(self) -> int:
        return self.dense_params + self.num_moe_layers * self.num_experts * self.expert_params

    # ------------------------------------------------------------------ FLOPs (forward, per token)
    @property
    def expert_flops_per_assignment(self) -> int:
        """Forward FLOPs of one token through one routed expert."""
        return 2 * self.expert_params

    @property
    def dense_flops_per_token(self) -> int:
        """Forward FLOPs per token of everything but the routed experts (whole model)."""
        qk_dim = self.qk_dim or self.d_model
        v_dim = self.v_dim or self.d_model
        attention_core = 2 * self.seq_len * (qk_dim + v_dim)
        dense_mlp = self.mlp_matrices * self.d_model * self.d_ff
        shared_mlp = self.mlp_matrices * self.d_model * self.shared_expert_d_ff
        router = self.d_model * self.num_experts
        lm_head = self.vocab_size * self.d_model
        return (self.num_layers * (2 * self.attention_params + attention_core)
                + 2 * self.num_dense_layers * dense_mlp + 2 * self.num_moe_layers * (shared_mlp + router)
                + 2 * lm_head)

    # ------------------------------------------------------------------ misc
    def with_(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _mla_attention_params(d_model: int, num_heads: int, q_rank: int, kv_rank: int, nope_dim: int, rope_dim: int,
                          v_head_dim: int) -> int:
    """Parameters of DeepSeek's multi-head latent attention (low-rank Q and KV projections)."""
    q = d_model * q_rank + q_rank * num_heads * (nope_dim + rope_dim)
    kv = d_model * (kv_rank + rope_dim) + kv_rank * num_heads * (nope_dim + v_head_dim)
    out = num_heads * v_head_dim * d_model
    return q + kv + out


def _gpt(name: str, num_layers: int, d_model: int) -> ModelConfig:
    return ModelConfig(name=name, num_layers=num_layers, num_moe_layers=num_layers, d_model=d_model,
                       d_ff=4 * d_model, expert_d_ff=4 * d_model, num_experts=16, top_k=1, seq_len=512,
                       global_batch=64)


PRESETS: dict[str, ModelConfig] = {
    "gpt-small": _gpt("gpt-small", 12, 768),
    "gpt-medium": _gpt("gpt-medium", 24, 1024),
    "gpt-large": _gpt("gpt-large", 24, 1536),
    "deepseek-v3": ModelConfig(
        name="deepseek-v3", num_layers=61, num_moe_layers=58, d_model=7168, d_ff=18432, expert_d_ff=2048,
        shared_expert_d_ff=2048, mlp_matrices=3,
        attn_params_per_layer=_mla_attention_params(7168, 128, 1536, 512, 128, 64, 128),
        qk_dim=128 * (128 + 64), v_dim=128 * 128, vocab_size=129280, tied_embeddings=False,
        learned_positions=False, num_experts=256, top_k=8, num_expert_groups=8, seq_len=4096, global_batch=15360,
    ),
}


def available_models() -> list[str]:
    return sorted(PRESETS)


def load_model(spec: str | Path, **overrides: Any) -> ModelConfig:
    """A preset name or a TOML/JSON file path, with optional field overrides (None values are ignored).

    A file holds ModelConfig fields at top level (or under a [model] table); it may name a preset under
    `base` and override some of its fields.
    """
    return load_preset_or_file(spec, kind="model", cls=ModelConfig, presets=PRESETS, **overrides)
