"""The training loader: per-rank step batches with an exact task ratio, resumable exactly.

::

    recipe sources --RecordStream (split by rank x worker, seeded)--> records
        --record_to_samples (decode, preprocess, build + masks; bad data counted)--> samples
        --step_plan (exact ratio per step, same on every rank)--> grad_accum micro-batches
        --collate--> batch dicts (contract: janus_train/batch.py)

Each dataloader worker builds whole steps: logical worker ``w`` builds the steps ``s`` with
``s % workers == w`` from its own source streams (consumer ``rank * workers + w``), so a step's
samples never depend on another worker's progress. Every item carries that worker's stream
position after the step; the loader keeps the position of the last *consumed* step per worker, so
``state_dict()`` is exact whatever the prefetch depth: restore re-opens each stream at its saved
record (local shards seek; nothing skipped is decoded) and continues with the next step.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import random
import sys
from collections import Counter

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from janus_train import compat
from janus_train.batch import Sample, empty_batch
from janus_train.data.builders import (
    BuildContext,
    collate_samples,
    finish_pixels,
    record_to_samples,
)
from janus_train.data.config import DataConfig
from janus_train.data.mixing import rank_supply, step_plan, task_counts
from janus_train.data.packing import Layout, balance_takes, keep_bounds, layout
from janus_train.data.preprocess import BadSample
from janus_train.data.recipe import Recipe, Source, check_recipe_for_stage, load_recipe
from janus_train.data.shards import RecordStream, stable_seed
from janus_train.errors import DataFailure
from janus_train.model.tokenizer import resolve_special_tokens

logger = logging.getLogger(__name__)
STATE_VERSION = 1

__all__ = ["StepLoader", "TokenStepLoader", "build_train_loader", "load_recipe", "build_context"]


class SampleStream:
    """Built samples of one source for one consumer, with skip accounting and resumable state.

    State: ``{"rec": <RecordStream position of the current record>, "sub": samples of it already
    returned}`` (a text record can yield several chunks).
    """

    def __init__(
        self,
        src: Source,
        ctx: BuildContext,
        dcfg: DataConfig,
        consumer: int,
        n_consumers: int,
        state: dict | None,
        counters: Counter,
    ):
        self.src, self.ctx, self.dcfg, self.counters = src, ctx, dcfg, counters
        self.shard_stats: dict[str, list[int]] = {}
        self.attempts = self.fails = 0
        st = state or {}
        self.rs = RecordStream(
            src.name,
            src.shards,
            consumer,
            n_consumers,
            dcfg.seed,
            shuffle=dcfg.shuffle,
            state=st.get("rec"),
            on_shard_error=self._shard_error,
        )
        self.cur = self.rs.state()
        self.sub = 0
        self.pending: list[Sample] = []
        if st.get("sub", 0):
            self._fill()
            self.pending = self.pending[int(st["sub"]) :]
            self.sub = int(st["sub"])

    def state(self) -> dict:
        if self.pending:
            return {"rec": dict(self.cur), "sub": self.sub}
        return {"rec": self.rs.state(), "sub": 0}

    def _fail(self, url: str, reason: str, detail: str) -> None:
        name = self.src.name
        self.counters[f"skipped/{name}/{reason}"] += 1
        self.attempts += 1
        self.fails += 1
        stats = self.shard_stats.setdefault(url, [0, 0])
        stats[0] += 1
        stats[1] += 1
        if self.counters[f"skipped/{name}/{reason}"] <= 3:
            logger.warning("data source %s: skipped a sample of %s (%s)", name, url, detail)
        d = self.dcfg
        for n_att, n_fail, what in (
            (stats[0], stats[1], f"shard {url}"),
            (self.attempts, self.fails, "the source"),
        ):
            if n_att >= d.failure_min_samples and n_fail / n_att > d.max_failure_rate:
                raise DataFailure(
                    f"data source {name!r}: {n_fail} of {n_att} samples of {what} failed "
                    f"({n_fail / n_att:.0%} > data.max_failure_rate={d.max_failure_rate}); "
                    f"shard {url}; last: {detail}"
                )

    def _shard_error(self, url: str, reason: str, detail: str) -> None:
        self._fail(url, reason, detail)

    def _fill(self) -> None:
        while not self.pending:
            self.cur = self.rs.state()
            rec = self.rs.next()
            rng = random.Random(
                stable_seed(self.dcfg.seed, self.src.name, self.rs.epoch, rec.url, rec.key)
            )
            try:
                samples = record_to_samples(
                    rec.members, self.src.format, self.src.task, self.ctx, rng, self.src.class_names
                )
            except BadSample as e:
                self._fail(rec.url, e.reason, f"{rec.key}: {e}")
                continue
            self.attempts += 1
            self.shard_stats.setdefault(rec.url, [0, 0])[0] += 1
            for i, s in enumerate(samples):
                s.key = f"{rec.url}#{rec.key}" + (f"#{i}" if i else "")
            self.pending, self.sub = samples, 0

    def next(self) -> Sample:
        self._fill()
        self.sub += 1
        self.counters[f"samples/{self.src.name}"] += 1
        return self.pending.pop(0)


class StepDataset(IterableDataset):
    """Yields this rank's steps ``>= start_step`` built by each (logical) worker."""

    def __init__(
        self,
        recipe: Recipe,
        ctx: BuildContext,
        dcfg: DataConfig,
        counts: dict,
        rank: int,
        world_size: int,
        num_workers: int,
        micro_batch_size: int,
        grad_accum: int,
        start_step: int,
        worker_states: list[dict],
        raw: bool = False,
    ):
        super().__init__()
        self.raw = raw
        """Yield the rank's built samples of the step (its ``rank_supply``) uncollated, for
        the token-budget loader to balance and pack."""
        self.recipe, self.ctx, self.dcfg, self.counts = recipe, ctx, dcfg, counts
        self.rank, self.world_size, self.W = rank, world_size, max(1, num_workers)
        self.mbs, self.ga = micro_batch_size, grad_accum
        self.start_step, self.worker_states = start_step, worker_states

    def __iter__(self):
        info = get_worker_info()
        loader_id = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)
        # DataLoader hands out items from loader worker 0 first: rotate so that the worker
        # serving step start_step is logical worker start_step % W (stable across resumes).
        w = (loader_id + self.start_step) % self.W
        ws = self.worker_states[w]
        counters = Counter(ws.get("counters", {}))
        consumer, C = self.rank * self.W + w, self.world_size * self.W
        streams: dict[int, SampleStream] = {}
        src_states = ws.get("sources", {})
        step = self.start_step + ((w - self.start_step) % self.W)
        while True:
            plan = step_plan(
                self.recipe,
                self.counts,
                step,
                self.world_size,
                self.mbs,
                0 if self.raw else self.ga,
                self.dcfg.seed,
            )[self.rank]
            micro, keys = [], []
            for src_ids in plan:
                samples = []
                for i in src_ids:
                    if i not in streams:
                        src = self.recipe.sources[i]
                        streams[i] = SampleStream(
                            src,
                            self.ctx,
                            self.dcfg,
                            consumer,
                            C,
                            src_states.get(src.name),
                            counters,
                        )
                    samples.append(streams[i].next())
                if self.raw:
                    micro.append(list(zip(src_ids, samples)))
                    continue
                micro.append(
                    collate_samples(
                        samples,
                        self.ctx,
                        self.dcfg.pad_to_multiple_of,
                        self.dcfg.pixels_uint8,
                        self.dcfg.pack,
                    )
                )
                keys.append([s.key for s in samples])
            for i, s in streams.items():
                src_states[self.recipe.sources[i].name] = s.state()
            state = {
                "sources": {k: dict(v) for k, v in src_states.items()},
                "counters": dict(counters),
            }
            yield {"step": step, "worker": w, "micro": micro, "keys": keys, "state": state}
            step += self.W


