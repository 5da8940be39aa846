"""Synthetic expert-load traces: skewed, drifting, bursty popularity with exact top-k token counts.

Legend: S steps, L MoE layers, E logical experts, T tokens, K top-k.

The model (per layer, in log space; one seeded numpy Generator draws everything):
  base_LE   Zipf(skew) log-popularity over a random permutation of the experts: -skew * log(rank).
  x_LE      the current log-popularity: an Ornstein-Uhlenbeck walk around the base,
              x <- x + REVERT * (base - x) + sigma * N(0, 1),   sigma = drift * early(s) * first(l),
            so consecutive steps stay close (temporal locality) while popularity keeps moving.
  swaps     with probability SWAP_RATE * sigma a layer swaps the base ranks of two random experts: the hot
            set really changes, and x follows over about 1 / REVERT steps.
  early(s)  1 + EARLY_BOOST * exp(-s / EARLY_STEPS): training starts irregular, then settles.
  first(l)  1 + FIRST_LAYER_BOOST * exp(-l): the first MoE layer fluctuates most.
  bursts    with probability burst_prob per step and layer, one random expert's weight is multiplied by
            burst_scale for 1..BURST_MAX_STEPS steps.
Counts: popularity p = softmax(x + bursts) is capped at 1/K per expert (water-filling: no expert can receive
more than one assignment per token), then K*T assignments are drawn multinomially and any count over T is
moved to experts with room. So every layer of every step has exactly K*T assignments and no expert more than
T, which is exactly what T tokens each choosing K distinct experts can produce (counts_to_assignments builds
such a routing), without sampling token by token.
"""

from __future__ import annotations

import numpy as np

from symi_sim.checks import check_non_negative_int, check_number, check_positive_int
from symi_sim.traces.format import LoadTrace

# Most steps x layers x experts counts one synthesis makes (several float64 arrays of this size are built at once).
MAX_SYNTH_COUNTS = 2**26

REVERT = 0.1             # OU pull toward the base per step
SWAP_RATE = 0.1          # base-rank swaps per step per unit of sigma
EARLY_BOOST = 2.0        # sigma multiplier at step 0 is 1 + EARLY_BOOST
EARLY_STEPS = 100.0      # decay time of the early irregular phase, in steps
FIRST_LAYER_BOOST = 0.5  # sigma multiplier of layer 0 is 1 + FIRST_LAYER_BOOST
BURST_MAX_STEPS = 5


