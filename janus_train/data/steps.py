"""Step assembly: the rank's steps built by the loader workers, taken in order, and the stream
positions that make a loader's state.

::

    recipe sources --SampleStream per source (streams.py)--> samples
        --shape.plan (exact ratio per step, same on every rank)--> groups of the rank's slots
        --shape.make, per group--> MicroBatches: a collated micro-batch (fixed-count loader)
                                 | RankSupply: the rank's whole supply of the step, built,
                                   uncollated (token-budget loader)

Each dataloader worker builds whole steps: logical worker ``w`` builds the steps ``s`` with
``s % workers == w`` from its own source streams (consumer ``rank * workers + w``), so a step's
samples never depend on another worker's progress. Every item carries that worker's stream
positions after the step; :class:`WorkerSteps` keeps the positions of the last step *taken*
per worker, so its state is exact whatever the prefetch depth: restore re-opens each stream at
its saved record (local shards seek; nothing skipped is decoded) and continues with the next
step.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections import Counter
from collections.abc import Iterator, Mapping

import torch
from torch.utils.data import IterableDataset, get_worker_info

from janus_train.batch import FrozenMap, Sample
from janus_train.data.builders import BuildContext, collate_samples
from janus_train.data.config import DataConfig
from janus_train.data.mixing import rank_supply, step_plan
from janus_train.data.recipe import Recipe
from janus_train.data.streams import SampleStream
from janus_train.data.workers import start_workers, stop_workers, worker_pids

logger = logging.getLogger(__name__)
STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LoaderArgs:
    """What every part of a rank's WebDataset loader is built on, built once
    (``data.loader.build_train_loader``) and shared by the step loader, its :class:`WorkerSteps`
    and the workers' :class:`StepDataset` (pickled into them). Immutable as ``StageSpec`` is:
    the recipe and the build context frozen dataclasses, the counts a read-only
    :class:`~janus_train.batch.FrozenMap`; only ``dcfg`` (the typed config's own class) and the
    context's tokenizer are objects of their own."""

    recipe: Recipe
    """The stage's recipe, checked against it (``config.resolve_stage``)."""
    ctx: BuildContext
    dcfg: DataConfig
    """A snapshot of the data settings (later edits of the config do not leak in)."""
    counts: Mapping[str, int]
    """Samples per task of every step (``batch.task_counts`` of the ratio and global batch;
    read-only)."""
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "counts", FrozenMap(self.counts))

    @property
    def num_workers(self) -> int:
        """Logical workers building steps (``data.num_workers``; 0 builds in-process, as one)."""
        return max(1, self.dcfg.num_workers)


