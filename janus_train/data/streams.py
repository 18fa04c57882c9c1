"""One source's built samples for one consumer: decode and build each record, count and log
what fails, stop the run when too much of a shard or source does.

::

    RecordStream (shards split by consumer, seeded) --record_to_samples--> Sample, Sample, ...
        bad record: skipped/<source>/<reason> counted; over data.max_failure_rate: DataFailure

A stream's state (``{"rec": record position, "sub": samples of it already returned}``) is what
a loader worker saves per source; restoring it continues with the next sample.
"""

from __future__ import annotations

import logging
import random
from collections import Counter

from janus_train.batch import Sample
from janus_train.data.builders import BuildContext, record_to_samples
from janus_train.data.config import DataConfig
from janus_train.data.preprocess import BadSample
from janus_train.data.recipe import Source
from janus_train.data.shards import RecordStream, shard_name, stable_seed
from janus_train.errors import DataFailure

logger = logging.getLogger(__name__)


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
                stable_seed(
                    self.dcfg.seed, self.src.name, self.rs.epoch, shard_name(rec.url), rec.key
                )
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