def _init_worker(parent_pid: int, _worker_id: int) -> None:
    """A loader worker's life is tied to the trainer's.

    Slurm may signal every process of a job (workers included): only the trainer reacts to
    SIGUSR1/SIGTERM (checkpoint, then exit), so a worker ignores them, and the trainer kills it
    in ``StepLoader.close``. If the trainer dies without closing (SIGKILL, ``os._exit``), the
    worker must not outlive it: the kernel kills it with the parent (``PR_SET_PDEATHSIG``, Linux;
    the parent is the trainer under the fork and spawn contexts), and a thread polls the trainer's
    pid (every context, every OS; forkserver workers' parent is the fork server).
    """
    import signal
    import threading
    import time

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else (pid reused): treat as gone
            return False
        return True

    direct = os.getppid() == parent_pid  # fork / spawn: a dead parent means a new ppid

    def watch() -> None:
        while alive(parent_pid) and not (direct and os.getppid() != parent_pid):
            time.sleep(1.0)
        os._exit(1)

    if not alive(parent_pid):  # died between the fork and here
        os._exit(1)
    threading.Thread(target=watch, name="janus-parent-watch", daemon=True).start()


class StepLoader:
    """``next_step()`` -> this rank's ``grad_accum`` micro-batches of the next optimizer step."""

    def __init__(
        self,
        recipe: Recipe,
        ctx: BuildContext,
        dcfg: DataConfig,
        counts: dict,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        grad_accum: int,
    ):
        self.recipe, self.ctx, self.dcfg, self.counts = recipe, ctx, dcfg, counts
        self.rank, self.world_size = rank, world_size
        self.mbs, self.ga = micro_batch_size, grad_accum
        self.num_workers = dcfg.num_workers
        self.step = 0
        self.worker_states: list[dict] = [{} for _ in range(max(1, self.num_workers))]
        self._loader = None
        self._it = None
        self.last_keys: list[list[str]] = []
        """Sample keys (``shard#key``) of the last step's micro-batches."""

    def _start(self) -> None:
        ds = StepDataset(
            self.recipe,
            self.ctx,
            self.dcfg,
            self.counts,
            self.rank,
            self.world_size,
            self.num_workers,
            self.mbs,
            self.ga,
            self._next_pull(),
            [dict(s) for s in self.worker_states],
            raw=self._raw,
        )
        if self.num_workers > 0:
            self._loader = DataLoader(
                ds,
                batch_size=None,
                num_workers=self.num_workers,
                prefetch_factor=self.dcfg.prefetch_factor,
                persistent_workers=False,
                pin_memory=self.dcfg.pin_memory and torch.cuda.is_available(),
                multiprocessing_context=self.dcfg.mp_context,
                worker_init_fn=functools.partial(_init_worker, os.getpid()),
            )
        else:
            self._loader = ds
        self._it = iter(self._loader)

    _raw = False

    def _next_pull(self) -> int:
        return self.step

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """The ``grad_accum`` micro-batches of this rank for the next optimizer step."""
        if self._it is None:
            self._start()
        item = next(self._it)
        if item["step"] != self.step:
            raise RuntimeError(
                f"data loader out of order: got step {item['step']}, expected {self.step}"
            )
        self.worker_states[item["worker"]] = item["state"]
        self.step += 1
        self.last_keys = item["keys"]
        return item["micro"]

    def finish(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """With ``data.pixels_uint8``: normalise a (device) batch's uint8 pixels to the float
        contract; otherwise the batch unchanged. Call after moving the batch to the device."""
        return finish_pixels(batch, self.ctx.mean, self.ctx.std)

    def counters(self) -> dict[str, int]:
        total: Counter = Counter()
        for ws in self.worker_states:
            total.update(ws.get("counters", {}))
        return dict(sorted(total.items()))

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "seed": self.dcfg.seed,
            "recipe": self.recipe.name,
            "sources": [s.name for s in self.recipe.sources],
            "workers": [dict(ws) for ws in self.worker_states],
        }

    def load_state_dict(self, sd: dict) -> None:
        for key, mine in (
            ("version", STATE_VERSION),
            ("world_size", self.world_size),
            ("num_workers", self.num_workers),
            ("seed", self.dcfg.seed),
            ("rank", self.rank),
        ):
            if sd.get(key) != mine:
                raise ValueError(
                    f"loader state has {key}={sd.get(key)!r} but this run has "
                    f"{mine!r}: exact resume needs the same value"
                )
        missing = set(sd["sources"]) - {s.name for s in self.recipe.sources}
        if missing and self.rank == 0:
            logger.warning(
                "data sources %s are no longer in recipe %s: dropped",
                sorted(missing),
                self.recipe.name,
            )
        self.close()
        self.step = int(sd["step"])
        self.worker_states = [dict(ws) for ws in sd["workers"]]

    def can_resume_exactly(self, sd: dict) -> bool:
        """Whether ``sd`` was saved by the same rank of the same consumer layout."""
        return all(
            sd.get(k) == v
            for k, v in (
                ("version", STATE_VERSION),
                ("world_size", self.world_size),
                ("num_workers", self.num_workers),
                ("rank", self.rank),
            )
        )

    def load_resharded(self, sds: list[dict]) -> None:
        """Continue from every rank's state of a run with another world size or
        ``data.num_workers`` (``sds`` in rank order): each source carries on inside its epoch
        without reading a record twice; the records skipped are counted on rank 0 as
        ``skipped/<source>/reshard*`` (see ``janus_train.data.reshard``), the old counters
        summed there too."""
        from janus_train.data.reshard import plan_carry

        for sd in sds:
            if sd.get("seed") != self.dcfg.seed or sd.get("version") != STATE_VERSION:
                raise ValueError(
                    f"loader state has data.seed={sd.get('seed')!r} "
                    f"(version {sd.get('version')}), this run "
                    f"{self.dcfg.seed!r}: the data order cannot continue"
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
        sources, total = {}, Counter()
        for ws in old:
            total.update(ws.get("counters", {}))
        for src in self.recipe.sources:
            state, counts = plan_carry(
                src.name,
                src.shards,
                self.dcfg.seed,
                self.dcfg.shuffle,
                [ws.get("sources", {}).get(src.name) for ws in old],
            )
            sources[src.name] = {"rec": state, "sub": 0}
            for k, v in counts.items():
                total[f"skipped/{src.name}/{k}"] += v
            if any(counts.values()) and self.rank == 0:
                logger.warning(
                    "data source %s: resumed on %d consumers from %d: %s",
                    src.name,
                    self.world_size * max(1, self.num_workers),
                    len(old),
                    dict(counts),
                )
        self.close()
        self.step = int(sds[0]["step"])
        self.worker_states = [
            {
                "sources": {k: {"rec": dict(v["rec"]), "sub": 0} for k, v in sources.items()},
                "counters": dict(total) if self.rank == 0 and w == 0 else {},
            }
            for w in range(max(1, self.num_workers))
        ]

    def close(self) -> None:
        """Stop the worker processes: asked to finish, killed when they have not after torch's
        grace (5 s per worker). Safe to call twice; the next ``next_step()`` starts new workers
        at the current position."""
        it, self._it, self._loader = self._it, None, None
        workers, shutdown = compat.dataloader_workers(it) if it is not None else ([], None)
        if shutdown is None:
            return
        # torch's shutdown asks each worker to finish, joins it with a timeout, then sends
        # SIGTERM, which workers ignore (_init_worker): a worker busy in a long step or blocked
        # on a full queue would keep this process waiting at exit forever. Kill what is left.
        try:
            shutdown()
        finally:
            for w in workers:
                if w.is_alive():
                    w.kill()
                w.join(timeout=5)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class TokenStepLoader(StepLoader):
    """Token-budget micro-batches (``train.tokens_per_micro``), exact and resumable.

    Each rank *builds* its ``rank_supply`` share of every step (the plan of ``mixing.py``) into
    per-source FIFO queues, one step ahead. At step ``s`` the ranks exchange the lengths of
    their queued samples (``exchange``: an all-gather the trainer provides; the one collective
    of the loader) and every rank computes the same decision (``packing.balance_takes``): how
    many samples each rank takes from the head of each of its queues so that the step holds
    exactly the plan's count of every source (so the exact task ratio and ``G`` samples)
    while tokens per rank are balanced. A rank may take up to one step ahead of its supply, or
    leave at most one step's share (plus the next step's supply) queued, so no sample waits
    long. Every rank then packs its share (``packing.layout``: first fit decreasing into
    ``tokens_per_micro``; the micro-step count is the max over ranks, computed identically
    everywhere) into one packed row per micro-batch. Queued samples of a source that is no
    longer active are dropped (``dropped/<source>``). State = worker stream positions after the
    last *built* step + the queued samples themselves, so resume is exact.

    Resuming under an edited recipe (a source added or removed, weights or batch changed): when
    what this rank built for the queued steps differs from what the new recipe plans for them
    on any rank, every rank drops its queues (counted as ``skipped/<source>/recipe_change``)
    and rebuilds those steps under the new recipe, the streams continuing where they were; an
    added source starts at its beginning.
    """

    _raw = True

    def __init__(self, *args, tokens_per_micro: int, exchange=None, **kw):
        super().__init__(*args, **kw)
        self.tokens_per_micro = tokens_per_micro
        self.exchange = exchange or (lambda obj: [obj])
        """``exchange(obj) -> [obj of rank 0, ..., obj of rank world-1]`` (all-gather)."""
        n = len(self.recipe.sources)
        self.queues: list[list[Sample]] = [[] for _ in range(n)]
        self.pulled = 0
        """Steps whose supply has been built into the queues."""
        self.dropped: Counter = Counter()
        self.last_layout: Layout | None = None

    def _next_pull(self) -> int:
        return self.pulled

    def _supply(self, step: int) -> list[list[int]]:
        return rank_supply(self.recipe, self.counts, step, self.world_size, self.dcfg.seed)

    def _pull(self) -> None:
        if self._it is None:
            self._start()
        item = next(self._it)
        if item["step"] != self.pulled:
            raise RuntimeError(
                f"data loader out of order: got step {item['step']}, expected {self.pulled}"
            )
        self.worker_states[item["worker"]] = item["state"]
        for src, sample in item["micro"][0]:
            self.queues[src].append(sample)
        self.pulled += 1

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        s = self.step
        while self.pulled <= s + 1:  # this step's supply and the next one's
            self._pull()
        need = Counter(i for share in self._supply(s) for i in share)
        nxt = self._supply(s + 1)
        world = self.world_size
        keep = keep_bounds(need, nxt, world)
        mine = {i: [len(x.input_ids) for x in q] for i, q in enumerate(self.queues) if q}
        every = self.exchange(mine)
        queues = [{i: r_q.get(i, []) for i in need} for r_q in every]
        takes = balance_takes(queues, dict(need), keep)
        order = sorted(need)
        rank_lengths = [
            [n for i in order for n in queues[r][i][: takes[r][i]]] for r in range(world)
        ]
        lay = layout(rank_lengths, self.tokens_per_micro)
        taken: list[Sample] = []
        for i in order:
            k = takes[self.rank][i]
            taken += self.queues[i][:k]
            del self.queues[i][:k]
        for i, src in enumerate(self.recipe.sources):  # a source that ends leaves nothing
            if self.queues[i] and not src.active(s + 1):
                self.dropped[f"dropped/{src.name}"] += len(self.queues[i])
                self.queues[i] = []
        d = self.dcfg
        out, keys = [], []
        for pack in lay.packs[self.rank]:
            samples = [taken[j] for j in pack]
            keys.append([x.key for x in samples])
            out.append(
                collate_samples(
                    samples,
                    self.ctx,
                    d.pad_to_multiple_of,
                    d.pixels_uint8,
                    pack=True,
                    row_len=self.tokens_per_micro,
                )
                if samples
                else empty_batch(
                    self.ctx.st.pad,
                    self.ctx.image_size,
                    torch.uint8 if d.pixels_uint8 else torch.float32,
                )
            )
        self.step += 1
        self.last_keys, self.last_layout = keys, lay
        return out

    def counters(self) -> dict[str, int]:
        return dict(sorted({**super().counters(), **self.dropped}.items()))

    def _built(self) -> list[list[str]]:
        """Source names of this rank's supply of the steps built but not trained."""
        names = [src.name for src in self.recipe.sources]
        return [
            [names[i] for i in self._supply(k)[self.rank]] for k in range(self.step, self.pulled)
        ]

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd.update(
            tokens_per_micro=self.tokens_per_micro,
            pulled=self.pulled,
            built=self._built(),
            dropped=dict(self.dropped),
            queues={src.name: list(q) for src, q in zip(self.recipe.sources, self.queues)},
        )
        return sd

    def can_resume_exactly(self, sd: dict) -> bool:
        return super().can_resume_exactly(sd) and "pulled" in sd

    def load_resharded(self, sds: list[dict]) -> None:
        """As :meth:`StepLoader.load_resharded`; the samples the old ranks had built but not
        trained on (their queues) are not carried: counted on rank 0 as
        ``skipped/<source>/reshard_queued``."""
        super().load_resharded(sds)
        self.pulled = self.step
        self.queues = [[] for _ in self.recipe.sources]
        self.dropped = Counter()
        if self.rank == 0:
            for sd in sds:
                self.dropped.update(sd.get("dropped", {}))
                for name, q in sd.get("queues", {}).items():
                    if q:
                        self.dropped[f"skipped/{name}/reshard_queued"] += len(q)

    def load_state_dict(self, sd: dict) -> None:
        if "pulled" not in sd:
            raise ValueError(
                "loader state was written without train.tokens_per_micro: exact "
                "resume needs the same batching mode"
            )
        super().load_state_dict(sd)
        self.pulled = int(sd["pulled"])
        self.dropped = Counter(sd.get("dropped", {}))
        by_name = {src.name: i for i, src in enumerate(self.recipe.sources)}
        self.queues = [[] for _ in self.recipe.sources]
        for name, q in sd["queues"].items():
            if name in by_name:
                self.queues[by_name[name]] = list(q)
        if "built" in sd:
            same = sd["built"] == self._built()
        else:  # written before the plan was recorded: the source list decides
            same = list(sd["sources"]) == [src.name for src in self.recipe.sources]
        if any(self.exchange(not same)):  # one rank's queues alone cannot be kept
            self._rebuild_queued(sd)

    def _rebuild_queued(self, sd: dict) -> None:
        lost = Counter({name: len(q) for name, q in sd["queues"].items() if q})
        for name, n in lost.items():
            self.dropped[f"skipped/{name}/recipe_change"] += n
        if self.rank == 0:
            logger.warning(
                "the data recipe changed since the checkpoint: steps %d-%d are rebuilt under "
                "the new one, the samples queued for them skipped (%s)",
                self.step,
                self.pulled - 1,
                dict(lost),
            )
        self.pulled = self.step
        self.queues = [[] for _ in self.recipe.sources]


def build_context(run, processor) -> BuildContext:
    """Builder settings from the run config and the processor (ids resolved by string)."""
    tok = processor.tokenizer
    ip = processor.image_processor
    n_proc = getattr(processor, "num_image_tokens", run.model.num_image_tokens)
    if n_proc != run.model.num_image_tokens:
        raise ValueError(
            f"processor inserts {n_proc} image tokens but model.num_image_tokens "
            f"is {run.model.num_image_tokens}"
        )
    d = run.data
    return BuildContext(
        tokenizer=tok,
        st=resolve_special_tokens(tok),
        chat_template=getattr(run.experiment.chat_template, "value", run.experiment.chat_template),
        und_format=run.und_format,  # the stage's, or experiment.<stage>'s override
        gen_format=run.gen_format,
        sft=run.stage.sft,
        seq_len=d.seq_len,
        text_chunk=d.text_chunk,
        image_size=run.model.image_size,
        num_image_tokens=run.model.num_image_tokens,
        codebook_size=run.model.vq.num_embeddings,
        mean=tuple(float(x) for x in ip.image_mean),
        std=tuple(float(x) for x in ip.image_std),
        cfg_dropout=d.cfg_dropout,
        first_sentence_prob=run.hparams.first_sentence_prob,  # per stage (experiment)
        system_prompt=d.system_prompt,
    )


def build_train_loader(
    run,
    processor,
    *,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    grad_accum: int,
    recipe: str | None = None,
    tokens_per_micro: int | None = None,
    exchange=None,
) -> StepLoader:
    """Validate the recipe and batch arithmetic, then the rank's loader: a
    ``TokenStepLoader`` with ``tokens_per_micro`` > 0 (``exchange``: the all-gather of the
    ranks' queue lengths; None = a world of one), else a fixed-count ``StepLoader``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hp = run.hparams
    if tokens_per_micro:
        if tokens_per_micro < run.data.seq_len:
            raise ValueError(
                f"train.tokens_per_micro={tokens_per_micro} < data.seq_len="
                f"{run.data.seq_len}: a sample of seq_len tokens must fit"
            )
    elif micro_batch_size * grad_accum * world_size != hp.global_batch_size:
        raise ValueError(
            f"global_batch_size={hp.global_batch_size} != micro_batch_size {micro_batch_size} x "
            f"grad_accum {grad_accum} x world_size {world_size}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    # shard existence: rank 0 only (every rank statting every shard floods a shared filesystem)
    rec = load_recipe(recipe or run.data.recipe or hp.data_recipe, stat_shards=rank == 0)
    ratio = {"und": hp.ratio.und, "text": hp.ratio.text, "gen": hp.ratio.gen}
    check_recipe_for_stage(rec, ratio, hp.steps)
    counts = task_counts(ratio, hp.global_batch_size)
    consumers = world_size * max(1, run.data.num_workers)
    for s in rec.sources:
        if ratio[s.task_key] > 0 and len(s.shards) < consumers:
            logger.warning(
                "data source %s has %d shards < %d ranks x workers: every worker reads all of "
                "them and keeps every %d-th record (correct, but reads %dx the bytes; "
                "write more shards)",
                s.name,
                len(s.shards),
                consumers,
                consumers,
                consumers,
            )
    ctx = build_context(run, processor)
    dcfg = dataclasses.replace(run.data)  # a snapshot: later edits of run.data do not leak in
    if tokens_per_micro:
        return TokenStepLoader(
            rec,
            ctx,
            dcfg,
            counts,
            rank,
            world_size,
            1,
            1,
            tokens_per_micro=tokens_per_micro,
            exchange=exchange,
        )
    return StepLoader(rec, ctx, dcfg, counts, rank, world_size, micro_batch_size, grad_accum)