@dataclasses.dataclass(frozen=True)
class MicroBatches:
    """A fixed-count step as a worker makes it: the rank's ``grad_accum`` groups of
    ``micro_batch_size`` samples (``mixing.step_plan``), each collated in the worker into a
    micro-batch, with its samples' keys."""

    micro_batch_size: int
    grad_accum: int

    def plan(
        self, recipe: Recipe, counts: dict, step: int, world_size: int, rank: int, seed: int
    ) -> list[list[int]]:
        return step_plan(
            recipe, counts, step, world_size, self.micro_batch_size, self.grad_accum, seed
        )[rank]

    def make(
        self, group: list[tuple[int, Sample]], ctx: BuildContext, dcfg: DataConfig
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """One micro-batch and its samples' keys."""
        samples = [s for _, s in group]
        batch = collate_samples(samples, ctx, dcfg.pad_to_multiple_of, dcfg.pixels_uint8, dcfg.pack)
        return batch, [s.key for s in samples]


@dataclasses.dataclass(frozen=True)
class RankSupply:
    """A token-budget step as a worker makes it: one group, the rank's supply of the step
    (``mixing.rank_supply``), built and uncollated, as ``(source index, sample)`` pairs; the
    loader balances the samples across ranks and packs them."""

    def plan(
        self, recipe: Recipe, counts: dict, step: int, world_size: int, rank: int, seed: int
    ) -> list[list[int]]:
        return [rank_supply(recipe, counts, step, world_size, seed)[rank]]

    def make(
        self, group: list[tuple[int, Sample]], ctx: BuildContext, dcfg: DataConfig
    ) -> list[tuple[int, Sample]]:
        return group


class StepDataset(IterableDataset):
    """Yields this rank's steps ``>= start_step``, each made by ``shape`` (:class:`MicroBatches`
    or :class:`RankSupply`) in the (logical) worker that builds it."""

    def __init__(
        self,
        args: LoaderArgs,
        start_step: int,
        worker_states: list[dict],
        shape: MicroBatches | RankSupply,
    ):
        super().__init__()
        self.args, self.W = args, args.num_workers
        self.start_step, self.worker_states, self.shape = start_step, worker_states, shape

    def __iter__(self):
        info = get_worker_info()
        loader_id = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)
        # DataLoader hands out items from loader worker 0 first: rotate so that the worker
        # serving step start_step is logical worker start_step % W (stable across resumes).
        a = self.args
        w = (loader_id + self.start_step) % self.W
        ws = self.worker_states[w]
        counters = Counter(ws.get("counters", {}))
        consumer, n_consumers = a.rank * self.W + w, a.world_size * self.W
        streams: dict[int, SampleStream] = {}
        src_states = ws.get("sources", {})

        def stream(i: int) -> SampleStream:
            if i not in streams:
                src = a.recipe.sources[i]
                state = src_states.get(src.name)
                streams[i] = SampleStream(
                    src, a.ctx, a.dcfg, consumer, n_consumers, state, counters
                )
            return streams[i]

        step = self.start_step + ((w - self.start_step) % self.W)
        while True:
            plan = self.shape.plan(a.recipe, a.counts, step, a.world_size, a.rank, a.dcfg.seed)
            made = [  # one group at a time: a collated group's samples are freed
                self.shape.make([(i, stream(i).next()) for i in ids], a.ctx, a.dcfg) for ids in plan
            ]
            for i, s in streams.items():
                src_states[a.recipe.sources[i].name] = s.state()
            state = {
                "sources": {k: dict(v) for k, v in src_states.items()},
                "counters": dict(counters),
            }
            yield {"step": step, "worker": w, "made": made, "state": state}
            step += self.W


