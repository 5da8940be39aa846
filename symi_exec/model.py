"""A small GPT whose MLP in every block is a Mixture-of-Experts layer (single-device code).

Legend: B batch, T sequence positions, D d_model, F d_ff (expert hidden size), V vocabulary (the data's),
E experts, K top-k, N tokens (B*T flattened), A assignments (N*K), P parameters of one expert (flat).

nanoGPT-shaped: learned position embeddings, pre-LN blocks, causal self-attention, tied embedding/unembedding.
Initialisation (GPT-2's): the dense parameters draw from torch's global generator (torch.manual_seed(seed) first),
in an order that does not depend on the experts; every expert draws from its own generator seeded by (seed, layer,
expert) alone (init_expert), so any rank can create any expert, or a shard of it, without building the others.
The MoE layer here is the reference path: every expert is local and no token is dropped. The expert-parallel
path (symi_exec.moe) replaces `Block.moe` and reuses its router, so both compute the same function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from symi_exec.config import DTYPE_NAMES
from symi_sim.checks import check_number

VOCAB_SIZE = 256   # raw bytes; a prepared data folder sets its own (TrainConfig.model_config)
# TrainConfig.dtype's names as torch dtypes
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int = 2
    d_model: int = 64
    num_heads: int = 4
    d_ff: int = 128
    seq_len: int = 64
    num_experts: int = 4
    top_k: int = 1
    aux_loss_coef: float = 0.01   # Switch-style load-balancing loss; 0 disables it
    vocab_size: int = VOCAB_SIZE
    router_skew: float = 0.0      # s: a fixed bias -s ln(1 + e) on expert e's router logit (skewed load); 0: none

    def __post_init__(self) -> None:
        for name in ("num_layers", "d_model", "num_heads", "d_ff", "seq_len", "num_experts", "top_k", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model {name} must be a positive integer, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} exceeds the number of experts {self.num_experts}")
        for name in ("aux_loss_coef", "router_skew"):
            check_number(getattr(self, name), f"model {name}", low=0)

    @property
    def expert_numel(self) -> int:
        """P: parameters of one expert (w_in D x F, then w_out F x D, flattened in that order)."""
        return 2 * self.d_model * self.d_ff

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# gpt-*: the simulator's presets (symi_sim.models.PRESETS: layers, d_model, d_ff = expert_d_ff = 4 d_model, sequence
# 512) with GPT-3's heads (Brown et al. 2020, table 2.1: Small 12, Medium 16, Large 16); the vocabulary comes from the
# data (50257 for GPT-2's), the number of experts and top-k from the job (TrainConfig)
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"num_layers": 2, "d_model": 64, "num_heads": 4, "d_ff": 128, "seq_len": 64},
    "small": {"num_layers": 4, "d_model": 128, "num_heads": 4, "d_ff": 512, "seq_len": 128},
    "gpt-small": {"num_layers": 12, "d_model": 768, "num_heads": 12, "d_ff": 3072, "seq_len": 512},
    "gpt-medium": {"num_layers": 24, "d_model": 1024, "num_heads": 16, "d_ff": 4096, "seq_len": 512},
    "gpt-large": {"num_layers": 24, "d_model": 1536, "num_heads": 16, "d_ff": 6144, "seq_len": 512},
}


def model_config(preset: str, **overrides: object) -> ModelConfig:
    """A preset's ModelConfig with fields overridden (e.g. num_experts=8, top_k=2)."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choices: {', '.join(MODEL_PRESETS)}")
    return ModelConfig(**{**MODEL_PRESETS[preset], **overrides})


# ---------------------------------------------------------------------------------------------- routing


@dataclass
class RouterOutput:
    probs_NE: torch.Tensor      # softmax over experts, differentiable
    expert_NK: torch.Tensor     # chosen experts (int64)
    gate_NK: torch.Tensor       # their probabilities (the combine weights), differentiable
    count_E: torch.Tensor       # assignments per expert on this device (int64)


def route_topk(x_ND: torch.Tensor, router: nn.Linear, top_k: int, skew: float = 0.0) -> RouterOutput:
    """Top-k routing: softmax over the router logits, keep the k most probable experts (no renormalisation).

    skew > 0 adds the constant -skew * ln(1 + e) to expert e's logit: expert popularity then starts Zipf-like
    (the router can learn against it) so that experiments get skewed load from a real model and real data.
    """
    logits_NE = router(x_ND)
    if skew > 0:
        ranks_E = torch.arange(logits_NE.shape[1], device=logits_NE.device, dtype=logits_NE.dtype)
        logits_NE = logits_NE - skew * torch.log1p(ranks_E)
    probs_NE = F.softmax(logits_NE, dim=-1)
    gate_NK, expert_NK = torch.topk(probs_NE, top_k, dim=-1)
    # scatter_add, not bincount: bincount on a GPU reads the largest index back to the host (a sync)
    flat_A = expert_NK.reshape(-1)
    count_E = torch.zeros(probs_NE.shape[1], dtype=torch.int64, device=flat_A.device).scatter_add_(
        0, flat_A, torch.ones_like(flat_A))
    return RouterOutput(probs_NE, expert_NK, gate_NK, count_E)


