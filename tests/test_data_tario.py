"""The one tar reader and writer (janus_train.data.tario): records come back byte for byte,
local (indexed, any order) and streamed alike; members stay raw bytes and nothing is unpickled;
cut tars give their complete records and a ShardError; the writer stores bytes only and is
deterministic."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import pytest

from janus_train.data.tario import (
    ShardError,
    index_tar,
    iter_shard,
    read_record,
    write_tar,
)

PWNED = "/tmp/janus_tario_pwned"


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


def _records():
    evil = pickle.dumps(_Evil())
    return [
        ("000000", {"jpg": b"\xff\xd8jpeg", "txt": b"a red circle", "json": b'{"a": 1}'}),
        ("000001", {"txt": b"text only"}),
        ("dir.v1/000002", {"seg.png": b"\x89PNG", "pyd": evil, "pth": evil, "cls": b"3"}),
        ("000003", {"npy": b"\x93NUMPY not really", "TXT": b"upper"}),
    ]


def _as_read(records):
    """The records as the reader must return them: extensions lower-cased."""
    return [(k, {e.lower(): v for e, v in m.items()}) for k, m in records]


def test_written_records_read_back_identically_local_streamed_and_indexed(tmp_path):
    if os.path.exists(PWNED):
        os.remove(PWNED)
    path = write_tar(tmp_path / "a.tar", _records())
    want = _as_read(_records())
    assert [(r.key, r.members) for r in iter_shard(path)] == want
    assert [(r.key, r.members) for r in iter_shard(f"pipe:cat {path}")] == want
    entries, truncated = index_tar(path)
    assert not truncated and [e[0] for e in entries] == [k for k, _ in want]
    with open(path, "rb") as f:  # random access, in reverse
        got = [read_record(f, path, e) for e in reversed(entries)]
    assert [(r.key, r.members) for r in got] == want[::-1]
    # every member stayed bytes: no webdataset decoder ran, the pickles were never loaded
    assert all(type(v) is bytes for r in got for v in r.members.values())
    assert not os.path.exists(PWNED)


def test_odd_members_are_skipped_the_same_way_by_index_and_stream(tmp_path):
    # a tar webdataset's writer would not produce (directory, metadata, hidden files), so built
    # with tarfile here on purpose
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as tf:

        def add(name, data=b"x"):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))

        d = tarfile.TarInfo("sub")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        add("__meta__", b"m")
        add("sub/a.jpg", b"1")
        add("sub/._a.jpg", b"resource fork")
        add("sub/a.txt", b"2")
        add("sub/_index.json", b"{}")
        add("noext", b"?")
        add("b.txt", b"3")
        add("b.txt", b"a second copy")  # kept once, the first, by both paths
    want = [("sub/a", {"jpg": b"1", "txt": b"2"}), ("b", {"txt": b"3"})]
    assert [(r.key, r.members) for r in iter_shard(str(path))] == want
    entries, _ = index_tar(str(path))
    with open(path, "rb") as f:
        assert [(r.key, r.members) for r in (read_record(f, "p", e) for e in entries)] == want


def test_a_cut_tar_gives_its_complete_records_then_a_shard_error(tmp_path):
    recs = [(f"{i:06d}", {"json": b"{}", "txt": b"t" * 700}) for i in range(4)]
    path = write_tar(tmp_path / "c.tar", recs)
    with tarfile.open(path) as tf:
        last = tf.getmembers()[-1]  # tarfile only to find where to cut: the last record's txt
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: last.offset_data + 100])
    got = []
    with pytest.raises(ShardError) as e:
        for r in iter_shard(path):
            got.append(r.key)
    assert e.value.reason == "truncated_tar" and got == ["000000", "000001", "000002"]
    entries, truncated = index_tar(path)
    assert truncated and [k for k, _ in entries] == ["000000", "000001", "000002"]


def test_unreadable_shards_are_shard_errors(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(ShardError):
        list(iter_shard(str(tmp_path / "junk.tar")))
    with pytest.raises(ShardError):
        index_tar(str(tmp_path / "junk.tar"))
    with pytest.raises(ShardError, match="cannot open"):
        list(iter_shard(str(tmp_path / "missing.tar")))


def test_the_writer_stores_bytes_only_and_is_deterministic(tmp_path):
    a = write_tar(tmp_path / "a.tar", _records())
    b = write_tar(tmp_path / "b.tar", _records())
    assert Path(a).read_bytes() == Path(b).read_bytes()
    with tarfile.open(a) as tf:
        m = tf.getmember("000000.txt")
        assert (m.mtime, m.mode, m.uname) == (0, 0o644, "root")
    # webdataset's encoders are off: an object for .pyd is refused, never pickled
    with pytest.raises(ValueError):
        write_tar(tmp_path / "x.tar", [("k", {"pyd": {"a": 1}})])
    with pytest.raises(ValueError):
        write_tar(tmp_path / "y.tar", [("k", {"txt": "a str"})])