class WorkerSteps:
    """The rank's steps as the workers build them, taken in order, and the workers' stream
    positions after the last step taken: the part of a loader's state that says where its data
    continues (``state_dict``, exact ``load_state_dict``, ``load_resharded`` onto another
    layout). The component both WebDataset loaders are built on."""

    def __init__(self, args: LoaderArgs, shape: MicroBatches | RankSupply):
        self.args, self.shape = args, shape
        self.num_workers = args.dcfg.num_workers
        self.pulled = 0
        """Steps taken from the workers: the next step to take."""
        self.worker_states: list[dict] = [{} for _ in range(max(1, self.num_workers))]
        self.it: Iterator | None = None

    def start(self) -> None:
        """Start the workers at step ``pulled`` (``take`` does when none run)."""
        ds = StepDataset(
            self.args,
            self.pulled,
            copy.deepcopy(self.worker_states),  # in-process streams update their own copy
            self.shape,
        )
        self.it = start_workers(ds, self.args.dcfg)

    def take(self) -> list:
        """What ``shape`` made of each group of step ``pulled``."""
        if self.it is None:
            self.start()
        item = next(self.it)
        if item["step"] != self.pulled:
            raise RuntimeError(
                f"data loader out of order: got step {item['step']}, expected {self.pulled}"
            )
        self.worker_states[item["worker"]] = item["state"]
        self.pulled += 1
        return item["made"]

    def restart_at(self, step: int) -> None:
        """Build from ``step`` on, each stream continuing where it is (workers stopped)."""
        self.close()
        self.pulled = step

    def worker_pids(self) -> list[int]:
        return worker_pids(self.it)

    def counters(self) -> dict[str, int]:
        total: Counter = Counter()
        for ws in self.worker_states:
            total.update(ws.get("counters", {}))
        return dict(sorted(total.items()))

    def state_dict(self, step: int) -> dict:
        """The position part of a loader state; ``step``: the loader's next step to train."""
        return {
            "version": STATE_VERSION,
            "step": step,
            "rank": self.args.rank,
            "world_size": self.args.world_size,
            "num_workers": self.num_workers,
            "seed": self.args.dcfg.seed,
            "recipe": self.args.recipe.name,
            "sources": [s.name for s in self.args.recipe.sources],
            "workers": [dict(ws) for ws in self.worker_states],
        }

    def load_state_dict(self, sd: dict, pulled: int) -> None:
        """Continue from this rank's own ``sd`` (same layout, checked) at step ``pulled``."""
        for key, mine in (
            ("version", STATE_VERSION),
            ("world_size", self.args.world_size),
            ("num_workers", self.num_workers),
            ("seed", self.args.dcfg.seed),
            ("rank", self.args.rank),
        ):
            if sd.get(key) != mine:
                raise ValueError(
                    f"loader state has {key}={sd.get(key)!r} but this run has "
                    f"{mine!r}: exact resume needs the same value"
                )
        missing = set(sd["sources"]) - {s.name for s in self.args.recipe.sources}
        if missing and self.args.rank == 0:
            logger.warning(
                "data sources %s are no longer in recipe %s: dropped",
                sorted(missing),
                self.args.recipe.name,
            )
        self.close()
        self.pulled = pulled
        self.worker_states = [dict(ws) for ws in sd["workers"]]

    def can_resume_exactly(self, sd: dict) -> bool:
        """Whether ``sd`` was saved by the same rank of the same consumer layout."""
        return all(
            sd.get(k) == v
            for k, v in (
                ("version", STATE_VERSION),
                ("world_size", self.args.world_size),
                ("num_workers", self.num_workers),
                ("rank", self.args.rank),
            )
        )

    def load_resharded(self, sds: list[dict]) -> None:
        """Continue from every rank's state of a run with another world size or
        ``data.num_workers`` (``sds`` in rank order), at their step: each source carries on
        inside its epoch without reading a record twice; the records skipped are counted on rank
        0 as ``skipped/<source>/reshard*`` (see ``janus_train.data.reshard``), the old counters
        summed there too."""
        for sd in sds:
            if sd.get("seed") != self.args.dcfg.seed or sd.get("version") != STATE_VERSION:
                raise ValueError(
                    f"loader state has data.seed={sd.get('seed')!r} "
                    f"(version {sd.get('version')}), this run "
                    f"{self.args.dcfg.seed!r}: the data order cannot continue"
                )
        if len({int(sd["step"]) for sd in sds}) != 1:
            raise ValueError("loader states of the ranks are at different steps")
        old = [
            ws
            for sd in sorted(sds, key=lambda d: d["rank"])
            for ws in (sd["workers"] + [{}] * max(1, sd["num_workers"]))[
                : max(1, sd["num_workers"])
            ]
        ]
        sources, total = self._carry(old)
        self.close()
        self.pulled = int(sds[0]["step"])
        self.worker_states = [
            {
                "sources": {k: {"rec": dict(v["rec"]), "sub": 0} for k, v in sources.items()},
                "counters": dict(total) if self.args.rank == 0 and w == 0 else {},
            }
            for w in range(max(1, self.num_workers))
        ]

    def _carry(self, old: list[dict]) -> tuple[dict, Counter]:
        """Every source's carried stream state and the counters (old ones + what the carry
        skipped) from the old consumers' worker states ``old``."""
        from janus_train.data.reshard import plan_carry

        sources, total = {}, Counter()
        for ws in old:
            total.update(ws.get("counters", {}))
        for src in self.args.recipe.sources:
            state, counts = plan_carry(
                src.name,
                src.shards,
                self.args.dcfg.seed,
                self.args.dcfg.shuffle,
                [ws.get("sources", {}).get(src.name) for ws in old],
            )
            sources[src.name] = {"rec": state, "sub": 0}
            for k, v in counts.items():
                total[f"skipped/{src.name}/{k}"] += v
            if any(counts.values()) and self.args.rank == 0:
                logger.warning(
                    "data source %s: resumed on %d consumers from %d: %s",
                    src.name,
                    self.args.world_size * max(1, self.num_workers),
                    len(old),
                    dict(counts),
                )
        return sources, total

    def close(self) -> None:
        """Stop the worker processes. Safe to call twice; the next ``take()`` starts new
        workers at the current position."""
        it, self.it = self.it, None
        if it is not None:
            stop_workers(it)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