def load_balance_loss(probs_NE: torch.Tensor, global_count_E: torch.Tensor, num_assignments: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss E * sum_e f_e * P_e.

    f_e is the fraction of all assignments routed to e, taken from the global counts (a constant), P_e the mean
    router probability over the tokens given here. Data-parallel ranks each pass their own tokens and the same
    global counts, so the mean of their losses equals the loss of the whole batch (equal local batch sizes).
    """
    num_experts = probs_NE.shape[1]
    fraction_E = global_count_E.to(device=probs_NE.device, dtype=probs_NE.dtype) / max(num_assignments, 1)
    return num_experts * torch.sum(fraction_E * probs_NE.mean(dim=0))


def expert_mlp(x_ND: torch.Tensor, w_in_DF: torch.Tensor, w_out_FD: torch.Tensor) -> torch.Tensor:
    """One expert: D -> F -> D with GELU (no biases, so an expert is exactly two matrices)."""
    return F.gelu(x_ND @ w_in_DF) @ w_out_FD


# ---------------------------------------------------------------------------------------------- initialisation

INIT_STD = 0.02   # GPT-2's


def residual_std(config: ModelConfig) -> float:
    """GPT-2's std of the residual projections (attention proj, expert w_out): 0.02 / sqrt(2 * layers)."""
    return INIT_STD / math.sqrt(2 * config.num_layers)


def expert_generator(seed: int, layer: int, expert: int) -> torch.Generator:
    """A CPU generator seeded by (seed, layer, expert) only (numpy's SeedSequence mixes the three)."""
    for name, value in (("seed", seed), ("layer", layer), ("expert", expert)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"expert initialisation {name} must be a non-negative integer, got {value!r}")
    state = np.random.SeedSequence([seed, layer, expert]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def init_expert(config: ModelConfig, *, seed: int, layer: int, expert: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> torch.Tensor:
    """[P] expert `expert` of layer `layer`'s initial weights (w_in D x F then w_out F x D, flat): N(0, 0.02) and
    N(0, residual_std), drawn in float32 on the CPU from expert_generator(seed, layer, expert), then cast. The same
    for any number of experts, any device and any rank."""
    generator = expert_generator(seed, layer, expert)
    num_dff = config.d_model * config.d_ff
    flat_P = torch.empty(2 * num_dff, dtype=torch.float32)
    flat_P[:num_dff].normal_(0.0, INIT_STD, generator=generator)
    flat_P[num_dff:].normal_(0.0, residual_std(config), generator=generator)
    return flat_P.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- layers


class Experts(nn.Module):
    """All E experts' weights, stacked; filled by init_expert (layer `layer` of a model seeded `seed`)."""

    def __init__(self, config: ModelConfig, *, seed: int, layer: int) -> None:
        super().__init__()
        e, d, f = config.num_experts, config.d_model, config.d_ff
        self.w_in_EDF = nn.Parameter(torch.empty(e, d, f))
        self.w_out_EFD = nn.Parameter(torch.empty(e, f, d))
        if self.w_in_EDF.device.type == "meta":   # shapes only (e.g. parameter counts): nothing to draw
            return
        with torch.no_grad():
            for expert in range(e):
                flat_P = init_expert(config, seed=seed, layer=layer, expert=expert)
                self.w_in_EDF[expert] = flat_P[:d * f].view(d, f)
                self.w_out_EFD[expert] = flat_P[d * f:].view(f, d)

    def flat_EP(self) -> torch.Tensor:
        """[E, P] every expert's parameters as one flat vector (w_in then w_out)."""
        num_experts = self.w_in_EDF.shape[0]
        return torch.cat([self.w_in_EDF.reshape(num_experts, -1), self.w_out_EFD.reshape(num_experts, -1)], dim=1)


class MoE(nn.Module):
    """Reference MoE layer: router + all experts on this device, every assignment computed (dropless).

    experts=False builds the router only (the expert-parallel model replaces the layer and keeps its router)."""

    def __init__(self, config: ModelConfig, *, seed: int = 0, layer: int = 0, experts: bool = True) -> None:
        super().__init__()
        self.top_k = config.top_k
        self.router_skew = config.router_skew
        self.router = nn.Linear(config.d_model, config.num_experts, bias=False)
        self.experts = Experts(config, seed=seed, layer=layer) if experts else None
        self.aux_loss: torch.Tensor | None = None   # set by forward
        self.count_E: torch.Tensor | None = None    # set by forward
        # tests: expert_NK -> [N, K] bool, the assignments served (the others drop: the token keeps its residual)
        self.keep_rule: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        b, t, d = x_BTD.shape
        x_ND = x_BTD.reshape(b * t, d)
        routed = route_topk(x_ND, self.router, self.top_k, self.router_skew)
        self.count_E = routed.count_E
        self.aux_loss = load_balance_loss(routed.probs_NE, routed.count_E, routed.expert_NK.numel())
        assert self.experts is not None, "a MoE layer built without experts only keeps its router"
        gate_NK = routed.gate_NK
        if self.keep_rule is not None:
            gate_NK = gate_NK * self.keep_rule(routed.expert_NK).to(gate_NK.dtype)
        out_ND = torch.zeros_like(x_ND)
        for e in range(self.experts.w_in_EDF.shape[0]):
            token_idx, choice_idx = torch.nonzero(routed.expert_NK == e, as_tuple=True)
            if token_idx.numel() == 0:
                continue
            y_ND = expert_mlp(x_ND[token_idx], self.experts.w_in_EDF[e], self.experts.w_out_EFD[e])
            out_ND = out_ND.index_add(0, token_idx, y_ND * gate_NK[token_idx, choice_idx, None])
        return out_ND.reshape(b, t, d)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        b, t, d = x_BTD.shape
        h = self.num_heads
        q_BTD, k_BTD, v_BTD = self.qkv(x_BTD).split(d, dim=2)
        # heads: BTD -> B H T D/H
        q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in (q_BTD, k_BTD, v_BTD))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, *, seed: int = 0, layer: int = 0, experts: bool = True) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_moe = nn.LayerNorm(config.d_model)
        self.moe: nn.Module = MoE(config, seed=seed, layer=layer, experts=experts)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.ln_attn(x_BTD))
        return x_BTD + self.moe(self.ln_moe(x_BTD))


