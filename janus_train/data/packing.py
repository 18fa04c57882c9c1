"""Token-budget micro-batches: which rank trains which of a step's samples, and how each rank
packs its share into micro-batches of at most ``tokens_per_micro`` tokens, samples isolated.

::

    a step's samples (exact task ratio, mixing.py), their lengths known on every rank
        --balance_takes / assign_balanced (tokens, not counts; same result on every rank)-->
        per-rank shares --pack_micro (first fit decreasing into tokens_per_micro)-->
        per-rank micro-batches --layout: n_micro = max over ranks, empty micro-steps for the
        rest--> janus_train.batch.collate: one row per micro-batch, position_ids restart per sample
        (an empty micro-step: janus_train.batch.empty_batch)

Everything here is a pure function of lengths, so every rank computes every rank's layout (and
so the common micro-step count) without a collective beyond the one that shares the lengths.
A micro-batch is one packed row: no padding between samples, attention kept per sample by the
``position_ids`` restarts (``janus_train.model.forward``), so a row costs what its tokens cost.
"""

from __future__ import annotations

from dataclasses import dataclass


def pack_micro(lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: indices of ``lengths`` grouped into bins of total <= ``budget``.
    Deterministic (ties by index); every bin non-empty; each bin's indices in ascending order."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > budget:
            raise ValueError(f"a sample of {n} tokens exceeds train.tokens_per_micro={budget}")
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(budget - n)
    return [sorted(b) for b in bins]


def assign_balanced(lengths: list[int], world_size: int) -> list[list[int]]:
    """Longest-processing-time assignment of samples to ranks (any sample to any rank):
    ``out[rank]`` = sample indices, ascending. Largest first onto the least-loaded rank (ties
    to the lower rank): the max load is at most (4/3 - 1/(3 world)) x the optimum (Graham)."""
    load = [0] * world_size
    out: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        out[r].append(i)
        load[r] += lengths[i]
    return [sorted(x) for x in out]


def balance_takes(
    queues: list[dict[str, list[int]]], need: dict[str, int], keep: dict[str, list[int]]
) -> list[dict[str, int]]:
    """How many samples each rank takes from the head of each of its per-source queues.

    ``queues[r][src]``: lengths of rank r's queued samples of ``src`` (FIFO order); ``need``:
    samples of each source in the step (the plan's exact counts, summed over ranks);
    ``keep[src][r]``: at most this many may stay in rank r's queue (bounds how far a rank lags,
    so no sample waits forever). Returns ``takes[r][src]`` with ``sum_r takes = need`` and
    ``takes <= len(queue)``, balancing tokens: greedily (the least-loaded rank takes its
    largest available head), then local moves that lower the most-loaded rank (it gives back
    its last-taken sample of a source, or swaps one of two sources with a light rank, which
    takes its next head instead). Raises if the queues cannot cover ``need`` (a loader bug)."""
    world = len(queues)
    takes = [{s: 0 for s in need} for _ in range(world)]
    load = [0] * world
    left = dict(need)

    def take(r: int, s: str) -> None:
        load[r] += queues[r][s][takes[r][s]]
        takes[r][s] += 1
        left[s] -= 1

    for s in need:  # mandatory: queues above their keep bound, largest excess first
        excess = sorted(range(world), key=lambda r: (-(len(queues[r].get(s, [])) - keep[s][r]), r))
        for r in excess:
            for _ in range(max(0, len(queues[r].get(s, [])) - keep[s][r])):
                if left[s] == 0:
                    break
                take(r, s)
    lower = [dict(t) for t in takes]
    while any(left.values()):
        best = None
        for r in sorted(range(world), key=lambda r: (load[r], r)):
            heads = [
                (queues[r][s][takes[r][s]], s)
                for s in need
                if left[s] > 0 and takes[r][s] < len(queues[r].get(s, []))
            ]
            if heads:
                best = (r, max(heads, key=lambda h: (h[0], -list(need).index(h[1])))[1])
                break
        if best is None:
            raise RuntimeError(f"queues cannot cover the step's samples (left {left})")
        take(*best)
    _improve(queues, takes, load, lower)
    return takes


def _improve(queues, takes, load, lower, rounds: int = 64, partners: int = 8) -> None:
    """Lower the max load by moves (a gives its last s to b, b takes its next s) and swaps (a
    gives s and takes t, b does the opposite), ``partners`` lightest ranks tried: FIFO order,
    per-source counts and the mandatory takes (``lower``) are kept."""
    world = len(queues)
    srcs = list(takes[0])

    def last(r, s):  # length of r's last-taken s (may be given back)
        return queues[r][s][takes[r][s] - 1] if takes[r][s] > lower[r][s] else None

    def head(r, s):  # length of r's next s (may be taken)
        q = queues[r].get(s, [])
        return q[takes[r][s]] if takes[r][s] < len(q) else None

    for _ in range(rounds):
        a = max(range(world), key=lambda r: (load[r], -r))
        light = sorted((r for r in range(world) if r != a), key=lambda r: (load[r], r))
        best = None  # (new max of a and b, b, give s, take t or None)
        for b in light[:partners]:
            for s in srcs:
                ga, hb = last(a, s), head(b, s)
                if ga is None or hb is None:
                    continue
                cand = [(max(load[a] - ga, load[b] + hb), b, s, None)]
                for t in srcs:
                    ha, gb = head(a, t), last(b, t)
                    if t != s and ha is not None and gb is not None:
                        cand.append((max(load[a] - ga + ha, load[b] + hb - gb), b, s, t))
                for c in cand:
                    if c[0] < load[a] and (best is None or c[0] < best[0]):
                        best = c
        if best is None:
            return
        _, b, s, t = best
        load[a] -= last(a, s)
        takes[a][s] -= 1
        load[b] += head(b, s)
        takes[b][s] += 1
        if t is not None:
            load[b] -= last(b, t)
            takes[b][t] -= 1
            load[a] += head(a, t)
            takes[a][t] += 1


@dataclass
class Layout:
    """One step's micro-batch layout over all ranks (identical on every rank)."""

    packs: list[list[list[int]]]
    """``packs[rank][micro]`` = indices into that rank's sample list; empty = an empty step."""
    tokens: list[int]
    """Real tokens per rank."""

    @property
    def n_micro(self) -> int:
        return len(self.packs[0])


def layout(rank_lengths: list[list[int]], budget: int) -> Layout:
    """Pack every rank's samples; pad every rank to the common (max) micro-step count.
    Order of a rank's micro-steps: empty ones first, then by tokens ascending (ties by first
    index), so the largest pack runs last: ZeRO-1 reduces the gradients in the backward of the
    last micro-step only (DeepSpeed's ``reduce_ready_partitions_and_remove_grads`` at the
    accumulation boundary), and this gives that reduction the most backward compute to hide
    behind (``janus_train.plan.costs``)."""
    packs = [pack_micro(lens, budget) for lens in rank_lengths]
    n = max(1, max(len(p) for p in packs))
    packs = [
        [[] for _ in range(n - len(p))]
        + sorted(p, key=lambda b, lens=lens: (sum(lens[i] for i in b), b[0]))
        for p, lens in zip(packs, rank_lengths)
    ]
    return Layout(packs, [sum(lens) for lens in rank_lengths])


def keep_bounds(
    need: dict[int, int], next_supply: list[list[int]], world: int
) -> dict[int, list[int]]:
    """``balance_takes``' ``keep`` as the loader sets it: rank r may leave queued at most the
    next step's supply of source i plus one rank's share of this step's need."""
    return {
        i: [sum(1 for j in next_supply[r] if j == i) + -(-need[i] // world) for r in range(world)]
        for i in need
    }


def imbalance(tokens: list[int]) -> float:
    """``max / mean - 1`` of tokens per rank (0 when every rank holds the same)."""
    mean = sum(tokens) / max(1, len(tokens))
    return max(tokens) / mean - 1.0 if mean > 0 else 0.0
