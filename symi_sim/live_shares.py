"""Live token shares: each step's tokens split over the replicas it finds, from that step's own counts (numpy, scipy).

Legend: L layers, E experts, R slots, G GPUs, S slots per GPU, X flow experts (held on two or more GPUs), Y flow
holdings (an expert's replicas on one GPU: one arc expert -> GPU each), N network nodes, Z arcs of the network with
their reverse arcs.

The rule, per layer, from the step's loads w_E and the placement's replicas (its shares are not used): integer
tokens x_p >= 0 per slot, summing to w_e over expert e's replicas, such that
  dropless, gpu mode   the busiest GPU's load T = max_g sum_{p on g} x_p is the least any split reaches (T*), and in
                       gpu mode with a budget B < T* per GPU the tokens served, sum_g min(load_g, B), the most any
                       split serves (fewest drops) - both at once (see below);
  slot mode            (every slot serves C) drops sum_p max(0, x_p - C) the fewest any split leaves, which is
                       sum_e max(0, w_e - n_e C), then the busiest GPU the least among those splits.
Why a flow network: the loads a split can give the GPUs are exactly the flows of
    source -> expert e (capacity w_e) -> GPU g holding it (unbounded; slot mode n_eg C) -> sink (T - fixed_g),
where `fixed` are the loads no split can move: experts held on one GPU only, and in slot mode the floor(w_e / n_e)
>= C tokens of each replica of an expert that overflows them all (w_e > n_e C: the fewest drops), whose w_e mod n_e
leftover tokens go through the network at most one per replica. A split with max load <= T
exists iff the max flow saturates the source. Integer capacities have an integer max flow, so the least integer T
that saturates is the integer optimum, at most one token above the linear program's (scipy.optimize.linprog,
HiGHS, in the tests) and never below it.
Finding T*: Dinkelbach on the min cut. Start at a lower bound (symi_sim.live_bounds: for sets N of GPUs, fixed(N)
plus the tokens that must land in N, over |N|, rounded up; T* when N is the min cut's): scipy's max flow costs
~0.1-0.2 ms per call whatever the size, so rounds are what the time counts, and the bound is T* in nearly every
layer of the shipped traces (one round). When the flow does not saturate, the nodes Z reachable from the source
in the residual network are a cut whose capacity is a + |N| T - fixed(N) (N: the GPUs in Z, a: the capacities of
the source arcs and expert arcs it cuts), at any T, so every T' below (W - a + fixed(N)) / |N| (W: the tokens to
route) is infeasible: T rises to that, rounded up, and the next round augments the flow so far (T only rises, so the
sinks only grow) on its residual network without the sink's reverse arcs (an augmenting path ends at the sink), so
no GPU's load ever falls. T rises strictly. Before a round's max flow, the tokens the flow so far leaves (a layer's
one or two experts, typically) are tried straight onto their GPUs' room below T, moving no routed token: where they
fit, T is reached without the round (`_direct_fill`; scipy's fixed cost is most of a round).
Gpu mode: a layer whose T* is known to exceed its budget B (its bound, or the next T, passes B: every split drops
tokens) runs one round at sink capacities B - fixed first: a max flow there serves the most tokens any split serves,
and the rounds after it only add tokens above B. So the result serves the most and peaks at T*; a layer whose T*
is at most B drops nothing.
Sources (`source_LEG`, the tokens of each expert each GPU routed: the executor has them from the same all-gather):
among the optimal splits, prefer one that leaves tokens on the GPU that routed them (a holding (e, g) keeps
min(its tokens, what g routed to e) there). Before everything else, one more max flow puts the most tokens on their
own GPU that the lower bound's peak allows (arcs capped at those counts; in gpu mode the sinks at min(t, B) - fixed);
every later flow only augments it, and an augmenting path may re-route a local token where the optimum needs it, so
T* and the tokens served are exactly those without sources. Not an exact least-traffic split (that is a min-cost
flow), but within 0.03% of the linear program's least on the tests' random instances, and half the remote tokens of
the split without sources on the recorded training trace (benchmarks/bench_live_shares.py).
Inside a GPU an expert's part splits evenly over its replicas there (whole tokens, the extra ones to the lower
slots). All layers of a call share one network per round (scipy.sparse.csgraph.maximum_flow, Dinic), so the rule is
deterministic: the same counts and replicas give the same split on every rank.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_flow

from symi_sim.live_bounds import lower_bound_L, sum_before_in_run
from symi_sim.placement import Placement, slot_holdings
from symi_sim.routing import shadow_spread_LG

INT32_MAX = np.iinfo(np.int32).max
SOURCE, SINK = 0, 1


def live_split(load_LE: np.ndarray, placement: Placement, *, slots_per_gpu: int, capacity_mode: str = "gpu",
               capacity_L: np.ndarray | None = None, source_LEG: np.ndarray | None = None) -> np.ndarray:
    """Tokens per slot under live shares. load_LE [L, E] int >= 0 -> assigned_LR [L, R] int64.

    capacity_L [L]: tokens a slot (capacity_mode "slot") or a GPU ("gpu") serves; None: dropless. Shadowed experts
    (FasterMoE) get no slot tokens; their tokens, spread evenly over the GPUs, count as fixed GPU loads.
    source_LEG [L, E, G] int >= 0 (optional): the tokens of each expert that each GPU sends (summing to load_LE over
    G). Given, the split is as optimal as without (same busiest GPU, same tokens served) and among such splits it
    prefers ones that leave tokens on the GPU that sent them (module docstring, "Sources").
    """
    load_LE = np.asarray(load_LE, dtype=np.int64)
    phy2log_LR = placement.phy2log_LR
    num_layers, num_slots = phy2log_LR.shape
    num_experts = placement.num_experts
    num_gpus = num_slots // slots_per_gpu
    if load_LE.shape != (num_layers, num_experts) or num_slots % slots_per_gpu:
        raise ValueError(f"live split: load shape {load_LE.shape} and {num_slots} slots of {slots_per_gpu} per GPU "
                         f"do not fit a placement of {num_layers} layers and {num_experts} experts")
    if source_LEG is not None:
        source_LEG = np.asarray(source_LEG, dtype=np.int64)
        if (source_LEG.shape != (num_layers, num_experts, num_gpus) or (source_LEG < 0).any()
                or not np.array_equal(source_LEG.sum(axis=2), load_LE)):
            raise ValueError(f"live split: source counts of shape {source_LEG.shape} must be [layers, experts, GPUs] "
                             f"= {(num_layers, num_experts, num_gpus)}, non-negative, and sum to the loads over the "
                             "GPUs")
    rows_L1 = np.arange(num_layers)[:, None]
    fixed_LG = shadow_spread_LG(load_LE, placement.shadow_LE, num_gpus)
    if placement.shadow_LE is not None:
        load_LE = np.where(placement.shadow_LE, 0, load_LE)
    if (load_LE.sum(axis=1) + fixed_LG.sum(axis=1) >= INT32_MAX // 2).any():
        raise ValueError(f"live split: a layer routes {load_LE.sum(axis=1).max()} tokens, more than the flow "
                         f"network's int32 capacities hold ({INT32_MAX // 2})")

    # holdings: the replicas of one expert on one GPU; the first of them (in slot order) is the holding's head
    head_LGS, rank_LGS, size_LGS = slot_holdings(phy2log_LR, slots_per_gpu)
    is_head_LR = (rank_LGS == 0).reshape(num_layers, num_slots)
    num_gpus_LE = np.bincount((rows_L1 * num_experts + phy2log_LR)[is_head_LR],
                              minlength=num_layers * num_experts).reshape(num_layers, num_experts)
    load_LR = np.take_along_axis(load_LE, phy2log_LR, axis=1)
    gpus_LR = np.take_along_axis(num_gpus_LE, phy2log_LR, axis=1)

    # slot mode: an expert that overflows every replica (w > n C) gives each its even share's floor (>= C, the
    # fewest drops); only the w mod n leftover tokens, one per replica at most, are still to place
    unit_cap_LR = np.full((num_layers, num_slots), INT32_MAX, dtype=np.int64)
    base_LR = np.zeros((num_layers, num_slots), dtype=np.int64)
    if capacity_mode == "slot" and capacity_L is not None:
        cap_L1 = np.asarray(capacity_L, dtype=np.int64)[:, None]
        cnt_LR = np.take_along_axis(placement.logcnt_LE, phy2log_LR, axis=1)
        even_LR = load_LR > cnt_LR * cap_L1
        base_LR = np.where(even_LR, load_LR // cnt_LR, 0)
        load_LR = np.where(even_LR, load_LR % cnt_LR, load_LR)
        unit_cap_LR = np.where(even_LR, 1, np.broadcast_to(cap_L1, even_LR.shape))
    fixed_LG += base_LR.reshape(num_layers, num_gpus, slots_per_gpu).sum(axis=2)

    holding_LR = np.where(is_head_LR & (gpus_LR == 1), load_LR, 0)   # held on one GPU: all of it there
    fixed_LG += holding_LR.reshape(num_layers, num_gpus, slots_per_gpu).sum(axis=2)
    size_LR = size_LGS.reshape(num_layers, num_slots)
    flow_LR = is_head_LR & (gpus_LR > 1) & (load_LR > 0)
    if flow_LR.any():
        layer_Y, slot_Y = np.nonzero(flow_LR)
        cap_Y = np.minimum(size_LR[layer_Y, slot_Y] * unit_cap_LR[layer_Y, slot_Y], INT32_MAX)
        expert_Y, gpu_Y = phy2log_LR[layer_Y, slot_Y], slot_Y // slots_per_gpu
        holding_LR[layer_Y, slot_Y] = _route_flow_holdings(
            layer_Y, expert_Y, gpu_Y, load_LR[layer_Y, slot_Y], cap_Y, fixed_LG, num_experts=num_experts,
            gpu_budget_L=capacity_L if capacity_mode == "gpu" else None,
            slot_caps=capacity_mode == "slot" and capacity_L is not None,
            local_Y=None if source_LEG is None else source_LEG[layer_Y, expert_Y, gpu_Y])

    # holdings -> slots: even over the holding's replicas, the extra tokens to its lower slots
    holding_LGS = np.take_along_axis(holding_LR.reshape(head_LGS.shape), head_LGS, axis=-1)
    from_holding_LGS = holding_LGS // size_LGS + (rank_LGS < holding_LGS % size_LGS)
    return base_LR + from_holding_LGS.reshape(num_layers, num_slots)


def _route_flow_holdings(layer_Y: np.ndarray, expert_Y: np.ndarray, gpu_Y: np.ndarray, w_Y: np.ndarray,
                         cap_Y: np.ndarray, fixed_LG: np.ndarray, *, num_experts: int,
                         gpu_budget_L: np.ndarray | None, slot_caps: bool,
                         local_Y: np.ndarray | None = None) -> np.ndarray:
    """Tokens of every flow holding (one arc expert -> GPU of capacity cap_Y each, Y of them, in (layer, GPU)
    order; w_Y its expert's tokens) under the rule of the module docstring; gpu_budget_L [L]: gpu mode's budget per
    GPU (None: none); slot_caps: the arcs carry slot mode's caps; local_Y: the tokens of the arc's expert that its
    GPU sent (None: no preference)."""
    num_layers, num_gpus = fixed_LG.shape
    # flow experts in (layer, expert) order; by_x: the arcs by expert, each expert's in GPU order
    le_Y = layer_Y * num_experts + expert_Y
    by_x = np.argsort(le_Y, kind="stable")
    sorted_Y = le_Y[by_x]
    new_Y = np.ones(le_Y.size, dtype=bool)   # where a new expert starts in that order
    np.not_equal(sorted_Y[1:], sorted_Y[:-1], out=new_Y[1:])
    x_Y = np.empty(le_Y.size, dtype=np.int64)
    x_Y[by_x] = np.cumsum(new_Y) - 1
    le_X = sorted_Y[new_Y]
    w_X = np.zeros(le_X.size, dtype=np.int64)
    w_X[x_Y] = w_Y
    layer_X = le_X // num_experts
    tokens_L = np.bincount(layer_X, weights=w_X, minlength=num_layers).astype(np.int64)
    net = _Network(x_Y, gpu_Y, layer_Y, layer_X, num_layers=num_layers, num_gpus=num_gpus, by_x=by_x)
    t_L = lower_bound_L(x_Y, net.g_Y, cap_Y, w_X, layer_X, fixed_LG, prefixes=slot_caps)
    active_L = tokens_L > 0
    budget_L = None if gpu_budget_L is None else np.asarray(gpu_budget_L, dtype=np.int64)
    top_L = t_L if budget_L is None else np.minimum(t_L, budget_L)
    base_Y = np.zeros(w_Y.size, dtype=np.int64)
    if local_Y is not None:
        # sources: first the most tokens that stay on their sender at the bound's peak (in gpu mode at most B), a
        # flow every later round only augments (its sinks never shrink); an augmenting path can still re-route a
        # local token where the optimum needs it, so the split stays optimal, it only starts local
        base_Y, _ = net.max_flow(np.where(active_L[layer_X], w_X, 0), np.minimum(cap_Y, local_Y),
                                 np.where(active_L[:, None], np.maximum(top_L[:, None] - fixed_LG, 0), 0))

    # T*: Dinkelbach on the min cut, all layers at once, each round a max flow that augments the flow so far on its
    # residual network (the sink's reverse arcs unused: an augmenting path ends at the sink, so no GPU's load ever
    # falls, and T only rises). Gpu mode: a layer whose T* is known to exceed B (its T passed B) runs one round at
    # sinks B - fixed first, the most tokens any split serves; the rounds after it, above B, keep them served
    at_budget_L = np.zeros(num_layers, dtype=bool) if budget_L is None else active_L & (t_L > budget_L)
    while active_L.any():
        top_L = t_L if budget_L is None else np.where(at_budget_L, budget_L, t_L)
        out_X, in_LG = _flow_ends(base_Y, net, fixed_LG.shape, w_X.size)
        left_L = tokens_L - np.bincount(layer_X, weights=out_X, minlength=num_layers).astype(np.int64)
        sink_LG = np.where(active_L[:, None], np.maximum(top_L[:, None] - fixed_LG, 0) - in_LG, 0)
        got_Y, routed_L = net.max_flow(np.where(active_L[layer_X], w_X - out_X, 0), cap_Y - base_Y, sink_LG,
                                       back_Y=base_Y)
        base_Y = np.where(active_L[layer_Y], base_Y + got_Y, base_Y)
        step_L = active_L & ~at_budget_L & (routed_L < left_L)
        active_L &= at_budget_L | step_L
        crossed_L = np.zeros(num_layers, dtype=bool)
        if step_L.any():
            next_L = np.where(step_L, _dinkelbach_step_L(net, w_X, cap_Y, fixed_LG, tokens_L, t_L), t_L)
            if budget_L is not None:
                crossed_L = step_L & (t_L <= budget_L) & (next_L > budget_L)
            t_L = next_L
        # after the round at the budget, the tokens left (one or two experts of a layer, typically) need only room
        # above B: before the next max flow, at T, try them straight onto their GPUs' room below T; where that fits,
        # T (a lower bound) is reached without the flow. (After a round below T*, the next T usually needs tokens
        # re-routed, which a direct fill cannot do.)
        fill_L = active_L & at_budget_L
        at_budget_L = crossed_L
        if fill_L.any():
            add_Y, fits_L = _direct_fill(net, base_Y, w_X, cap_Y, fixed_LG, t_L, fill_L)
            base_Y = np.where(fits_L[layer_Y], base_Y + add_Y, base_Y)
            active_L &= ~fits_L
    return base_Y


def _direct_fill(net: _Network, base_Y: np.ndarray, w_X: np.ndarray, cap_Y: np.ndarray, fixed_LG: np.ndarray,
                 t_L: np.ndarray, fill_L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tokens the flow base_Y leaves unrouted, in the layers fill_L, each expert's over its arcs in GPU order up to
    their residual capacity and their GPU's room below t_L, without moving any routed token. Returns (the tokens
    added per arc [Y], [L] the layers where that routes every token with no GPU above t_L)."""
    out_X, in_LG = _flow_ends(base_Y, net, fixed_LG.shape, w_X.size)
    left_X = np.where(fill_L[net.layer_X], w_X - out_X, 0)
    room_G = np.maximum(t_L[:, None] - fixed_LG - in_LG, 0).reshape(-1)
    avail_Y = np.where(left_X[net.x_Y] > 0, np.minimum(cap_Y - base_Y, room_G[net.g_Y]), 0)
    # per expert, the room of its arcs before each one (its arcs are a run in by_x order)
    avail_sorted = avail_Y[net.by_x]
    before_sorted = sum_before_in_run(avail_sorted, net.first_sorted)
    add_Y = np.empty_like(avail_Y)
    add_Y[net.by_x] = np.clip(left_X[net.x_Y[net.by_x]] - before_sorted, 0, avail_sorted)
    short_X = np.bincount(net.x_Y, weights=add_Y, minlength=w_X.size) < left_X
    over_G = np.bincount(net.g_Y, weights=add_Y, minlength=room_G.size) > room_G
    num_layers = t_L.size
    fails_L = (np.bincount(net.layer_X, weights=short_X, minlength=num_layers) > 0) | over_G.reshape(num_layers,
                                                                                                       -1).any(axis=1)
    return add_Y, fill_L & ~fails_L


def _flow_ends(flow_Y: np.ndarray, net: _Network, shape_LG: tuple[int, int], num_x: int) -> tuple[np.ndarray,
                                                                                                 np.ndarray]:
    """(what each flow expert sends [X], what each GPU receives [L, G]) under a flow on the arcs."""
    in_LG = np.bincount(net.g_Y, weights=flow_Y, minlength=shape_LG[0] * shape_LG[1]).astype(np.int64)
    return np.bincount(net.x_Y, weights=flow_Y, minlength=num_x).astype(np.int64), in_LG.reshape(shape_LG)


def _dinkelbach_step_L(net: _Network, w_X: np.ndarray, cap_Y: np.ndarray, fixed_LG: np.ndarray,
                       tokens_L: np.ndarray, t_L: np.ndarray) -> np.ndarray:
    """[L] the next T of a layer whose last max flow did not saturate the source at t_L.

    The nodes Z reached from the source in the residual network are a min cut of the whole network at T, of
    capacity a + |N| T - fixed(N) (N: the GPUs in Z; a: the source arcs of unreached experts and the arcs from
    reached experts to unreached GPUs), so no T' below (W - a + fixed(N)) / |N| saturates.
    """
    in_x, in_g = net.reached_from_source()
    layer_X, layer_Y, x_Y = net.layer_X, net.layer_Y, net.x_Y
    cut_a_L = np.bincount(layer_X, weights=np.where(in_x, 0, w_X), minlength=t_L.size)
    cut_a_L += np.bincount(layer_Y, weights=np.where(in_x[x_Y] & ~in_g[layer_Y, net.gpu_Y], cap_Y, 0),
                           minlength=t_L.size)
    n_L = in_g.sum(axis=1)
    need_L = tokens_L - cut_a_L.astype(np.int64) + np.where(in_g, fixed_LG, 0).sum(axis=1)
    # a layer short of tokens has a GPU in its cut (else the cut's capacity, a, would be at least W)
    return np.maximum(-(-need_L // np.maximum(n_L, 1)), t_L + 1)


class _Network:
    """The flow network of the module docstring over all layers: node 0 source, 1 sink, then the X experts, then
    the L x G GPUs; every arc stored with its reverse arc (capacity 0 unless given), so that the flow scipy returns
    has the graph's own sparsity structure and reads back by position. Built once; capacities change per call.

    CSR rows: the source's (its X arcs), the sink's (G reverse arcs), then each expert's (the reverse of its source
    arc, then its arcs to GPUs), then each GPU's (its arc to the sink, then the reverses of the arcs into it); the
    columns of every row ascend because experts come before GPUs and arcs come in (layer, GPU) order."""

    def __init__(self, x_Y: np.ndarray, gpu_Y: np.ndarray, layer_Y: np.ndarray, layer_X: np.ndarray, *,
                 num_layers: int, num_gpus: int, by_x: np.ndarray) -> None:
        """by_x: the arcs by expert, each expert's in GPU order (a stable argsort of x_Y)."""
        self.layer_X, self.layer_Y, self.x_Y, self.gpu_Y = layer_X, layer_Y, x_Y, gpu_Y
        self.num_layers, self.num_gpus = num_layers, num_gpus
        num_x, num_y, num_g = layer_X.size, x_Y.size, num_layers * num_gpus
        self.num_nodes = 2 + num_x + num_g
        self.g_Y = g_Y = layer_Y * num_gpus + gpu_Y       # each arc's GPU, flat over layers
        self.by_x = by_x
        count_X = np.bincount(x_Y, minlength=num_x)
        self.first_sorted = (np.cumsum(count_X) - count_X)[x_Y[by_x]]   # in by_x order: where its expert's run starts
        by_g = np.argsort(g_Y * num_x + x_Y)              # per GPU, its arcs in expert order
        row_sizes = np.concatenate([[num_x, num_g], 1 + count_X, 1 + np.bincount(g_Y, minlength=num_g)])
        self.indptr = np.concatenate([[0], np.cumsum(row_sizes)]).astype(np.int32)
        x_start_X, g_start_G = self.indptr[2:2 + num_x], self.indptr[2 + num_x:-1]
        self.pos_source_X = np.arange(num_x)
        self.pos_sink_G = g_start_G
        # the i-th arc in expert order sits after the X + G arcs of the first two rows, the x + 1 reverse source
        # arcs of its own and earlier experts' rows, and the i arcs before it; likewise in GPU order after the rows
        # of the source, the sink and all experts (2X + G + Y) and g + 1 sink arcs
        self.pos_forward_Y = np.empty(num_y, dtype=np.int64)
        self.pos_forward_Y[by_x] = num_x + num_g + 1 + x_Y[by_x] + np.arange(num_y)
        self.pos_back_Y = np.empty(num_y, dtype=np.int64)
        self.pos_back_Y[by_g] = 2 * num_x + num_g + num_y + 1 + g_Y[by_g] + np.arange(num_y)
        indices = np.empty(self.indptr[-1], dtype=np.int32)
        indices[:num_x] = 2 + np.arange(num_x)
        indices[num_x:num_x + num_g] = 2 + num_x + np.arange(num_g)
        indices[x_start_X] = SOURCE
        indices[g_start_G] = SINK
        indices[self.pos_forward_Y] = 2 + num_x + g_Y
        indices[self.pos_back_Y] = 2 + x_Y
        self.indices = indices
        self.shape = (self.num_nodes, self.num_nodes)
        self.graph = csr_matrix((np.zeros(indices.size, dtype=np.int32), indices, self.indptr), shape=self.shape)

    def max_flow(self, source_X: np.ndarray, cap_Y: np.ndarray, sink_LG: np.ndarray, *,
                 back_Y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One max flow. Capacities: source -> expert source_X, expert -> GPU cap_Y (and GPU -> expert back_Y),
        GPU -> sink sink_LG. Returns the net flow on the expert -> GPU arcs [Y] and the flow per layer [L]."""
        cap_Z = np.zeros(self.indices.size, dtype=np.int32)
        cap_Z[self.pos_source_X] = source_X
        cap_Z[self.pos_forward_Y] = cap_Y
        cap_Z[self.pos_sink_G] = sink_LG.reshape(-1)
        if back_Y is not None:
            cap_Z[self.pos_back_Y] = back_Y
        self.graph.data = cap_Z   # the structure was checked once; only the capacities change
        flow = maximum_flow(self.graph, SOURCE, SINK, method="dinic").flow
        if not (np.array_equal(flow.indptr, self.indptr) and np.array_equal(flow.indices, self.indices)):
            raise AssertionError("live split: the flow does not have the network's structure")
        flow_Z = np.asarray(flow.data, dtype=np.int64)
        self.open_Z = flow_Z < cap_Z   # residual capacity left (a reverse arc's is its partner's flow)
        routed_L = np.bincount(self.layer_X, weights=flow_Z[:self.layer_X.size], minlength=self.num_layers)
        return flow_Z[self.pos_forward_Y], routed_L.astype(np.int64)

    def reached_from_source(self) -> tuple[np.ndarray, np.ndarray]:
        """The experts [X] and GPUs [L, G] reachable from the source in the last max flow's residual network.

        Breadth first, a frontier of arrays per step: open source arcs reach experts, open expert -> GPU arcs reach
        GPUs, reverse arcs that carry flow reach experts back (the sink, never reachable after a max flow, and the
        arcs into the source do not matter). A few steps on these networks, cheaper than building a graph for
        scipy's search."""
        open_Z = self.open_Z
        forward_Y, back_Y = open_Z[self.pos_forward_Y], open_Z[self.pos_back_Y]
        in_x = open_Z[self.pos_source_X].copy()
        in_g = np.zeros(self.num_layers * self.num_gpus, dtype=bool)
        while True:
            in_g[self.g_Y[forward_Y & in_x[self.x_Y]]] = True
            more_x = in_x.copy()
            more_x[self.x_Y[back_Y & in_g[self.g_Y]]] = True
            if np.array_equal(more_x, in_x):
                return in_x, in_g.reshape(self.num_layers, self.num_gpus)
            in_x = more_x
