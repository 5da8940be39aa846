"""The executor's dispatch rule (symi_exec/moe.py) by plain Python loops, for the tests to compare the code with.

Which replica takes which assignment, identical on every rank (G ranks, slot p on rank p // slots_per_rank):
  1. counts, local first: slots in ascending id order each take min(room, tokens of its expert its own rank has
     left), room being the slot's `route(...).assigned_LR` count;
  2. counts, the rest: per expert, source ranks in ascending order hand what they have left to the expert's slots
     in ascending id order, each slot up to its remaining room;
  3. which ones: rank g's assignments of expert e, by local index, are cut into consecutive pieces of those counts,
     slots in ascending id order; a slot short of capacity keeps the first ones of each rank's piece (how many:
     largest remainders, the tests' own).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def locality_counts(count_GE: Sequence[Sequence[int]], phy2log_R: Sequence[int], assigned_R: Sequence[int],
                    slots_per_rank: int) -> list[list[int]]:
    """split[g][p]: how many of rank g's assignments of expert phy2log_R[p] slot p takes (steps 1 and 2)."""
    num_ranks, num_slots = len(count_GE), len(phy2log_R)
    left = [[int(c) for c in row] for row in count_GE]
    room = [int(a) for a in assigned_R]
    split = [[0] * num_slots for _ in range(num_ranks)]

    def move(g: int, p: int) -> None:
        e = int(phy2log_R[p])
        take = min(room[p], left[g][e])
        split[g][p] += take
        room[p] -= take
        left[g][e] -= take

    for p in range(num_slots):
        move(p // slots_per_rank, p)
    for e in sorted(set(int(x) for x in phy2log_R)):
        for g in range(num_ranks):
            for p in range(num_slots):
                if int(phy2log_R[p]) == e:
                    move(g, p)
    assert all(r == 0 for r in room) and all(x == 0 for row in left for x in row), "the split misses tokens"
    return split


def global_order_counts(count_GE: Sequence[Sequence[int]], phy2log_R: Sequence[int], assigned_R: Sequence[int]
                        ) -> list[list[int]]:
    """The rule before locality: per expert, one order by source rank, cut into consecutive runs of assigned_R
    tokens, slots in ascending id order (split[g][p] as in locality_counts)."""
    num_ranks, num_slots = len(count_GE), len(phy2log_R)
    split = [[0] * num_slots for _ in range(num_ranks)]
    for e in sorted(set(int(x) for x in phy2log_R)):
        sources = [g for g in range(num_ranks) for _ in range(int(count_GE[g][e]))]
        position = 0
        for p in range(num_slots):
            if int(phy2log_R[p]) == e:
                for g in sources[position:position + int(assigned_R[p])]:
                    split[g][p] += 1
                position += int(assigned_R[p])
        assert position == len(sources)
    return split


def pieces(expert_GA: Sequence[np.ndarray], phy2log_R: Sequence[int], split: list[list[int]]
           ) -> list[dict[int, list[int]]]:
    """Step 3: pieces[p][g] = the local indices of rank g's assignments that slot p takes, in index order."""
    out: list[dict[int, list[int]]] = [{} for _ in phy2log_R]
    for g, experts in enumerate(expert_GA):
        mine: dict[int, list[int]] = {}
        for a, e in enumerate(experts):
            mine.setdefault(int(e), []).append(a)
        position: dict[int, int] = {}
        for p, e in enumerate(phy2log_R):
            start = position.get(int(e), 0)
            out[p][g] = mine.get(int(e), [])[start:start + split[g][p]]
            position[int(e)] = start + split[g][p]
        assert all(position.get(e, 0) == len(items) for e, items in mine.items()), "assignments were not all cut"
    return out
