"""What the busiest rank computes: a simulation of token-budget steps with the data loader's own
decisions (``janus_train.data.mixing.rank_supply`` deals a step's samples to the ranks that build
them, ``janus_train.data.packing.balance_takes`` decides who trains which, ``packing.layout``
packs each rank's share into micro-steps), over per-source sample-length distributions.

::

    recipe sources (task, weight, active range) + per-task length distributions
        --rank_supply per step--> per-rank FIFO queues --balance_takes (keep bounds as the
        loader's)--> per-rank shares --layout--> per-rank, per-micro-step tokens and FLOPs

Lengths are drawn i.i.d. per sample from its source's distribution: the quantiles the recipe
declares for it (``sample_tokens``, measured by ``janus-data inspect --lengths``; piecewise
uniform between consecutive quantiles), else the planner's default for its task
(:func:`default_lengths`: the papers' mix as ``train.synthetic_length_mix=janus`` generates it,
the mix ``benchmarks/bench_gpu.py`` measures MFU on, uniform between its bounds); a task's
``und_tokens=`` / ``text_tokens=`` / ``gen_tokens=`` on the command line overrides both for every
source of the task (:func:`source_lengths` says which applies). ``text_chunk`` splits text documents into chunks of at most
that many tokens (a recipe change, reported apart). Every rank synchronises at every micro-step
under ZeRO-2/3 (the gradient reduction or parameter gathers of that micro-step), at the step's
end under ZeRO-0/1, so the planner takes per micro-step the max over ranks, and per step the max
over ranks of the sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from janus_train.batch import task_counts
from janus_train.data.mixing import rank_supply
from janus_train.data.packing import balance_takes, keep_bounds, layout

# text tokens of a sample per task, inclusive: data/synthetic_loader.py's "janus" mix
from janus_train.data.synthetic_loader import JANUS_MIX

SIM_STEPS = 4
"""Steps simulated after one warm-up step (queues filled); the figures are their means."""


def default_lengths(seq_len: int, image_tokens: int) -> dict[str, tuple[int, int]]:
    """Total tokens of a sample per task ``(lo, hi)``, uniform: the synthetic "janus" mix's text
    tokens plus the image positions and markers, capped as it caps them."""
    extra = {"und": image_tokens + 4, "gen": image_tokens + 2, "text": 2}
    return {
        t: (min(lo, seq_len - extra[t]) + extra[t], min(hi, seq_len - extra[t]) + extra[t])
        for t, (lo, hi) in JANUS_MIX.items()
    }


@dataclass(frozen=True)
class SourceLengths:
    """The length distribution the simulation draws one source's samples from."""

    name: str
    task: str
    quantiles: tuple[int, ...]
    """Equally spaced quantiles, shortest to longest (two: uniform between them)."""
    origin: str
    """``recipe`` (the source's ``sample_tokens``), ``command line`` or ``default``."""

    @property
    def mean(self) -> float:
        """Mean of the piecewise-uniform distribution the simulation draws from."""
        q = self.quantiles
        return sum(a + b for a, b in zip(q, q[1:])) / (2 * (len(q) - 1))


def source_lengths(
    recipe_name: str | None,
    ratio: tuple[int, int, int],
    task_lengths: tuple[tuple[str, int, int], ...],
    seq_len: int,
    command_line: frozenset[str] = frozenset(),
) -> tuple[SourceLengths, ...]:
    """Per source of the stage's recipe (one per task without one): its declared
    ``sample_tokens`` capped at ``seq_len`` (the loader never builds longer samples), else
    ``task_lengths`` (the defaults, or the command line's for the tasks in ``command_line``,
    which override a declaration)."""
    bounds = {t: (lo, hi) for t, lo, hi in task_lengths}
    out = []
    for s in _sources(recipe_name, ratio).sources:
        t = s.task_key
        if s.sample_tokens and t not in command_line:
            q, origin = tuple(min(seq_len, n) for n in s.sample_tokens), "recipe"
        else:
            q, origin = bounds[t], "command line" if t in command_line else "default"
        out.append(SourceLengths(s.name, t, q, origin))
    return tuple(out)


@dataclass(frozen=True)
class SimResult:
    mean_tokens: float
    """Mean tokens per rank per step."""
    busiest_tokens: float
    """Mean over steps of the max over ranks of a rank's tokens."""
    busiest_flops: float
    """Mean over steps of the max over ranks of a rank's model FLOPs (ZeRO-0/1 pace)."""
    steps: tuple[tuple[float, tuple[float, ...], float], ...]
    """Per simulated step: (the busiest rank's FLOPs, per micro-step the max over ranks of its
    FLOPs (ZeRO-2/3 pace), the busiest rank's last micro-step FLOPs (ZeRO-1's overlap
    window))."""
    n_micro: float
    """Mean micro-steps per step."""
    mean_flops: float
    """Mean model FLOPs per rank per step."""

    @property
    def imbalance(self) -> float:
        return self.busiest_tokens / self.mean_tokens


@lru_cache(maxsize=32)
def _sources(recipe_name: str | None, ratio: tuple[int, int, int]):
    """(task key, weight, active) per source: the stage's recipe, else one source per task."""
    from janus_train.data.recipe import Recipe, Source, load_recipe

    if recipe_name:
        try:
            return load_recipe(recipe_name, check_shards=False)
        except FileNotFoundError:
            pass  # an invalid recipe raises (its one line names the file and key)
    tasks = {"und": "understanding", "text": "text", "gen": "generation"}
    return Recipe(
        "planner",
        "planner",
        [Source(k, tasks[k], "caption", []) for k, n in zip(("und", "text", "gen"), ratio) if n],
    )