def synth_trace(*, num_experts: int, num_layers: int, num_steps: int, skew: float, drift: float, seed: int,
                top_k: int = 1, tokens_per_step: int = 32768, burst_prob: float = 0.0,
                burst_scale: float = 4.0) -> LoadTrace:
    """A seeded synthetic trace: counts_SLE [S, L, E] with every layer total == top_k * tokens_per_step.

    skew >= 0: Zipf exponent of the base popularity (0 = uniform); drift in [0, 1]: log-space step size of the
    popularity walk (0 = fixed popularity, only sampling noise); burst_prob in [0, 1], burst_scale > 0.
    """
    for name, value in (("num_experts", num_experts), ("num_layers", num_layers), ("num_steps", num_steps),
                        ("top_k", top_k), ("tokens_per_step", tokens_per_step)):
        check_positive_int(value, name)
    if top_k > num_experts:
        raise ValueError(f"top_k {top_k} exceeds the number of experts {num_experts}")
    num_counts = num_steps * num_layers * num_experts
    if num_counts > MAX_SYNTH_COUNTS:
        raise ValueError(f"trace too large: {num_steps} steps x {num_layers} layers x {num_experts} experts = "
                         f"{num_counts} counts, more than the {MAX_SYNTH_COUNTS} a synthesised trace may hold")
    if num_experts > np.iinfo(np.int16).max or top_k * tokens_per_step > np.iinfo(np.int32).max:
        raise ValueError(f"too large: {num_experts} experts, top_k x tokens_per_step = {top_k * tokens_per_step}")
    check_number(skew, "skew", low=0)
    check_number(drift, "drift", low=0, high=1)
    check_number(burst_prob, "burst probability", low=0, high=1)
    check_number(burst_scale, "burst scale", low=0, low_open=True)
    check_non_negative_int(seed, "seed")

    rng = np.random.default_rng(seed)
    logp_SLE = _log_popularity(rng, num_steps, num_layers, num_experts, float(skew), float(drift),
                               float(burst_prob), float(burst_scale))
    p_SLE = np.exp(logp_SLE - logp_SLE.max(axis=2, keepdims=True))
    p_SLE /= p_SLE.sum(axis=2, keepdims=True)
    q_SLE = cap_shares(p_SLE, 1.0 / top_k)
    counts_SLE = rng.multinomial(top_k * tokens_per_step, q_SLE)
    counts_SLE = _move_overflow(counts_SLE, tokens_per_step)
    assert (counts_SLE.sum(axis=2) == top_k * tokens_per_step).all() and counts_SLE.max() <= tokens_per_step
    config = {"num_experts": num_experts, "num_layers": num_layers, "num_steps": num_steps, "skew": skew,
              "drift": drift, "seed": seed, "top_k": top_k, "tokens_per_step": tokens_per_step,
              "burst_prob": burst_prob, "burst_scale": burst_scale}
    return LoadTrace(
        counts_SLE=counts_SLE, top_k=top_k, tokens_per_step=tokens_per_step, model="synthetic",
        source="symi_sim.traces.synth", provenance="synthetic: " + ", ".join(f"{k}={v}" for k, v in config.items()),
        meta={"synth": config},
    )


def _log_popularity(rng: np.random.Generator, num_steps: int, num_layers: int, num_experts: int, skew: float,
                    drift: float, burst_prob: float, burst_scale: float) -> np.ndarray:
    """[S, L, E] log-popularity (unnormalised): OU walk around a Zipf base with rank swaps, plus bursts."""
    rank_LE = np.argsort(rng.random((num_layers, num_experts)), axis=1).argsort(axis=1) + 1
    base_LE = -skew * np.log(rank_LE)
    steps_S = np.arange(num_steps)
    sigma_SL = (drift * (1.0 + EARLY_BOOST * np.exp(-steps_S / EARLY_STEPS))[:, None]
                * (1.0 + FIRST_LAYER_BOOST * np.exp(-np.arange(num_layers)))[None, :])
    # drawn up front (fixed order) so the trace depends only on the seed, and the step loop stays cheap
    noise_SLE = rng.standard_normal((num_steps, num_layers, num_experts))
    swap_SL = rng.random((num_steps, num_layers)) < np.minimum(SWAP_RATE * sigma_SL, 1.0)
    swap_pair_SL2 = rng.integers(0, num_experts, (num_steps, num_layers, 2))
    burst_SL = rng.random((num_steps, num_layers)) < burst_prob
    burst_expert_SL = rng.integers(0, num_experts, (num_steps, num_layers))
    burst_len_SL = rng.integers(1, BURST_MAX_STEPS + 1, (num_steps, num_layers))

    x_LE = base_LE + sigma_SL[0][:, None] * noise_SLE[0]
    burst_left_LE = np.zeros((num_layers, num_experts), dtype=np.int64)
    logp_SLE = np.empty((num_steps, num_layers, num_experts))
    log_burst = np.log(burst_scale)
    for s in range(num_steps):
        if s:
            swapping = np.flatnonzero(swap_SL[s])
            if swapping.size:
                a, b = swap_pair_SL2[s, swapping, 0], swap_pair_SL2[s, swapping, 1]
                base_LE[swapping, a], base_LE[swapping, b] = base_LE[swapping, b], base_LE[swapping, a]
            x_LE = x_LE + REVERT * (base_LE - x_LE) + sigma_SL[s][:, None] * noise_SLE[s]
        starting = np.flatnonzero(burst_SL[s])
        burst_left_LE[starting, burst_expert_SL[s, starting]] = burst_len_SL[s, starting]
        logp_SLE[s] = x_LE + log_burst * (burst_left_LE > 0)
        burst_left_LE = np.maximum(burst_left_LE - 1, 0)
    return logp_SLE


