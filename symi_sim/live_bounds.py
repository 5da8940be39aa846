"""Lower bounds on T*, the least busiest-GPU load of a live split (symi_sim.live_shares), per layer (numpy).

Legend: L layers, G GPUs per layer (flat over layers: L x G), X flow experts (held on two or more GPUs), Y flow
holdings (one arc expert -> GPU each, in (layer, GPU) order), P pairs of arcs at one GPU, Q pairs of experts.

For a set N of a layer's GPUs, no split peaks below
    bound(N) = ceil((fixed(N) + sum_e max(0, w_e - out_e(N))) / |N|)
(fixed: the loads no split moves; out_e(N): what expert e's arcs to the GPUs outside N carry at most), and the
largest bound(N) over all sets is T* itself (max-flow min-cut: the GPUs on the source side of the min cut at T*).
The live split pays one max flow per round of its search for T* (scipy's fixed cost per call dominates these
sizes), so a bound that is already T* saves rounds. The sets tried, all layers at once:
  - each GPU alone;
  - without `prefixes`: the GPUs of each flow expert, and each connected part of the expert-GPU graph;
  - with `prefixes` (the live split asks for them in slot mode): the GPUs in order of an estimate of their loads in
    the optimum (fixed + each expert's tokens over its arcs in proportion to their capacity), every prefix of that
    order, then from the best prefix up to `local_steps` steps that add or remove the one GPU that raises the bound
    most.
Measured on 100 steps spread over the synthetic-drift trace at the paper's shape (benchmarks/bench_live_shares.py):
without prefixes the bound is T* in every layer in dropless and gpu mode. Slot mode's capped arcs make the min cut a
set no expert spans (a hot expert capped on every GPU puts tokens into any large set): there the sets without
prefixes leave one layer in two below T*, the prefixes one in nine (one in five when ordered by what can land on
each GPU, fixed + its arcs' capacity, as before); adding the experts' sets to the prefixes would leave one in
twelve, but they cost more time than the rounds that saves (without them a call takes 0.95-0.975x the time,
alternated in one process), and the connected parts tighten no layer there. tests/test_live_shares.py holds the
whole split to the linear program's optimum: a bound above T* would show there as a higher peak.
Every sum runs over arcs (an expert's term changes only at the GPUs it is held on): O(Y log Y) work.
"""

from __future__ import annotations

import numpy as np

# expert pairs held in one dense table up to this many (the paper's shape: about 130 flow experts, 17,000 pairs);
# beyond, only the pairs that share a GPU (sorted)
DENSE_PAIRS = 2 ** 18


