"""The two WebDataset step loaders (``janus_train.step_loader.StepLoader``), each built on one
:class:`~janus_train.data.steps.WorkerSteps`, which its workers fill in their own shape:

    FixedStepLoader   grad_accum micro-batches of micro_batch_size samples (train.tokens_per_micro=0)
                      WorkerSteps(MicroBatches): collated in the workers, trained as they come
    TokenStepLoader   micro-batches of at most tokens_per_micro tokens (the default)
                      WorkerSteps(RankSupply): the rank's built samples, queued one step ahead,
                      balanced across ranks and packed here (janus_train/data/packing.py)
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import torch

from janus_train.batch import Sample, empty_batch
from janus_train.data.builders import collate_samples, finish_pixels
from janus_train.data.mixing import rank_supply
from janus_train.data.packing import Layout, balance_takes, keep_bounds, layout
from janus_train.data.steps import LoaderArgs, MicroBatches, RankSupply, WorkerSteps

logger = logging.getLogger(__name__)


class FixedStepLoader:
    """``next_step()`` -> this rank's ``grad_accum`` micro-batches of ``micro_batch_size``
    samples of the next optimizer step."""

    def __init__(self, args: LoaderArgs, micro_batch_size: int, grad_accum: int):
        self.args = args
        self.worker_steps = WorkerSteps(args, MicroBatches(micro_batch_size, grad_accum))
        self.last_keys: list[list[str]] = []
        """Sample keys (``shard#key``) of the last step's micro-batches."""

    @property
    def step(self) -> int:
        """The next step."""
        return self.worker_steps.pulled

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        made = self.worker_steps.take()
        self.last_keys = [keys for _, keys in made]
        return [batch for batch, _ in made]

    def finish(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """With ``data.pixels_uint8``: normalise a (device) batch's uint8 pixels to the float
        contract; otherwise the batch unchanged. Call after moving the batch to the device."""
        return finish_pixels(batch, self.args.ctx.mean, self.args.ctx.std)

    def counters(self) -> dict[str, int]:
        return self.worker_steps.counters()

    def state_dict(self) -> dict:
        return self.worker_steps.state_dict(self.step)

    def load_state_dict(self, sd: dict) -> None:
        self.worker_steps.load_state_dict(sd, int(sd["step"]))

    def can_resume_exactly(self, sd: dict) -> bool:
        return self.worker_steps.can_resume_exactly(sd)

    def load_resharded(self, sds: list[dict]) -> None:
        """See :meth:`WorkerSteps.load_resharded`."""
        self.worker_steps.load_resharded(sds)

    def close(self) -> None:
        """Stop the worker processes (see :meth:`WorkerSteps.close`)."""
        self.worker_steps.close()


class TokenStepLoader:
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

    def __init__(
        self,
        args: LoaderArgs,
        *,
        tokens_per_micro: int,
        exchange: Callable[[object], list] | None = None,
    ):
        self.args = args
        self.tokens_per_micro = tokens_per_micro
        self.exchange = exchange or (lambda obj: [obj])
        """``exchange(obj) -> [obj of rank 0, ..., obj of rank world-1]`` (all-gather)."""
        self.worker_steps = WorkerSteps(args, RankSupply())
        """Its ``pulled``: steps whose supply has been built into the queues."""
        self.step = 0
        """The next step to train."""
        self.queues: list[list[Sample]] = [[] for _ in args.recipe.sources]
        self.dropped: Counter = Counter()
        self.last_keys: list[list[str]] = []
        """Sample keys (``shard#key``) of the last step's micro-batches."""
        self.last_layout: Layout | None = None

    def _supply(self, step: int) -> list[list[int]]:
        a = self.args
        return rank_supply(a.recipe, a.counts, step, a.world_size, a.dcfg.seed)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        s = self.step
        while self.worker_steps.pulled <= s + 1:  # this step's supply and the next one's
            (supply,) = self.worker_steps.take()
            for src, sample in supply:
                self.queues[src].append(sample)
        taken, lay = self._take(s)
        for i, src in enumerate(self.args.recipe.sources):  # a source that ends leaves nothing
            if self.queues[i] and not src.active(s + 1):
                self.dropped[f"dropped/{src.name}"] += len(self.queues[i])
                self.queues[i] = []
        out = [self._collate([taken[j] for j in pack]) for pack in lay.packs[self.args.rank]]
        self.step += 1
        self.last_keys = [[taken[j].key for j in pack] for pack in lay.packs[self.args.rank]]
        self.last_layout = lay
        return out

    def _take(self, s: int) -> tuple[list[Sample], Layout]:
        """This rank's samples of step ``s`` (taken off its queues) and every rank's packing:
        the same decision on every rank from the exchanged queue lengths. Collective."""
        need = Counter(i for share in self._supply(s) for i in share)
        keep = keep_bounds(need, self._supply(s + 1), self.args.world_size)
        mine = {i: [len(x.input_ids) for x in q] for i, q in enumerate(self.queues) if q}
        queues = [{i: r_q.get(i, []) for i in need} for r_q in self.exchange(mine)]
        takes = balance_takes(queues, dict(need), keep)
        order = sorted(need)
        rank_lengths = [
            [n for i in order for n in queues[r][i][: takes[r][i]]]
            for r in range(self.args.world_size)
        ]
        taken: list[Sample] = []
        for i in order:
            k = takes[self.args.rank][i]
            taken += self.queues[i][:k]
            del self.queues[i][:k]
        return taken, layout(rank_lengths, self.tokens_per_micro)

    def _collate(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        """One packed row of ``samples``; an empty micro-batch (one pad token) for none."""
        d = self.args.dcfg
        if not samples:
            dtype = torch.uint8 if d.pixels_uint8 else torch.float32
            return empty_batch(self.args.ctx.st.pad, self.args.ctx.image_size, dtype)
        return collate_samples(
            samples,
            self.args.ctx,
            d.pad_to_multiple_of,
            d.pixels_uint8,
            pack=True,
            row_len=self.tokens_per_micro,
        )

    def finish(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """As :meth:`FixedStepLoader.finish`."""
        return finish_pixels(batch, self.args.ctx.mean, self.args.ctx.std)

    def counters(self) -> dict[str, int]:
        return dict(sorted({**self.worker_steps.counters(), **self.dropped}.items()))

    def _built(self) -> list[list[str]]:
        """Source names of this rank's supply of the steps built but not trained."""
        names = [src.name for src in self.args.recipe.sources]
        return [
            [names[i] for i in self._supply(k)[self.args.rank]]
            for k in range(self.step, self.worker_steps.pulled)
        ]

    def state_dict(self) -> dict:
        sd = self.worker_steps.state_dict(self.step)
        sd.update(
            tokens_per_micro=self.tokens_per_micro,
            pulled=self.worker_steps.pulled,
            built=self._built(),
            dropped=dict(self.dropped),
            queues={src.name: list(q) for src, q in zip(self.args.recipe.sources, self.queues)},
        )
        return sd

    def can_resume_exactly(self, sd: dict) -> bool:
        return self.worker_steps.can_resume_exactly(sd) and "pulled" in sd

    def load_resharded(self, sds: list[dict]) -> None:
        """As :meth:`WorkerSteps.load_resharded`; the samples the old ranks had built but not
        trained on (their queues) are not carried: counted on rank 0 as
        ``skipped/<source>/reshard_queued``."""
        self.worker_steps.load_resharded(sds)
        self.step = self.worker_steps.pulled
        self.queues = [[] for _ in self.args.recipe.sources]
        self.dropped = Counter()
        if self.args.rank == 0:
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
        self.worker_steps.load_state_dict(sd, int(sd["pulled"]))
        self.step = int(sd["step"])
        self.dropped = Counter(sd.get("dropped", {}))
        by_name = {src.name: i for i, src in enumerate(self.args.recipe.sources)}
        self.queues = [[] for _ in self.args.recipe.sources]
        for name, q in sd["queues"].items():
            if name in by_name:
                self.queues[by_name[name]] = list(q)
        if "built" in sd:
            same = sd["built"] == self._built()
        else:  # written before the plan was recorded: the source list decides
            same = list(sd["sources"]) == [src.name for src in self.args.recipe.sources]
        if any(self.exchange(not same)):  # one rank's queues alone cannot be kept
            self._rebuild_queued(sd)

    def _rebuild_queued(self, sd: dict) -> None:
        lost = Counter({name: len(q) for name, q in sd["queues"].items() if q})
        for name, n in lost.items():
            self.dropped[f"skipped/{name}/recipe_change"] += n
        if self.args.rank == 0:
            logger.warning(
                "the data recipe changed since the checkpoint: steps %d-%d are rebuilt under "
                "the new one, the samples queued for them skipped (%s)",
                self.step,
                self.worker_steps.pulled - 1,
                dict(lost),
            )
        self.worker_steps.restart_at(self.step)
        self.queues = [[] for _ in self.args.recipe.sources]

    def close(self) -> None:
        """Stop the worker processes (see :meth:`WorkerSteps.close`)."""
        self.worker_steps.close()
