"""Exact per-step mixing: which source fills each sample slot of each rank's micro-batches.

The plan of a step is a pure function of ``(seed, step)`` and the recipe, computed identically on
every rank, so it needs no state to resume:

1. Task counts of the global batch: ``G * ratio / sum(ratio)`` rounded by largest remainder
   (ties to the task listed first in und, text, gen); the counts always sum to ``G``. E.g. 5:1:4
   of 128 -> 64 : 12.8 : 51.2 -> 64 : 13 : 51; of 8 -> 4 : 1 : 3.
2. The step's slots, grouped by task (und, text, gen), are dealt round-robin to ranks (rotated
   by the step, so no rank always gets a task's extra sample), then each rank's slots round-robin
   to its micro-batches: every rank gets exactly ``micro * accum`` samples, every micro-batch
   exactly ``micro``, and each task's count differs by at most one between ranks and between a
   rank's micro-batches.
3. A task's slots are split among its active sources by systematic sampling with the source
   weights (each source gets ``n * w`` rounded up or down, exact in expectation), seeded by step.
"""

from __future__ import annotations

import numpy as np

# one splitter for every loader (janus_train.batch); slots of a step grouped in its tie order
from janus_train.batch import TIE_ORDER as TASK_ORDER
from janus_train.data.recipe import Recipe
from janus_train.data.shards import stable_seed


def task_sequence(counts: dict[str, int]) -> list[str]:
    """All slots of a step, grouped by task in ``TASK_ORDER``."""
    return [t for t in TASK_ORDER for _ in range(counts[t])]


def pick_sources(weights: list[float], n: int, seed: int) -> list[int]:
    """Systematic sampling: ``n`` source indices, each ``n * w_i`` up to rounding, shuffled."""
    if n == 0:
        return []
    rng = np.random.default_rng(seed)
    w = np.asarray(weights, dtype=np.float64)
    cum = np.cumsum(w / w.sum())
    cum[-1] = 1.0
    points = (rng.random() + np.arange(n)) / n
    picks = np.searchsorted(cum, points, side="right")
    rng.shuffle(picks)
    return [int(p) for p in picks]


def rank_supply(
    recipe: Recipe, counts: dict[str, int], step: int, world_size: int, seed: int
) -> list[list[int]]:
    """``supply[rank]`` = recipe source indices of the step's slots dealt to that rank (the
    step_plan dealing without the micro-batch split; ``G`` need not divide by the world).
    With token-budget micro-batches a rank *builds* these samples; which rank *trains* which
    sample is then balanced by tokens (``janus_train.data.packing``)."""
    plan = step_plan(recipe, counts, step, world_size, 1, 0, seed)
    return [micro[0] for micro in plan]


def step_plan(
    recipe: Recipe,
    counts: dict[str, int],
    step: int,
    world_size: int,
    micro_batch_size: int,
    grad_accum: int,
    seed: int,
) -> list[list[list[int]]]:
    """``plan[rank][micro]`` = recipe source indices of that micro-batch's samples.
    ``grad_accum=0``: one list per rank holding all its slots (``rank_supply``)."""
    seq = task_sequence(counts)
    flat = grad_accum == 0
    grad_accum = max(1, grad_accum)
    assert flat or len(seq) == world_size * micro_batch_size * grad_accum
    picks: dict[str, list[int]] = {}
    for t in TASK_ORDER:
        if counts[t] == 0:
            continue
        idx = [i for i, s in enumerate(recipe.sources) if s.task_key == t and s.active(step)]
        if not idx:
            raise ValueError(f"{recipe.path}: no active {t!r} source at step {step}")
        chosen = pick_sources(
            [recipe.sources[i].weight for i in idx], counts[t], stable_seed(seed, "mix", step, t)
        )
        picks[t] = [idx[j] for j in chosen]
    taken = dict.fromkeys(picks, 0)
    plan: list[list[list[int]]] = [[[] for _ in range(grad_accum)] for _ in range(world_size)]
    per_rank = [0] * world_size
    for s, t in enumerate(seq):
        rank = (s + step) % world_size
        pos = per_rank[rank]
        per_rank[rank] += 1
        plan[rank][pos % grad_accum].append(picks[t][taken[t]])
        taken[t] += 1
    return plan