def lower_bound_L(x_Y: np.ndarray, gpu_Y: np.ndarray, cap_Y: np.ndarray, w_X: np.ndarray, layer_X: np.ndarray,
                  fixed_LG: np.ndarray, *, prefixes: bool = False, local_steps: int = 3) -> np.ndarray:
    """[L] int64 max of bound(N) over the sets of the module docstring (the prefixes and the steps from them only
    with `prefixes`).

    x_Y, gpu_Y: each arc's expert and GPU (flat over layers: layer * G + GPU; ascending); cap_Y its capacity (>= 1);
    w_X, layer_X: each flow expert's tokens and layer (ascending); fixed_LG [L, G]: the loads no split moves.
    """
    num_layers, num_gpus = fixed_LG.shape
    cap_Y = np.minimum(cap_Y, w_X[x_Y]).astype(np.float64)         # more than w is never used
    rest_X = w_X - np.bincount(x_Y, weights=cap_Y, minlength=w_X.size)
    # what must land in N is sum_e max(0, rest_e + inside_e(N)): a base per layer plus each expert's change at the
    # GPUs of N that hold it
    base_L = np.bincount(layer_X, weights=np.maximum(rest_X, 0), minlength=num_layers)
    fixed_G = fixed_LG.reshape(-1).astype(np.float64)
    layer_G = np.repeat(np.arange(num_layers), num_gpus)

    rest_Y = rest_X[x_Y]
    # each GPU alone
    must_G = base_L[layer_G] + fixed_G + np.bincount(gpu_Y, weights=_gain(rest_Y, 0.0, cap_Y), minlength=fixed_G.size)
    best_L = must_G.reshape(num_layers, num_gpus).max(axis=1).astype(np.int64)   # sums of integers: exact
    if not prefixes:
        best_L = np.maximum(best_L, _expert_sets_bound_L(x_Y, gpu_Y, cap_Y, rest_X, layer_X, base_L, fixed_G))
        return np.maximum(best_L, _component_bound_L(x_Y, gpu_Y, w_X, fixed_G, num_layers))
    # with prefixes (slot mode) the experts' sets and the connected parts are skipped: the prefixes below reach every
    # bound a part gives there, and the sets' cost is more than the rounds they save (module docstring)

    # prefixes of the GPUs by an estimate of their loads in the optimum: fixed + each expert's tokens over its arcs in
    # proportion to their capacity (the min cut's GPUs are the busiest there); an expert's term changes at each GPU of
    # it, in the GPUs' order
    share_Y = cap_Y / np.bincount(x_Y, weights=cap_Y, minlength=w_X.size)[x_Y]
    score_G = fixed_G + np.bincount(gpu_Y, weights=w_X[x_Y] * share_Y, minlength=fixed_G.size)
    # per layer, the GPUs by descending score (truncated to whole tokens, below 2^32: one int64 key, ties to the
    # lower GPU)
    order_G = np.argsort(layer_G * 2 ** 32 - score_G.astype(np.int64), kind="stable")
    rank_G = np.empty(fixed_G.size, dtype=np.int64)
    rank_G[order_G] = np.arange(fixed_G.size)                      # position over all layers: layer * G + rank
    by_rank = np.argsort(x_Y * fixed_G.size + rank_G[gpu_Y], kind="stable")   # per expert, its arcs in that order
    cap_sorted = cap_Y[by_rank]
    count_X = np.bincount(x_Y, minlength=w_X.size)
    inside_sorted = sum_before_in_run(cap_sorted, (np.cumsum(count_X) - count_X)[x_Y[by_rank]])   # at GPUs ranked above
    change_R = np.bincount(rank_G[gpu_Y[by_rank]], weights=_gain(rest_Y[by_rank], inside_sorted, cap_sorted),
                           minlength=fixed_G.size)
    prefix_must_LK = np.cumsum((change_R + fixed_G[order_G]).reshape(num_layers, num_gpus), axis=1) + base_L[:, None]
    value_LK = prefix_must_LK / np.arange(1, num_gpus + 1)
    rows_L = np.arange(num_layers)
    size_L = value_LK.argmax(axis=1) + 1
    must_L = prefix_must_LK[rows_L, size_L - 1]
    in_G = rank_G - layer_G * num_gpus < size_L[layer_G]

    # single-GPU steps from the best prefix: adding or removing GPU g changes the terms of the experts held there
    for _ in range(local_steps):
        inside_Y = np.bincount(x_Y, weights=np.where(in_G[gpu_Y], cap_Y, 0), minlength=w_X.size)[x_Y]
        sign_G = np.where(in_G, -1.0, 1.0)
        step_must_G = must_L[layer_G] + sign_G * fixed_G + np.bincount(
            gpu_Y, weights=_gain(rest_Y, inside_Y, sign_G[gpu_Y] * cap_Y), minlength=fixed_G.size)
        step_size_G = size_L[layer_G] + sign_G
        step_LG = np.where(step_size_G > 0, step_must_G / np.maximum(step_size_G, 1), -np.inf).reshape(num_layers, -1)
        gpu_L = rows_L * num_gpus + step_LG.argmax(axis=1)
        better_L = step_LG.max(axis=1) > must_L / size_L            # an empty set's -inf is never better
        if not better_L.any():
            break
        in_G[gpu_L[better_L]] ^= True
        must_L = np.where(better_L, step_must_G[gpu_L], must_L)
        size_L = np.where(better_L, step_size_G[gpu_L], size_L)
    return np.maximum(best_L, _ceil_div(must_L, size_L))        # must and size: sums of integers, exact


def sum_before_in_run(values_sorted: np.ndarray, first_sorted: np.ndarray) -> np.ndarray:
    """In an order where each expert's arcs form one run: the sum of the values before each one in its run
    (first_sorted: where each position's run starts)."""
    before_sorted = np.cumsum(values_sorted) - values_sorted
    return before_sorted - before_sorted[first_sorted]


