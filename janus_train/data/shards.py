"""Shard reading and splitting: infinite, seeded, resumable record streams per source.

::

    shard URLs --(epoch permutation, seed)--> this consumer's shards --> records (key -> bytes)

A *consumer* is one dataloader worker of one rank (``consumer = rank * workers + worker``).
With at least as many shards as consumers, each epoch's shard permutation is dealt round-robin
(``perm[c::C]``), so no two consumers read the same shard in an epoch. With fewer shards, every
consumer walks all shards and keeps every C-th record (``counter % C == c``): still disjoint,
never a hang; the skipped records are not decoded. Local shards are indexed by their tar headers
(no data read) and their records visited in a seeded permutation per epoch, so resume seeks
straight to the next record; remote shards (``pipe:``, URLs) stream in order and resume skips
records without decoding them. The whole position is ``(epoch, cursor, offset, counter)``.
Tar reading itself is ``janus_train.data.tario`` (webdataset's tar iteration).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from janus_train.data.tario import Record, ShardError, index_tar, is_remote, iter_shard, read_record

logger = logging.getLogger(__name__)


def stable_seed(*parts: object) -> int:
    """A process-independent 63-bit seed from any printable parts (``hash()`` is salted)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def shard_name(url: str) -> str:
    """The part of a shard's URL that seeds its randomness: its last two path components
    (``caption/caption-00003.tar``), so a run's data order and per-sample choices do not
    depend on where the shards are mounted (a resume after moving them stays exact)."""
    return "/".join(url.rstrip("/").rsplit("/", 2)[-2:])


class ShardCursor:
    """Records of one shard in this epoch's order, starting at position ``start``."""

    _index_cache: OrderedDict[str, tuple[list, bool]] = OrderedDict()

    def __init__(self, url: str, order_seed: int | None):
        self.url = url
        self.truncated = False
        self.remote = is_remote(url)
        if self.remote:
            self.order = None
            return
        if not os.path.isfile(url):
            raise ShardError(f"shard {url!r} does not exist")
        cache = ShardCursor._index_cache
        if url in cache:
            cache.move_to_end(url)
        else:
            cache[url] = index_tar(url)
            while len(cache) > 64:
                cache.popitem(last=False)
        self.records, self.truncated = cache[url]
        n = len(self.records)
        if order_seed is None:
            self.order = np.arange(n)
        else:
            self.order = np.random.default_rng(order_seed).permutation(n)

    def iterate(self, start: int, keep) -> Iterator[tuple[int, Record | None]]:
        """Yield ``(position, record)`` from ``start``; ``record`` is None where ``keep(pos)``
        is false (those records are neither read nor decoded)."""
        if self.remote:
            for pos, rec in enumerate(iter_shard(self.url)):
                if pos < start:
                    continue
                yield pos, (rec if keep(pos) else None)
            return
        with open(self.url, "rb") as f:
            for pos in range(start, len(self.order)):
                if not keep(pos):
                    yield pos, None
                    continue
                yield pos, read_record(f, self.url, self.records[int(self.order[pos])])


class RecordStream:
    """The infinite record stream of one source for one consumer; position is resumable.

    ``state()`` is the position of the *next* record; ``next()`` returns it and advances.
    Failures to open/read a shard are reported through ``on_shard_error(url, reason, detail)``.
    """

    def __init__(
        self,
        name: str,
        shards: list[str],
        consumer: int,
        n_consumers: int,
        seed: int,
        shuffle: bool = True,
        state: dict | None = None,
        on_shard_error=None,
    ):
        self.name, self.shards = name, list(shards)
        self.c, self.C, self.seed, self.shuffle = consumer, n_consumers, seed, shuffle
        self.stride = len(self.shards) < n_consumers
        st = state or {}
        self.epoch = int(st.get("epoch", 0))
        self.cursor = int(st.get("cursor", 0))
        self.offset = int(st.get("offset", 0))
        self.counter = int(st.get("counter", 0))
        # A resume on another number of consumers (janus_train.data.reshard): in its first
        # epoch, the shards still unread with the first unread position of each.
        self.carry: list[list] | None = st.get("carry")
        self.carry_epoch = self.epoch
        self.on_shard_error = on_shard_error or (lambda url, reason, detail: None)
        self._it: Iterator | None = None
        self._epoch_records = 0

    def state(self) -> dict:
        st = {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "offset": self.offset,
            "counter": self.counter,
        }
        if self._in_carry(self.epoch):
            st["carry"] = self.carry
        return st

    def _in_carry(self, epoch: int) -> bool:
        return self.carry is not None and epoch == self.carry_epoch

    def _stride(self, epoch: int) -> bool:
        n = len(self.carry) if self._in_carry(epoch) else len(self.shards)
        return n < self.C

    def epoch_shards(self, epoch: int) -> list[str]:
        if self._in_carry(epoch):
            urls = [u for u, _ in self.carry]
            return urls if self._stride(epoch) else urls[self.c :: self.C]
        n = len(self.shards)
        perm = (
            np.random.default_rng(stable_seed(self.seed, self.name, epoch)).permutation(n)
            if self.shuffle
            else np.arange(n)
        )
        idx = perm if self.stride else perm[self.c :: self.C]
        return [self.shards[int(i)] for i in idx]

    def _open(self) -> None:
        shards = self.epoch_shards(self.epoch)
        empty_epochs = 0
        while True:
            if self.cursor >= len(shards):
                if self._epoch_records == 0 and self.cursor > 0:
                    empty_epochs += 1
                    if empty_epochs > 1:
                        raise RuntimeError(
                            f"source {self.name!r}: an entire epoch yielded no records "
                            f"(shards {shards[:3]}...)"
                        )
                self.epoch, self.cursor, self.offset, self._epoch_records = self.epoch + 1, 0, 0, 0
                shards = self.epoch_shards(self.epoch)
                continue
            url = shards[self.cursor]
            seed = (
                stable_seed(self.seed, self.name, self.epoch, shard_name(url))
                if self.shuffle
                else None
            )
            try:
                sc = ShardCursor(url, seed)
            except ShardError as e:
                self.on_shard_error(url, "shard_error", str(e))
                self.cursor, self.offset = self.cursor + 1, 0
                continue
            if sc.truncated and self.offset == 0:
                self.on_shard_error(url, "truncated_tar", f"truncated tar {url!r}")
            if self._in_carry(self.epoch) and self.offset == 0:
                # counter counts the carry's positions from each start: base + p stays the
                # index among the positions still unread, whatever the starts
                self.offset = int(dict(map(tuple, self.carry)).get(url, 0))
            base = self.counter - self.offset  # counter value at position 0 of this shard
            keep = (
                (lambda p, base=base: (base + p) % self.C == self.c)
                if self._stride(self.epoch)
                else (lambda p: True)
            )
            self._it = sc.iterate(self.offset, keep)
            self._url = url
            return

    def next(self) -> Record:
        while True:
            if self._it is None:
                self._open()
            try:
                pos, rec = next(self._it)
            except StopIteration:
                self._it = None
                self.cursor, self.offset = self.cursor + 1, 0
                continue
            except ShardError as e:
                self._it = None
                self.on_shard_error(self._url, e.reason, str(e))
                self.cursor, self.offset = self.cursor + 1, 0
                continue
            self.offset = pos + 1
            self.counter += 1
            self._epoch_records += 1
            if rec is not None:
                return rec
