"""Tar shard I/O: the one tar reader (local and streamed shards) and the one writer, webdataset's.

::

    URL / pipe: --wds.gopen--\
    local path ---open()------> webdataset tar_file_iterator -> group_by_keys -> Record
    local path --tar headers--> index [(key, header offset, members)] --seek--^  (one record)

Every member's bytes come through webdataset's tar iteration and key grouping (``KEY.EXT``,
WebDataset's own key rule), local or streamed. Local shards are also indexed from their headers
alone (webdataset has no random-access reader), so their records can be visited in a seeded
order and a resume seeks straight to its record: reading one record is the same iteration
started at its first header. Members stay raw bytes: webdataset's decoders are never applied;
``janus_train.data.preprocess`` decodes the extensions it knows and nothing is unpickled.

Shards are written by webdataset's ``TarWriter`` / ``ShardWriter`` with ``WRITER_OPTIONS``:
bytes only (its encoders, which would pickle ``.pyd``, are off), fixed owner, mode and mtime, so
the same records give byte-identical tar files.
"""

from __future__ import annotations

import itertools
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from janus_train.data.recipe import is_remote

WRITER_OPTIONS = dict(encoder=False, user="root", group="root", mode=0o644, mtime=0)
"""``wds.TarWriter`` / ``wds.ShardWriter`` options of every shard the project writes."""


class ShardError(Exception):
    """A shard could not be opened or read (counted as a failure of its source)."""

    def __init__(self, msg: str, reason: str = "shard_error"):
        super().__init__(msg)
        self.reason = reason


@dataclass
class Record:
    key: str
    url: str
    members: dict[str, bytes]
    """lower-cased extension (after the first dot of the basename) -> raw bytes."""


def is_member(name: str) -> bool:
    """A tar member that belongs to a record: ``KEY.EXT`` whose basename is not hidden (``.x``,
    which webdataset's rule would key as its directory) or metadata (``_x``, ``__x__``)."""
    key, _ = base_plus_ext(name)
    base = os.path.basename(key) if key is not None else ""
    return base != "" and not base.startswith(("_", "."))


def open_shard(url: str) -> BinaryIO:
    """Local paths as files; URLs and ``pipe:`` commands through ``webdataset.gopen``."""
    try:
        if not is_remote(url):
            return open(url, "rb")  # noqa: SIM115  # closed by the caller
        import webdataset as wds

        return wds.gopen(url, "rb")
    except Exception as e:  # noqa: BLE001
        raise ShardError(f"cannot open {url!r}: {e}") from None


def iter_records(stream: BinaryIO, url: str, members: int | None = None) -> Iterator[Record]:
    """Records of a tar stream from its current position (the first ``members`` members only,
    when given). A cut or unreadable stream raises ShardError after the complete records before
    it; a record that the cut reached is dropped."""
    files = tar_file_iterator(stream, skip_meta=None, select_files=is_member)
    if members is not None:
        files = itertools.islice(files, members)
    try:
        for s in group_by_keys({**f, "__url__": url} for f in files):
            yield Record(s["__key__"], url, {k: v for k, v in s.items() if not k.startswith("__")})
    except ValueError as e:  # webdataset's grouping: a member name twice in one record
        raise ShardError(f"bad tar {url!r}: {e}") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"truncated tar {url!r}: {e}", "truncated_tar") from None


def iter_shard(url: str) -> Iterator[Record]:
    """Every record of one shard, in tar order (local or streamed)."""
    stream = open_shard(url)
    try:
        yield from iter_records(stream, url)
    finally:
        try:
            stream.close()
        except Exception:  # noqa: BLE001  # a pipe's exit status after an early stop
            pass


IndexEntry = tuple[str, int, int]
"""``(key, offset of the record's first header, number of members)``."""


def index_tar(path: str) -> tuple[list[IndexEntry], bool]:
    """The records of a local tar from its headers alone (no member data is read).

    Returns ``(entries, truncated)``; a record cut by a truncated file is dropped and
    ``truncated`` set. Members are selected and grouped as ``iter_records`` does, so reading
    ``members`` members from ``offset`` gives exactly the record.
    """
    size = os.path.getsize(path)
    entries: list[list] = []
    truncated = False
    try:
        with tarfile.open(path, mode="r:") as tf:
            while True:
                try:
                    ti = tf.next()
                except (tarfile.TarError, OSError, EOFError):
                    truncated = True
                    break
                if ti is None:
                    break
                if not ti.isreg() or not is_member(ti.name):
                    continue
                if ti.offset_data + ti.size > size:
                    truncated = True
                    break
                key = base_plus_ext(ti.name)[0]
                if entries and entries[-1][0] == key:
                    entries[-1][2] += 1
                else:
                    entries.append([key, ti.offset, 1])
    except (tarfile.TarError, OSError) as e:
        if not entries:
            raise ShardError(f"cannot read tar {path!r}: {e}") from None
        truncated = True
    if truncated and entries:
        entries.pop()  # the last record may be missing members
    return [tuple(e) for e in entries], truncated


def read_record(f: BinaryIO, url: str, entry: IndexEntry) -> Record:
    """One indexed record of an open local tar."""
    key, offset, n = entry
    f.seek(offset)
    recs = list(iter_records(f, url, n))
    if len(recs) != 1 or recs[0].key != key:
        raise ShardError(f"{url!r} changed since it was indexed (record {key!r})")
    return recs[0]


def write_tar(path: str | Path, records: list[tuple[str, dict[str, bytes]]]) -> str:
    """Write ``[(key, {ext: bytes})]`` as one WebDataset tar (members ``key.ext``)."""
    import webdataset as wds

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), **WRITER_OPTIONS) as sink:
        for key, members in records:
            sink.write({"__key__": key, **members})
    return str(path)
