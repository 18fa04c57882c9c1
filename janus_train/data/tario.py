"""Tar shard I/O: the one tar reader (local and streamed shards) and the one writer, webdataset's.

::

    URL / pipe: --wds.gopen--> webdataset tar_file_iterator --\
    local path ---open()------^                                 > group_by_keys -> Record
    local path --tar headers only: (offset, size) per member --/   (index; records read by seek)

One rule says what a record is, webdataset's: its key split (``KEY.EXT``) and its grouping of
consecutive members (``group_by_keys``), for streamed shards over its tar iteration and for local
shards over a walk of the headers alone, which gives each member's offset so records can be
visited in a seeded order and a resume seeks straight to its record (webdataset has no
random-access reader; reading each record through its tar iteration instead costs ~10x a plain
read, measured by benchmarks/bench_tar.py). Members stay raw bytes: webdataset's decoders are
never applied; ``janus_train.data.preprocess`` decodes the extensions it knows and nothing is
unpickled.

Shards are written by webdataset's ``TarWriter`` / ``ShardWriter`` with ``WRITER_OPTIONS``:
bytes only (its encoders, which would pickle ``.pyd``, are off), fixed owner, mode and mtime, so
the same records give byte-identical tar files.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from webdataset.handlers import ignore_and_continue
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://")
"""Shard URLs streamed through webdataset's ``gopen`` (no index, no stat); anything else is a
local path."""


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


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


def check_tar(path: str, where: str) -> None:
    """``ValueError`` naming ``path`` (``where``: what lists it) unless it is a file whose first
    header reads as a tar's (one header read, no member)."""
    try:
        ok = tarfile.is_tarfile(path)
    except OSError as e:
        raise ValueError(f"{where}: shard {path!r} cannot be read ({e.strerror})") from None
    if not ok:
        raise ValueError(f"{where}: shard {path!r} is not a tar file")


def open_shard(url: str) -> BinaryIO:
    """Local paths as files; URLs and ``pipe:`` commands through ``webdataset.gopen``."""
    try:
        if not is_remote(url):
            return open(url, "rb")  # noqa: SIM115  # closed by the caller
        import webdataset as wds

        return wds.gopen(url, "rb")
    except Exception as e:  # noqa: BLE001
        raise ShardError(f"cannot open {url!r}: {e}") from None


def _group(files: Iterator[dict], url: str) -> Iterator[dict]:
    """webdataset's grouping of ``{"fname", "data"}`` into ``{"__key__", ext: data}``; a member
    name repeated inside one record keeps its first copy (``ignore_and_continue``)."""
    return group_by_keys(({**f, "__url__": url} for f in files), handler=ignore_and_continue)


def _members(sample: dict) -> dict:
    return {k: v for k, v in sample.items() if not k.startswith("__")}


def iter_records(stream: BinaryIO, url: str) -> Iterator[Record]:
    """Records of a tar stream. A cut or unreadable stream raises ShardError after the complete
    records before it; the record that the cut reached is dropped."""
    files = tar_file_iterator(stream, skip_meta=None, select_files=is_member)
    try:
        for s in _group(files, url):
            yield Record(s["__key__"], url, _members(s))
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


IndexEntry = tuple[str, tuple[tuple[str, int, int], ...]]
"""``(key, ((ext, data offset, size), ...))``: one record of a local tar."""


def _headers(tf: tarfile.TarFile, size: int, cut: list[bool]) -> Iterator[dict]:
    """The members of a local tar as webdataset's file dicts with ``(offset, size)`` for data
    (the same selection as ``iter_records``); ``cut`` gets True when the file ends inside one."""
    while True:
        try:
            ti = tf.next()
        except (tarfile.TarError, OSError, EOFError):
            cut.append(True)
            return
        if ti is None:
            return
        if not ti.isreg() or not is_member(ti.name):
            continue
        if ti.offset_data + ti.size > size:
            cut.append(True)
            return
        yield {"fname": ti.name, "data": (ti.offset_data, ti.size)}


def index_tar(path: str) -> tuple[list[IndexEntry], bool]:
    """The records of a local tar from its headers alone (no member data is read).

    Returns ``(entries, truncated)``; a record cut by a truncated file is dropped and
    ``truncated`` set."""
    size = os.path.getsize(path)
    entries: list[IndexEntry] = []
    cut: list[bool] = []
    try:
        with tarfile.open(path, mode="r:") as tf:
            for s in _group(_headers(tf, size, cut), path):
                entries.append((s["__key__"], tuple((e, *d) for e, d in _members(s).items())))
    except (tarfile.TarError, OSError) as e:
        if not entries:
            raise ShardError(f"cannot read tar {path!r}: {e}") from None
        cut.append(True)
    if cut and entries:
        entries.pop()  # the last record may be missing members
    return entries, bool(cut)


def read_record(f: BinaryIO, url: str, entry: IndexEntry) -> Record:
    """One indexed record of an open local tar."""
    key, members = entry
    data: dict[str, bytes] = {}
    for ext, offset, size in members:
        f.seek(offset)
        data[ext] = f.read(size)
        if len(data[ext]) != size:
            raise ShardError(f"truncated tar {url!r} (record {key!r})", "truncated_tar")
    return Record(key, url, data)


def write_tar(path: str | Path, records: list[tuple[str, dict[str, bytes]]]) -> str:
    """Write ``[(key, {ext: bytes})]`` as one WebDataset tar (members ``key.ext``)."""
    import webdataset as wds

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), **WRITER_OPTIONS) as sink:
        for key, members in records:
            sink.write({"__key__": key, **members})
    return str(path)