def _drawer(rng, tasks: list[str], bounds: dict, per_source: tuple, text_chunk: int):
    """``draw(i)``: the length of a new sample of source ``i``: piecewise uniform over its
    quantiles (a segment between consecutive ones, then a length in it), text documents
    chunked as the builders chunk them."""
    dists = [
        (per_source[i] if i < len(per_source) and per_source[i] else bounds[t])
        for i, t in enumerate(tasks)
    ]

    def draw(i: int) -> int:
        q = dists[i]
        k = int(rng.integers(0, len(q) - 1)) if len(q) > 2 else 0
        n = int(rng.integers(q[k], q[k + 1] + 1))
        if tasks[i] == "text" and text_chunk and n > text_chunk:
            # a chunked document: this sample is a uniformly chosen one of its chunks
            c = int(rng.integers(0, -(-n // text_chunk)))
            n = min(text_chunk, n - c * text_chunk)
        return max(1, n)

    return draw


def _take_step(
    queues: list[dict[int, list[tuple[int, str]]]], recipe, counts, step: int, world: int, seed: int
) -> list[list[tuple[int, str]]]:
    """Each rank's share of step ``step``, taken off the heads of ``queues`` (per rank, per
    source: ``(tokens, task)`` of the samples dealt to it, FIFO) as the token-budget loader takes
    them: the step's need per source, split by ``balance_takes`` with the loader's lag bounds
    (``keep_bounds``); a share lists its samples source by source, in source order."""
    need: dict[int, int] = {}
    for share in rank_supply(recipe, counts, step, world, seed):
        for i in share:
            need[i] = need.get(i, 0) + 1
    keep = keep_bounds(need, rank_supply(recipe, counts, step + 1, world, seed), world)
    qlens = [{i: [n for n, _ in q.get(i, [])] for i in need} for q in queues]
    takes = balance_takes(qlens, need, keep)
    shares = []
    for r in range(world):
        mine = []
        for i in sorted(need):
            q = queues[r].setdefault(i, [])
            mine += q[: takes[r][i]]
            del q[: takes[r][i]]
        shares.append(mine)
    return shares


@lru_cache(maxsize=256)
def simulate(
    recipe_name: str | None,
    ratio: tuple[int, int, int],
    global_batch: int,
    world: int,
    tokens_per_micro: int,
    lengths: tuple[tuple[str, int, int], ...],
    flops_params: int,
    layers: int,
    hidden: int,
    und_image_flops: float,
    gen_image_flops: float,
    text_chunk: int = 0,
    steps: int = SIM_STEPS,
    seed: int = 0,
    per_source: tuple[tuple[int, ...] | None, ...] = (),
) -> SimResult:
    """``lengths``: ``((task, lo, hi), ...)`` total tokens per sample, uniform; ``per_source``:
    quantiles per recipe source (:class:`SourceLengths`), replacing ``lengths`` where given.
    FLOPs of a sample of t tokens: ``6 N t + 12 L d t^2`` (PaLM; packed samples attend only
    within themselves, as ``speed/mfu`` counts them) plus its encoder's forward FLOPs."""
    recipe = _sources(recipe_name, ratio)
    counts = task_counts({"und": ratio[0], "text": ratio[1], "gen": ratio[2]}, global_batch)
    bounds = {t: (lo, hi) for t, lo, hi in lengths}
    rng = np.random.default_rng(seed)
    tasks = [s.task_key for s in recipe.sources]
    draw = _drawer(rng, tasks, bounds, per_source, text_chunk)
    enc = {"und": und_image_flops, "gen": gen_image_flops, "text": 0.0}
    queues: list[dict[int, list[tuple[int, str]]]] = [{} for _ in range(world)]

    def supply(step: int) -> None:
        for r, share in enumerate(rank_supply(recipe, counts, step, world, seed)):
            for i in share:
                queues[r].setdefault(i, []).append((draw(i), tasks[i]))

    def flops(n: int, task: str) -> float:
        return 6.0 * flops_params * n + 12.0 * layers * hidden * n * n + enc[task]

    supply(0)
    tot = {"mean_t": 0.0, "max_t": 0.0, "max_f": 0.0, "n": 0.0, "mean_f": 0.0}
    per_step = []
    for step in range(steps + 1):
        supply(step + 1)
        shares = _take_step(queues, recipe, counts, step, world, seed)
        lay = layout([[n for n, _ in s] for s in shares], tokens_per_micro)
        if step == 0:
            continue  # warm-up: queues hold one step's supply ahead from here on
        per = [
            [sum(flops(*shares[r][j]) for j in pack) for pack in lay.packs[r]] for r in range(world)
        ]
        totals = [sum(p) for p in per]
        busiest = max(range(world), key=lambda r: totals[r])
        tot["mean_t"] += sum(lay.tokens) / world
        tot["max_t"] += max(lay.tokens)
        tot["max_f"] += totals[busiest]
        tot["mean_f"] += sum(totals) / world
        tot["n"] += lay.n_micro
        m_max = tuple(max(per[r][m] for r in range(world)) for m in range(lay.n_micro))
        per_step.append((totals[busiest], m_max, per[busiest][-1]))
    k = float(steps)
    return SimResult(
        mean_tokens=tot["mean_t"] / k,
        busiest_tokens=tot["max_t"] / k,
        busiest_flops=tot["max_f"] / k,
        steps=tuple(per_step),
        n_micro=tot["n"] / k,
        mean_flops=tot["mean_f"] / k,
    )