class GPT(nn.Module):
    """The single-device GPT. Experts: init_expert(seed, layer, expert) each (seed None: one drawn from torch's
    global generator after the dense parameters); dense parameters: torch's global generator, in the same order
    with experts=False (the router-only layers the expert-parallel model starts from)."""

    def __init__(self, config: ModelConfig, *, seed: int | None = None, experts: bool = True) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config, experts=False) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight   # weight tying, as nanoGPT
        self._init_dense()
        if experts:
            if seed is None:
                seed = int(torch.randint(0, 2 ** 31 - 1, (), device="cpu"))
            for layer, block in enumerate(self.blocks):
                block.moe.experts = Experts(config, seed=seed, layer=layer)

    def _init_dense(self) -> None:
        # GPT-2 init: N(0, 0.02), residual projections scaled down by sqrt(2 * layers); experts: init_expert
        for name, p in self.named_parameters():
            if p.dim() < 2:
                if name.endswith("bias"):
                    nn.init.zeros_(p)
            elif name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=residual_std(self.config))
            else:
                nn.init.normal_(p, mean=0.0, std=INIT_STD)

    @property
    def moe_layers(self) -> list[nn.Module]:
        return [block.moe for block in self.blocks]

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, T, V] and, with targets, the loss: cross-entropy + aux_loss_coef * mean aux loss."""
        b, t = idx_BT.shape
        if t > self.config.seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds the model's seq_len {self.config.seq_len}")
        x_BTD = self.tok_emb(idx_BT) + self.pos_emb(torch.arange(t, device=idx_BT.device))
        for block in self.blocks:
            x_BTD = block(x_BTD)
        logits_BTV = self.lm_head(self.ln_f(x_BTD))
        if targets_BT is None:
            return logits_BTV, None
        logits_NV = logits_BTV.reshape(b * t, -1)
        # bfloat16's 8-bit mantissa would round the loss itself to ~0.4%: its softmax and mean in float32
        logits_NV = logits_NV.float() if logits_NV.dtype == torch.bfloat16 else logits_NV
        loss = F.cross_entropy(logits_NV, targets_BT.reshape(b * t))
        if self.config.aux_loss_coef > 0:
            aux = torch.stack([moe.aux_loss for moe in self.moe_layers]).mean()
            loss = loss + self.config.aux_loss_coef * aux
        return logits_BTV, loss


def param_groups(named_params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, object]]:
    """nanoGPT's AdamW groups: weight decay on matrices and embeddings (dim >= 2), none on norms and biases."""
    decay = [p for _, p in named_params if p.dim() >= 2]
    no_decay = [p for _, p in named_params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