def cap_shares(p_XE: np.ndarray, cap: float) -> np.ndarray:
    """Shares p [..., E] (rows summing to 1) with no entry above `cap`, excess spread over the rest in proportion.

    Water-filling: capped entries stay at `cap`, the others are scaled up; needs cap * E >= 1.
    """
    out = np.array(p_XE, dtype=np.float64)
    num_experts = out.shape[-1]
    if cap * num_experts < 1 - 1e-12:
        raise ValueError(f"cannot cap {num_experts} shares at {cap}: they could not sum to 1")
    flat = out.reshape(-1, num_experts)
    rows = np.flatnonzero((flat > cap * (1 + 1e-12)).any(axis=1))
    p = flat[rows]
    capped = np.zeros(p.shape, dtype=bool)
    for _ in range(num_experts):
        over = (p > cap * (1 + 1e-12)) & ~capped
        if not over.any():
            break
        capped |= over
        free_mass = 1.0 - cap * capped.sum(axis=-1, keepdims=True)
        uncapped_sum = np.where(capped, 0.0, p).sum(axis=-1, keepdims=True)
        scale = np.divide(free_mass, uncapped_sum, out=np.zeros_like(free_mass), where=uncapped_sum > 0)
        p = np.where(capped, cap, p * scale)
    flat[rows] = p
    return out


def _move_overflow(counts_XE: np.ndarray, limit: int) -> np.ndarray:
    """Clip counts [..., E] to `limit`; give what was cut to the experts with most room (totals unchanged)."""
    counts = counts_XE.reshape(-1, counts_XE.shape[-1]).copy()
    rows = np.flatnonzero((counts > limit).any(axis=1))
    if rows.size == 0:
        return counts_XE
    c_XE = counts[rows]
    excess_X = np.maximum(c_XE - limit, 0).sum(axis=1)
    c_XE = np.minimum(c_XE, limit)
    room_XE = limit - c_XE
    assert (room_XE.sum(axis=1) >= excess_X).all()
    give_XE = excess_X[:, None] * room_XE // room_XE.sum(axis=1, keepdims=True)
    # the few tokens floor() left over go one each to the experts with the most room still left
    left_X = excess_X - give_XE.sum(axis=1)
    order_XE = np.argsort(-(room_XE - give_XE), axis=1, kind="stable")
    rank_XE = np.empty_like(order_XE)
    np.put_along_axis(rank_XE, order_XE, np.arange(c_XE.shape[1])[None, :], axis=1)
    counts[rows] = c_XE + give_XE + (rank_XE < left_X[:, None])
    return counts.reshape(counts_XE.shape)


def counts_to_assignments(count_E: np.ndarray, top_k: int) -> np.ndarray:
    """A routing realising `count_E`: expert_TK [T, K], every token on K distinct experts.

    Needs sum(count_E) = K * T and count_E <= T. Experts are laid out in order over the K columns one after
    another (column-major, wrapping from column to column); an expert occupies at most T consecutive cells, so
    it never lands twice on the same token.
    """
    count_E = np.asarray(count_E, dtype=np.int64)
    if count_E.ndim != 1 or (count_E < 0).any():
        raise ValueError(f"counts must be a 1-D array of non-negative integers, got {count_E}")
    total = int(count_E.sum())
    if top_k < 1 or total % top_k:
        raise ValueError(f"total {total} assignments is not a multiple of top_k {top_k}")
    num_tokens = total // top_k
    if count_E.max(initial=0) > num_tokens:
        raise ValueError(f"an expert has {count_E.max()} assignments, more than the {num_tokens} tokens")
    expert_X = np.repeat(np.arange(count_E.size), count_E)
    return expert_X.reshape(top_k, num_tokens).T
