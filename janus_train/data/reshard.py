"""Carry a loader position over to another number of consumers (ranks x workers).

An exact resume needs the consumer layout of the run that saved (``data.shards``: each consumer
reads its own shards, or its own residue of records). With another layout, each source restarts
*inside its current epoch* from what every old consumer read:

    old consumers' positions --> per shard: first position after everything read (high water),
        positions below it nobody read (skipped) --> ``carry``: the epoch's unfinished shards
        with their start positions, dealt to the new consumers like a normal epoch

No record is read twice. Skipped records are counted (``skipped/<source>/reshard``): none when
the old run dealt whole shards (each shard's reading is a prefix), at most a few per shard when
consumers strided over few shards; the rest of an epoch that some old consumer had not finished
while another had moved on is skipped too; a record whose samples were partly used is not
continued (``skipped/<source>/reshard_partial``). Remote shards cannot be measured: a source with
remote shards whose reading was not a prefix restarts at its next epoch instead.
"""

from __future__ import annotations

import logging
from collections import Counter

from janus_train.data.shards import RecordStream
from janus_train.data.tario import index_tar, is_remote

logger = logging.getLogger(__name__)


class _Unknown(Exception):
    """A remote shard's length is needed and cannot be known without reading it."""


def _length(url: str, cache: dict) -> int:
    if url not in cache:
        if is_remote(url):
            raise _Unknown(url)
        try:
            cache[url] = len(index_tar(url)[0])
        except Exception:  # noqa: BLE001  # unreadable: counted as empty (the stream skips it)
            cache[url] = 0
    return cache[url]


def _count_residue(a: int, b: int, base: int, c: int, C: int) -> int:
    """Positions p in [a, b) with (base + p) % C == c."""
    if b <= a:
        return 0
    first = a + (c - base - a) % C
    return 0 if first >= b else (b - 1 - first) // C + 1


class _Tally:
    """What the old consumers of the current epoch read, per shard."""

    def __init__(self) -> None:
        self.high: dict[str, int] = {}  # first position after everything read
        self.read: Counter = Counter()  # positions read below it (excluding the carried start)
        self.done: set[str] = set()  # shards dealt whole and passed completely
        self.starts: dict[str, int] = {}  # carried start position


def _carry_of(rs: RecordStream) -> dict[str, int]:
    return dict(map(tuple, rs.carry)) if rs._in_carry(rs.epoch) else {}


def _count_older_epoch(rs: RecordStream, c: int, C: int, lengths: dict, counts: Counter) -> None:
    """The rest of this consumer's older epoch is not continued: count it as skipped."""
    L = rs.epoch_shards(rs.epoch)
    carry, stride = _carry_of(rs), rs._stride(rs.epoch)
    for i in range(rs.cursor, len(L)):
        a = rs.offset if i == rs.cursor else carry.get(L[i], 0)
        n = _length(L[i], lengths)
        counts["reshard"] += (
            _count_residue(a, n, rs.counter - rs.offset if i == rs.cursor else 0, c, C)
            if stride
            else max(0, n - a)
        )


def _tally_current_epoch(
    rs: RecordStream, c: int, C: int, sub: int, lengths: dict, counts: Counter, t: _Tally
) -> None:
    """Shards before the cursor were passed completely, the cursor's up to its offset (and the
    record whose samples were partly used)."""
    L = rs.epoch_shards(rs.epoch)
    carry, stride = _carry_of(rs), rs._stride(rs.epoch)
    opened = rs.counter - rs.offset  # + the start: counter when the cursor's shard opened
    for i in range(min(rs.cursor, len(L) - 1), -1, -1):
        url = L[i]
        s = carry.get(url, 0)
        t.starts[url] = s
        if i == rs.cursor:
            base = rs.counter - rs.offset
            end = rs.offset
            if sub:  # the consumer's next record gave some of its samples
                end += (c - base - end) % C if stride else 0
                end += 1
                counts["reshard_partial"] += 1
            opened += s
        else:
            if not stride:
                t.done.add(url)
                continue
            end = _length(url, lengths)
            opened -= end - s
            base = opened - s
        t.high[url] = max(t.high.get(url, 0), end)
        t.read[url] += _count_residue(s, end, base, c, C) if stride else end - s


def _carry_out(order: list[str], t: _Tally, lengths: dict, counts: Counter) -> list[list]:
    """The epoch's unfinished shards with their first unread position; unread gaps below it
    are counted as skipped."""
    out = []
    for url in order:
        if url in t.done:
            continue
        h = t.high.get(url, t.starts.get(url, 0))
        s = t.starts.get(url, 0)
        counts["reshard"] += max(0, h - s - t.read[url])
        if is_remote(url) or h < _length(url, lengths):
            out.append([url, h])
    return out


def plan_carry(
    name: str, shards: list[str], seed: int, shuffle: bool, old: list[dict | None]
) -> tuple[dict, Counter]:
    """The record-stream state every new consumer of this source starts from, and the counts
    ``{"reshard": skipped records, "reshard_partial": partly used records}``.

    ``old[c]``: old consumer ``c``'s ``SampleStream`` state (``{"rec": ..., "sub": k}``), None
    when it never read the source."""
    C = len(old)
    recs = [dict((st or {}).get("rec") or {}) for st in old]
    subs = [int((st or {}).get("sub", 0)) for st in old]
    E = max(int(r.get("epoch", 0)) for r in recs)
    streams = [
        RecordStream(name, shards, c, C, seed, shuffle=shuffle, state=recs[c] or None)
        for c in range(C)
    ]
    lengths: dict[str, int] = {}
    counts: Counter = Counter()
    try:
        t = _Tally()
        order: list[str] = []
        for c, rs in enumerate(streams):
            if rs.epoch < E:
                _count_older_epoch(rs, c, C, lengths, counts)
                continue
            if not order:
                order = (
                    [u for u, _ in rs.carry]
                    if _carry_of(rs)
                    else RecordStream(name, shards, 0, 1, seed, shuffle=shuffle).epoch_shards(E)
                )
            _tally_current_epoch(rs, c, C, subs[c], lengths, counts, t)
        carry_out = _carry_out(order, t, lengths, counts)
        state = {"epoch": E, "cursor": 0, "offset": 0, "counter": 0, "carry": carry_out}
    except _Unknown as e:
        logger.warning(
            "data source %s: remote shard %s cannot be measured: restarting the "
            "source at epoch %d (the rest of epoch %d is skipped)",
            name,
            e,
            E + 1,
            E,
        )
        state = {"epoch": E + 1, "cursor": 0, "offset": 0, "counter": 0}
        counts["reshard_rest_of_epoch"] += 1
    return state, counts