def _gain(rest: np.ndarray, inside: np.ndarray | float, step: np.ndarray) -> np.ndarray:
    """The change of an expert's term max(0, rest + inside) when its capacity inside the set grows by `step`."""
    return np.maximum(rest + inside + step, 0) - np.maximum(rest + inside, 0)


def _ceil_div(num: np.ndarray, den: np.ndarray | int) -> np.ndarray:
    """int64 ceil(num / den) of exact integer floats; 0 where den is 0 (an empty set bounds nothing)."""
    den = np.asarray(den)
    return np.where(den > 0, -(-num.astype(np.int64) // np.maximum(den, 1).astype(np.int64)), 0)


def _expert_sets_bound_L(x_Y: np.ndarray, gpu_Y: np.ndarray, cap_Y: np.ndarray, rest_X: np.ndarray,
                         layer_X: np.ndarray, base_L: np.ndarray, fixed_G: np.ndarray) -> np.ndarray:
    """[L] the bound of N(a), the GPUs of expert a, for every flow expert a: over the pairs (arc of a, arc of b) at one
    GPU, b's capacity inside N(a) (arcs come in GPU order, so an arc's partners are a run of neighbours)."""
    count_G = np.bincount(gpu_Y, minlength=fixed_G.size)
    start_Y = (np.cumsum(count_G) - count_G)[gpu_Y]
    degree_Y = count_G[gpu_Y]
    first_P = np.repeat(np.arange(x_Y.size), degree_Y)
    second_P = np.arange(first_P.size) - np.repeat(np.cumsum(degree_Y) - degree_Y - start_Y, degree_Y)
    num_x = rest_X.size
    pair_P = x_Y[first_P] * num_x + x_Y[second_P]
    if num_x * num_x <= DENSE_PAIRS:
        # few experts: every pair in one [X, X] table (a pair that shares no GPU has nothing inside, no gain)
        inside_XX = np.bincount(pair_P, weights=cap_Y[second_P], minlength=num_x * num_x).reshape(num_x, num_x)
        gain_X = _gain(rest_X[None, :], 0.0, inside_XX).sum(axis=1)
    else:
        pair_Q, q_P = np.unique(pair_P, return_inverse=True)
        inside_Q = np.bincount(q_P, weights=cap_Y[second_P], minlength=pair_Q.size)
        gain_X = np.bincount(pair_Q // num_x, weights=_gain(rest_X[pair_Q % num_x], 0.0, inside_Q), minlength=num_x)
    must_X = base_L[layer_X] + gain_X
    must_X += np.bincount(x_Y, weights=fixed_G[gpu_Y], minlength=rest_X.size)
    bound_X = _ceil_div(must_X, np.bincount(x_Y, minlength=rest_X.size))
    best_L = np.zeros(base_L.size, dtype=np.int64)
    np.maximum.at(best_L, layer_X, bound_X)
    return best_L


def _component_bound_L(x_Y: np.ndarray, gpu_Y: np.ndarray, w_X: np.ndarray, fixed_G: np.ndarray,
                       num_layers: int) -> np.ndarray:
    """[L] the mean load of the GPUs of each connected part of the expert-GPU graph (all of a part's experts land in
    it). Parts by min-label propagation over the arcs with pointer jumping (a GPU's label is a GPU of its part, so
    label_G[label_G] is too): a few rounds of array operations, no graph object."""
    label_G = np.arange(fixed_G.size)
    while True:
        label_X = np.full(w_X.size, fixed_G.size)
        np.minimum.at(label_X, x_Y, label_G[gpu_Y])
        new_G = label_G.copy()
        np.minimum.at(new_G, gpu_Y, label_X[x_Y])
        new_G = new_G[new_G]
        if np.array_equal(new_G, label_G):
            break
        label_G = new_G
    load_G = np.bincount(label_X, weights=w_X, minlength=fixed_G.size) + np.bincount(label_G, weights=fixed_G,
                                                                                      minlength=fixed_G.size)
    bound_G = _ceil_div(load_G, np.bincount(label_G, minlength=fixed_G.size))
    return bound_G.reshape(num_layers, -1).max(axis=1)
