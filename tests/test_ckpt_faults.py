"""Checkpoints against storage faults, in one process with a stand-in engine that writes
DeepSpeed-named files through ``torch.save``: the manifest (checked against an independent
CRC-32), verification and fallback for each kind of damage, a load error, the sync/rename
order, a kill at each moment of that order, a full disk (injected ENOSPC, torch's wrapped
error, a real 3 MiB tmpfs where mounting is allowed) and ``train.keep_last``. The 2-rank
ZeRO-2/ZeRO-3 versions run in ``test_ckpt_dist.py``."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import types
import zlib
from pathlib import Path

import pytest
import torch

from janus_train.errors import (
    EXIT_STORAGE_FULL,
    StorageFull,
    is_storage_full,
    is_user_error,
    report_storage_full,
)
from janus_train.trainer import checkpoint as ckpt
from janus_train.trainer import ckpt_capture, ckpt_save, ckpt_writer
from janus_train.trainer.distributed import DistInfo

INFO = DistInfo(rank=0, world_size=1, local_rank=0)
MODEL = "mp_rank_00_model_states.pt"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


class TorchWriter:
    """DeepSpeed's ``TorchCheckpointEngine`` as far as a save uses it."""

    def save(self, state_dict, path):
        torch.save(state_dict, path)


class FakeEngine:
    """Writes (through its ``checkpoint_engine``, as DeepSpeed does) and reads DeepSpeed's file
    names; ``w`` stands for the weights."""

    def __init__(self, n: int = 1000):
        self.w = torch.zeros(n)
        self.fail_load: set[str] = set()
        self.checkpoint_engine = TorchWriter()

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert not save_latest
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save({"w": self.w, "client": client_state}, str(d / MODEL))
        self.checkpoint_engine.save({"exp_avg": self.w * 2}, str(d / OPTIM))

    def load_checkpoint(self, load_dir, tag, **_):
        if tag in self.fail_load:
            raise RuntimeError("PytorchStreamReader failed reading zip archive")
        d = Path(load_dir) / tag
        sd = torch.load(d / MODEL, weights_only=False)
        torch.load(d / OPTIM, weights_only=False)
        self.w = sd["w"]
        return str(d), sd["client"]


class Loader:
    """A step loader as far as a save reads it."""

    def state_dict(self):
        return {"position": 3}


def save(engine, c, step, keep_last=10, background=False):
    """A whole save; ``background``: written and committed by the threads of an async save."""
    engine.w = torch.full_like(engine.w, float(step))
    rank_state = {"rank": 0, "step": step}
    if not background:
        return ckpt_save.save_checkpoint(
            engine, c, step, {"step": step}, rank_state, INFO, keep_last
        )
    p = ckpt_save.begin_save(engine, c, step, {"step": step}, rank_state, INFO, background=True)
    return p.commit(keep_last)


ASYNC = pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])


@pytest.fixture
def two(tmp_path):
    """Checkpoints of steps 4 and 8, ``latest`` = step 8."""
    c = tmp_path / "checkpoints"
    e = FakeEngine()
    save(e, c, 4)
    save(e, c, 8)
    return c, e


def test_manifest_sizes_and_crc32_match_the_files(two):
    c, _ = two
    m = json.loads((c / "step_00000008" / "manifest.json").read_text())
    names = {MODEL, OPTIM, "trainer_state_rank0.pt"}
    assert set(m["files"]) == names and m["step"] == 8 and m["world_size"] == 1
    for name in names:
        data = (c / "step_00000008" / name).read_bytes()
        assert m["files"][name] == {"size": len(data), "crc32": zlib.crc32(data)}
    assert ckpt.verify_checkpoint(c / "step_00000008", INFO) == []


def _truncate(d):
    p = d / MODEL
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return MODEL


def _flip(d):  # same size, one byte changed: only the checksum sees it
    p = d / OPTIM
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))
    return OPTIM


def _remove_rank_file(d):
    (d / "trainer_state_rank0.pt").unlink()
    return "trainer_state_rank0.pt"


def _manifest_of_other_step(d):
    (d / "manifest.json").write_text((d.parent / "step_00000004" / "manifest.json").read_text())
    return "manifest.json"


def _no_manifest(d):
    (d / "manifest.json").unlink()
    return "manifest.json"


def _rank_missing_from_manifest(d):
    m = json.loads((d / "manifest.json").read_text())
    del m["files"]["trainer_state_rank0.pt"]
    (d / "manifest.json").write_text(json.dumps(m))
    return "trainer_state_rank0.pt"


@pytest.mark.parametrize(
    "damage",
    [
        _truncate,
        _flip,
        _remove_rank_file,
        _manifest_of_other_step,
        _no_manifest,
        _rank_missing_from_manifest,
    ],
)
def test_damaged_newest_falls_back_loudly(two, damage, caplog):
    c, e = two
    bad_file = damage(c / "step_00000008")
    with caplog.at_level(logging.WARNING, logger="janus_train.trainer.checkpoint"):
        tag, n = ckpt.select_checkpoint(c, INFO)
    assert (tag, n) == ("step_00000004", 1)
    assert ckpt.read_latest(c) == "step_00000004"
    assert not (c / "step_00000008").exists()
    assert (c / "step_00000008.bad" / "manifest.json").exists() or damage is _no_manifest
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert str(c / "step_00000008" / bad_file) in warning and "step_00000008.bad" in warning
    client, rank_states, fallbacks = ckpt.load_latest(e, c, INFO)
    assert client == {"step": 4} and rank_states == [{"rank": 0, "step": 4}] and fallbacks == 0
    assert torch.equal(e.w, torch.full_like(e.w, 4.0))
    # the next save and resume go on as usual; pruning never touches the set-aside directory
    for step in (12, 16, 20):
        save(e, c, step, keep_last=2)
    assert sorted(p.name for p in c.iterdir()) == [
        "latest",
        "step_00000008.bad",
        "step_00000016",
        "step_00000020",
    ]


def test_no_checkpoint_verifies_is_a_one_line_user_error_and_renames_nothing(two):
    c, _ = two
    _truncate(c / "step_00000008")
    _flip(c / "step_00000004")
    with pytest.raises(ValueError) as exc:
        ckpt.select_checkpoint(c, INFO)
    msg = str(exc.value)
    assert str(c) in msg and "\n" not in msg and "step_00000004" in msg
    assert is_user_error(exc.value)  # -> one line, exit 2
    assert sorted(p.name for p in c.iterdir()) == ["latest", "step_00000004", "step_00000008"]


def test_checkpoints_from_before_manifests_resume_unverified(two, caplog):
    c, e = two
    for d in ("step_00000004", "step_00000008"):
        (c / d / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="janus_train.trainer.checkpoint"):
        assert ckpt.select_checkpoint(c, INFO) == ("step_00000008", 0)
    assert "unverified" in caplog.text
    assert ckpt.load_latest(e, c, INFO)[0] == {"step": 8}


def test_latest_naming_a_missing_directory_falls_back(two):
    c, _ = two
    import shutil

    shutil.rmtree(c / "step_00000008")
    assert ckpt.select_checkpoint(c, INFO) == ("step_00000004", 1)
    assert ckpt.read_latest(c) == "step_00000004"


def test_load_error_falls_back_to_the_older_checkpoint(two):
    c, e = two
    e.fail_load = {"step_00000008"}
    assert ckpt.select_checkpoint(c, INFO) == ("step_00000008", 0)  # it verifies
    client, _, fallbacks = ckpt.load_latest(e, c, INFO)
    assert client == {"step": 4} and fallbacks == 1
    assert (c / "step_00000008.bad").is_dir() and ckpt.read_latest(c) == "step_00000004"


def test_fresh_directory_has_nothing_to_resume(tmp_path):
    assert ckpt.select_checkpoint(tmp_path / "none", INFO) == (None, 0)
    assert ckpt.load_latest(FakeEngine(), tmp_path / "none", INFO) is None


def _record_order(monkeypatch) -> list[tuple[str, str]]:
    """Every fsync, rename and replace, in order, with the path it acted on."""
    log: list[tuple[str, str]] = []
    fsync, rename, replace = os.fsync, os.rename, os.replace

    def rec_fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def rec_rename(a, b):
        log.append(("rename", str(b)))
        return rename(a, b)

    def rec_replace(a, b):
        log.append(("replace", str(b)))
        return replace(a, b)

    monkeypatch.setattr(os, "fsync", rec_fsync)
    monkeypatch.setattr(os, "rename", rec_rename)
    monkeypatch.setattr(os, "replace", rec_replace)
    return log


@ASYNC
def test_every_file_and_directory_synced_before_latest_moves(tmp_path, monkeypatch, background):
    c = tmp_path / "checkpoints"
    e = FakeEngine()
    save(e, c, 2)
    log = _record_order(monkeypatch)
    save(e, c, 4, background=background)
    tmp = str(c / ".tmp-step_00000004" / "step_00000004")
    i_rename = log.index(("rename", str(c / "step_00000004")))
    i_latest = log.index(("replace", str(c / "latest")))
    synced_before = {p for op, p in log[:i_rename] if op == "fsync"}
    for name in (MODEL, OPTIM, "trainer_state_rank0.pt", "manifest.json"):
        assert f"{tmp}/{name}" in synced_before, name
    assert tmp in synced_before  # the directory's entries
    i_manifest = log.index(("fsync", f"{tmp}/manifest.json"))
    data = [i for i, (op, p) in enumerate(log) if op == "fsync" and p.endswith(".pt")]
    assert max(data) < i_manifest  # the manifest is written last
    # the rename made durable, then `latest` (its own data synced), then the rename of latest
    between = log[i_rename + 1 : i_latest]
    assert ("fsync", str(c)) in between and ("fsync", str(c / "latest.tmp")) in between
    assert between.index(("fsync", str(c))) < between.index(("fsync", str(c / "latest.tmp")))
    assert ("fsync", str(c)) in log[i_latest + 1 :]


def test_files_written_outside_the_engine_are_synced_by_their_writer(tmp_path, monkeypatch, caplog):
    """What DeepSpeed writes on a rank outside its checkpoint engine (``open``, ``shutil``'s
    copies, a rename into place; any name) is that rank's: its writer fsyncs it with its
    own files, before leaving its file list (a hard link too). A file written where Python does
    not see it (a C++ writer) is still synced and listed, by rank 0's commit, with a warning
    naming it."""
    import shutil

    e = FakeEngine()
    real = e.save_checkpoint

    def save_checkpoint(save_dir, tag, client_state, save_latest):
        real(save_dir, tag, client_state, save_latest)
        d = Path(save_dir) / tag
        (d / "offloaded").mkdir()
        (d / "offloaded" / "a.bin").write_bytes(b"a" * 10)
        shutil.copyfile(d / "offloaded" / "a.bin", d / "b.part")
        os.replace(d / "b.part", d / "zero_pp_rank_7_b.bin")
        os.link(d / "offloaded" / "a.bin", d / "linked.bin")
        torch._C.PyTorchFileWriter(str(d / "native.pt")).write_end_of_file()

    monkeypatch.setattr(e, "save_checkpoint", save_checkpoint)
    c = tmp_path / "checkpoints"
    log = _record_order(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="janus_train.trainer.ckpt_save"):
        save(e, c, 2, background=True)
    tmp = f"{c}/.tmp-step_00000002"
    i_listed = log.index(("replace", f"{tmp}/files_rank0.json"))
    listed = json.loads((c / "step_00000002" / "manifest.json").read_text())["files"]
    for rel in ("offloaded/a.bin", "zero_pp_rank_7_b.bin", "linked.bin"):
        assert log.index(("fsync", f"{tmp}/step_00000002/{rel}")) < i_listed, rel
        assert rel in listed
    assert "b.part" not in listed
    assert log.index(("fsync", f"{tmp}/step_00000002/native.pt")) > i_listed
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "native.pt written by no rank's recorded writes; fsynced by rank 0" in warning
    assert ckpt.verify_checkpoint(c / "step_00000002", INFO) == []


class Killed(BaseException):
    """Stands for SIGKILL: nothing of the save's own error handling runs."""


def _quiet_thread_deaths(monkeypatch) -> None:
    """A thread that dies of ``Killed`` stands for the process dying there: no report."""
    import threading

    monkeypatch.setattr(threading, "excepthook", lambda args: None)


@ASYNC
@pytest.mark.parametrize(
    "moment, resumes_at",
    [
        ("data_written", 2),  # before any fsync
        ("manifest", 2),  # manifest written, directory not renamed
        ("rename", 2),  # renamed into place, `latest` not moved
        ("latest", 4),  # `latest` moved, before its directory's fsync and the prune
    ],
)
def test_kill_at_each_moment_of_the_save_order(
    tmp_path, monkeypatch, moment, resumes_at, background
):
    """Sync: the save raises ``Killed`` at the moment. Async: the writer or commit thread
    dies of it (and the process with it: nothing of the save runs after)."""
    c = tmp_path / "checkpoints"
    e = FakeEngine()
    save(e, c, 2)
    real = {"write_manifest": ckpt_save._write_manifest, "rename": os.rename, "replace": os.replace}

    def kill_after(fn, when):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            if when(*a):
                raise Killed
            return out

        return wrapped

    _quiet_thread_deaths(monkeypatch)
    if moment == "data_written":
        monkeypatch.setattr(ckpt_save, "_sync_and_sum", lambda *a: (_ for _ in ()).throw(Killed()))
    elif moment == "manifest":
        monkeypatch.setattr(
            ckpt_save, "_write_manifest", kill_after(real["write_manifest"], lambda *a: True)
        )
    elif moment == "rename":
        monkeypatch.setattr(
            os, "rename", kill_after(real["rename"], lambda a, b: "step_" in str(b))
        )
    else:
        monkeypatch.setattr(
            os, "replace", kill_after(real["replace"], lambda a, b: str(b).endswith("latest"))
        )
    if background:
        p = ckpt_save.begin_save(
            e, c, 4, {"step": 4}, {"rank": 0, "step": 4}, INFO, background=True
        )
        p.wait()
        if moment != "data_written":
            p.advance(10)  # the write phase, done: rank 0's commit thread starts
            p.wait()
        assert p.phase == ("write" if moment == "data_written" else "commit")
    else:
        with pytest.raises(Killed):
            save(e, c, 4)
    monkeypatch.undo()
    tag, n = ckpt.select_checkpoint(c, INFO)
    assert (tag, n) == (ckpt.tag_for(resumes_at), 0)
    assert not list(c.glob(".tmp-*")) and not list(c.glob("*.bad"))
    client, _, _ = ckpt.load_latest(e, c, INFO)
    assert client == {"step": resumes_at}
    save(e, c, 4)  # the save again, over whatever the kill left
    assert ckpt.select_checkpoint(c, INFO) == ("step_00000004", 0)


def test_async_save_writes_the_state_of_its_step(tmp_path, monkeypatch):
    """The loop changes the weights in place and the loader moves on while the writer thread
    is held: the files hold the snapshot, ``latest`` moves only after the commit thread."""
    import threading

    c = tmp_path / "checkpoints"
    e = FakeEngine()
    save(e, c, 2)
    go, real_save = threading.Event(), torch.save

    def held(obj, f, *a, **k):
        assert go.wait(10)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(e.checkpoint_engine, "save", held)
    e.w = torch.full_like(e.w, 4.0)
    rank_state = {"loader": {"position": [4]}}
    p = ckpt_save.begin_save(e, c, 4, {"step": 4}, rank_state, INFO, background=True)
    e.w.fill_(99.0)  # the next optimizer step, in place
    rank_state["loader"]["position"].append(5)
    assert not p.ready and p.phase == "write"
    assert ckpt.read_latest(c) == "step_00000002" and not (c / "step_00000004").exists()
    go.set()
    assert p.advance(10) is False and p.phase == "commit"  # rank 0's commit thread runs
    p.wait()
    assert ckpt.read_latest(c) == "step_00000004"  # the thread moved it
    assert p.advance(10) is True and p.phase == "done"
    monkeypatch.undo()
    assert ckpt.select_checkpoint(c, INFO) == ("step_00000004", 0)
    client, rank_states, _ = ckpt.load_latest(e, c, INFO)
    assert torch.equal(e.w, torch.full_like(e.w, 4.0)) and client == {"step": 4}
    assert rank_states == [{"loader": {"position": [4]}}]


def test_checkpointer_flags_drive_the_phases(tmp_path, monkeypatch):
    """The loop's view: ``flags`` (ready, failed) go into the step's all-reduce; ``advance``
    moves a save on one phase; a failure of rank 0's commit thread is flagged and raised."""
    from janus_train.trainer.state import Checkpointer, TrainState

    c = tmp_path / "checkpoints"
    e = FakeEngine()
    saver = Checkpointer(e, c, INFO, keep_last=10, background=True)
    assert saver.flags() == (1.0, 0.0)
    saver.save(TrainState(step=2), Loader())
    saver.pending.wait()
    assert saver.flags() == (1.0, 0.0) and saver.pending.phase == "write"
    saver.advance(none_failed=True)  # gathers the sums; rank 0's commit thread starts
    saver.pending.wait()
    assert saver.flags() == (1.0, 0.0) and saver.pending.phase == "commit"
    saver.advance(none_failed=True)
    assert saver.pending is None and ckpt.read_latest(c) == "step_00000002"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_save, "_write_manifest", full)
    saver.save(TrainState(step=4), Loader())
    saver.pending.wait()
    saver.advance(none_failed=True)
    saver.pending.wait()
    assert saver.flags() == (1.0, 1.0)
    with pytest.raises(StorageFull, match="step_00000002 is still the latest"):
        saver.advance(none_failed=False)
    assert saver.pending is None and saver.commit() is None
    assert ckpt.read_latest(c) == "step_00000002" and not list(c.glob(".tmp-*"))
    assert _running_jobs() == []  # waited for on the way


def _running_jobs() -> list[str]:
    return [j.tag for j in ckpt_writer.PENDING if not j.done.is_set()]


def test_a_save_runs_no_collective_and_carries_the_pending_commits_agreement(tmp_path, monkeypatch):
    """An asynchronous save runs no collective of ours (the Checkpointer cleared ``.tmp-``
    once, in one barrier, when made). A save that finds the one before down to the agreement on
    rank 0's commit carries it: rank 0's writer runs that commit first, and the new save's
    write-phase flags settle both. When that commit failed, rank 0 flags the new save failed
    (writing none of it), and the agreement raises the commit's error on every rank (one
    all-reduce: the prior's, then the gather of its message), the new save's directory
    removed and ``latest`` unchanged."""
    from janus_train.trainer.state import Checkpointer, TrainState

    calls, reduce = [], ckpt_save.all_reduce_sum
    monkeypatch.setattr(ckpt_save, "all_reduce_sum", lambda t: calls.append("reduce") or reduce(t))
    monkeypatch.setattr(ckpt_save, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(ckpt, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(ckpt_save, "all_gather_objects", lambda o: calls.append("gather") or [o])
    c = tmp_path / "checkpoints"
    (c / ".tmp-step_00000002" / "step_00000002").mkdir(parents=True)
    (c / ".tmp-step_00000002" / "step_00000002" / "zero_pp_rank_3_stale.pt").write_bytes(b"x")
    saver = Checkpointer(FakeEngine(), c, INFO, keep_last=10, background=True)
    assert calls == ["barrier"] and not list(c.glob(".tmp-*"))  # an earlier run's leftovers
    calls.clear()
    saver.save(TrainState(step=2), Loader())
    assert calls == []
    saver.pending.wait()
    saver.advance(none_failed=True)  # rank 0's commit job starts
    assert saver.pending.phase == "commit" and calls == []
    saver.save(TrainState(step=4), Loader())
    assert calls == [] and saver.pending.tag == "step_00000004"
    assert saver.pending.prior is not None and saver.pending.prior.tag == "step_00000002"
    saver.pending.wait()  # rank 0's thread: the commit of step 2, then the writes of step 4
    assert ckpt.read_latest(c) == "step_00000002" and saver.flags() == (1.0, 0.0)
    assert (
        "zero_pp_rank_3_stale.pt"
        not in json.loads((c / "step_00000002" / "manifest.json").read_text())["files"]
    )
    saver.advance(none_failed=True)  # settles both; step 4's commit starts
    assert calls == [] and saver.pending.prior is None and saver.pending.phase == "commit"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_save, "_write_manifest", full)
    saver.pending.wait()
    assert ckpt.read_latest(c) == "step_00000002"  # step 4's commit failed in the thread
    saver.save(TrainState(step=6), Loader())  # carries it: still no collective
    assert calls == []
    saver.pending.wait()
    assert saver.flags() == (1.0, 1.0)  # rank 0 wrote nothing of step 6
    assert not (c / ".tmp-step_00000006" / "step_00000006" / "trainer_state_rank0.pt").exists()
    with pytest.raises(StorageFull, match="step_00000002 is still the latest"):
        saver.advance(none_failed=False)
    assert calls == ["reduce", "gather"] and saver.pending is None
    assert ckpt.read_latest(c) == "step_00000002" and not list(c.glob(".tmp-*"))
    assert _running_jobs() == []


@pytest.mark.parametrize("phase", ["write", "commit", "failed"])
def test_an_error_exit_commits_a_written_save_without_collectives(tmp_path, monkeypatch, phase):
    """``Checkpointer.close`` (every exit of the loop): a save whose files every rank has
    synced is committed by rank 0 alone; one whose writer failed never counts."""
    from janus_train.trainer.state import Checkpointer, TrainState

    c = tmp_path / "checkpoints"
    e = FakeEngine()
    save(e, c, 2)
    if phase == "failed":
        monkeypatch.setattr(ckpt_save, "_sync_and_sum", lambda *a: (_ for _ in ()).throw(OSError()))
    saver = Checkpointer(e, c, INFO, keep_last=10, background=True)
    saver.save(TrainState(step=4), Loader())
    if phase == "commit":
        saver.pending.wait()
        saver.advance(none_failed=True)
    monkeypatch.setattr(ckpt_save, "all_gather_objects", None)  # no collective from here on
    monkeypatch.setattr(ckpt_save, "all_reduce_sum", None)
    saver.close()
    assert saver.pending is None and _running_jobs() == []
    assert ckpt.read_latest(c) == ("step_00000002" if phase == "failed" else "step_00000004")
    monkeypatch.undo()
    assert ckpt.select_checkpoint(c, INFO)[0] == ckpt.read_latest(c)


def test_a_writer_that_dies_never_counts_as_written(tmp_path, monkeypatch):
    c = tmp_path / "checkpoints"
    e = FakeEngine()
    save(e, c, 2)
    _quiet_thread_deaths(monkeypatch)
    monkeypatch.setattr(ckpt_save, "_sync_and_sum", lambda *a: (_ for _ in ()).throw(Killed()))
    p = ckpt_save.begin_save(e, c, 4, {"step": 4}, {"rank": 0}, INFO, background=True)
    p.wait()
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="the writer of step_00000004 did not finish"):
        p.advance(10)
    assert ckpt.read_latest(c) == "step_00000002" and not list(c.glob(".tmp-*"))


def test_free_space_warning(two, monkeypatch, caplog):
    c, e = two
    size = ckpt.checkpoint_bytes(c / "step_00000008")
    assert size == sum(p.stat().st_size for p in (c / "step_00000008").iterdir()) - len(
        (c / "step_00000008" / "manifest.json").read_bytes()
    )
    monkeypatch.setattr(ckpt_save, "_free_bytes", lambda p: int(size * 1.5))
    with caplog.at_level(logging.WARNING, logger="janus_train.trainer.ckpt_save"):
        save(e, c, 12)
    assert any("less than one checkpoint of room" in r.getMessage() for r in caplog.records)
    caplog.clear()
    monkeypatch.setattr(ckpt_save, "_free_bytes", lambda p: size * 3)
    with caplog.at_level(logging.WARNING, logger="janus_train.trainer.ckpt_save"):
        save(e, c, 16)
    assert not caplog.records


@ASYNC
@pytest.mark.parametrize("where", ["engine", "rank_state", "manifest"])
def test_enospc_keeps_previous_latest_and_says_one_line(
    two, monkeypatch, tmp_path, where, background
):
    c, e = two
    real_save = torch.save

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "engine":  # torch's zip writer wraps the short write
        monkeypatch.setattr(
            e,
            "save_checkpoint",
            lambda *a, **k: (_ for _ in ()).throw(
                RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 48 vs 32")
            ),
        )
    elif where == "rank_state":
        monkeypatch.setattr(
            torch,
            "save",
            lambda obj, f, *a, **k: full() if "trainer_state" in str(f) else real_save(obj, f),
        )
    else:
        monkeypatch.setattr(ckpt_save, "_write_manifest", full)
    with pytest.raises(StorageFull) as exc:
        save(e, c, 12, background=background)
    msg = str(exc.value)
    assert msg.startswith("storage full: ") and "\n" not in msg
    assert str(c / "step_00000012") in msg and "step_00000008 is still the latest" in msg
    assert "needs about" in msg
    monkeypatch.undo()
    assert ckpt.read_latest(c) == "step_00000008"
    assert sorted(p.name for p in c.iterdir()) == ["latest", "step_00000004", "step_00000008"]
    assert ckpt.select_checkpoint(c, INFO) == ("step_00000008", 0)
    err_file = tmp_path / "user_error"
    monkeypatch.setenv("JANUS_USER_ERROR_FILE", str(err_file))
    assert report_storage_full(exc.value) == EXIT_STORAGE_FULL == 3
    assert err_file.read_text() == msg + "\n"


@ASYNC
def test_enospc_after_latest_moved_says_the_checkpoint_counts(two, monkeypatch, background):
    """The space runs out in the fsync of ``checkpoints/`` after ``latest`` was replaced: the
    checkpoint is committed, so the line says so (not "could not write"), nothing is
    pruned, and the run still stops with the storage-full status."""
    c, e = two
    real_replace, real_fsync_dir, moved = os.replace, ckpt.fsync_dir, []

    def replace(a, b):
        real_replace(a, b)
        moved.append(str(b).endswith("latest"))

    def fsync_dir(path):
        if any(moved):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync_dir(path)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(ckpt, "fsync_dir", fsync_dir)  # write_atomic's
    with pytest.raises(StorageFull) as exc:
        save(e, c, 12, keep_last=2, background=background)
    monkeypatch.undo()
    msg = str(exc.value)
    assert msg.startswith(f"storage full: checkpoint {c / 'step_00000012'} was committed and is ")
    assert "the latest" in msg and "could not write" not in msg and "\n" not in msg
    assert "not pruned" in msg and "needs about" in msg
    assert ckpt.read_latest(c) == "step_00000012"
    assert sorted(p.name for p in c.iterdir()) == [
        "latest",
        "step_00000004",
        "step_00000008",
        "step_00000012",
    ]
    assert ckpt.select_checkpoint(c, INFO) == ("step_00000012", 0)


def test_a_failed_save_runs_deepspeeds_epilogue_once():
    """A rank whose save failed joins the epilogue collective the others run after their writes
    (ZeRO-3's re-gather), exactly once: ``compat.checkpoint_epilogue_once`` runs it when the
    save failed before it, not again when the save failed after it, and puts the optimizer
    back; the hooks it relies on exist where ZeRO-3 defines its collective one."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    from janus_train import compat

    assert callable(getattr(DeepSpeedEngine, "_optimizer_has_ckpt_event_epilogue", None))
    assert callable(getattr(DeepSpeedZeroOptimizer_Stage3, "checkpoint_event_epilogue", None))

    class Optimizer:
        def __init__(self):
            self.calls = 0

        def checkpoint_event_epilogue(self):
            self.calls += 1

    class Engine:
        def __init__(self):
            self.optimizer = Optimizer()

        def _optimizer_has_ckpt_event_epilogue(self):
            return True

    for reached in (False, True):  # the save failed before / after its own epilogue
        e = Engine()
        with compat.checkpoint_epilogue_once(e) as finish:
            if reached:
                e.optimizer.checkpoint_event_epilogue()  # DeepSpeed's call, inside the save
            finish()
            finish()
        assert e.optimizer.calls == 1, reached
        assert "checkpoint_event_epilogue" not in vars(e.optimizer)
    with compat.checkpoint_epilogue_once(object()) as finish:
        finish()  # nothing to run


def test_storage_full_classification():
    assert is_storage_full(OSError(errno.ENOSPC, "x"))
    assert is_storage_full(OSError(errno.EDQUOT, "x"))
    try:
        try:
            raise OSError(errno.ENOSPC, "x")
        except OSError as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as e:
        assert is_storage_full(e)
    assert is_storage_full(
        RuntimeError("PytorchStreamWriter failed writing file: file write failed")
    )
    assert not is_storage_full(OSError(errno.EACCES, "x"))
    assert not is_storage_full(RuntimeError("PytorchStreamReader failed reading zip archive"))


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if res.returncode != 0:  # root without CAP_SYS_ADMIN (an unprivileged container)
        pytest.skip(f"mount refused a tmpfs here: {res.stderr.strip()[:200]}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_full_disk_on_a_small_tmpfs(small_tmpfs):
    c = small_tmpfs / "checkpoints"
    e = FakeEngine(n=100_000)  # ~0.8 MB a checkpoint: the fourth does not fit in 3 MiB
    saved = []
    with pytest.raises(StorageFull) as exc:
        for step in range(1, 10):
            save(e, c, step, keep_last=10)
            saved.append(step)
    assert len(saved) >= 2
    assert ckpt.read_latest(c) == ckpt.tag_for(saved[-1])
    assert not list(c.glob(".tmp-*"))
    assert ckpt.select_checkpoint(c, INFO) == (ckpt.tag_for(saved[-1]), 0)
    assert str(exc.value).startswith(f"storage full: could not write checkpoint {c}")


def test_keep_last_below_two_refused(tmp_path):
    from janus_train.config import compose, to_run_config
    from janus_train.train import prepare

    run = to_run_config(
        compose(
            [
                "train.synthetic_data=true",
                "train.keep_last=1",
                f"train.run_dir={tmp_path}/run",
                "train.dry_run=true",
            ]
        )
    )
    with pytest.raises(ValueError, match=r"train.keep_last=1: must be >= 2") as exc:
        prepare(run, INFO)
    assert is_user_error(exc.value)


def test_janus_train_exits_3_with_the_storage_full_line(monkeypatch, tmp_path, capsys):
    import sys

    from janus_train import train

    line = "storage full: could not write checkpoint /x/step_00000002 (...)"

    def hydra_main():
        train._error = StorageFull(line)

    def leave(status):
        raise SystemExit(status)

    monkeypatch.setattr(train, "_hydra_main", hydra_main)
    monkeypatch.setattr(train, "exit_finished", leave)
    monkeypatch.setattr(sys, "argv", ["janus-train"])
    monkeypatch.setattr(train, "_error", None)
    monkeypatch.setenv("JANUS_USER_ERROR_FILE", str(tmp_path / "err"))
    monkeypatch.delenv("JANUS_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exc:
        train.main()
    assert exc.value.code == EXIT_STORAGE_FULL
    assert capsys.readouterr().err.strip() == line
    assert (tmp_path / "err").read_text() == line + "\n"


_EXIT_SCRIPT = """
import sys, threading, time
from pathlib import Path
import torch
from janus_train.trainer import ckpt_save, ckpt_writer
from janus_train.trainer.distributed import DistInfo

class Writer:
    def __init__(self, delay):
        self.delay = delay
    def save(self, obj, path):
        if self.delay is None:
            threading.Event().wait()  # a write that never ends (a hung file system)
        time.sleep(self.delay)
        torch.save(obj, path)

class Engine:
    def __init__(self, delay):
        self.checkpoint_engine = Writer(delay)
    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save({"w": torch.ones(3)}, str(Path(save_dir) / tag / "m.pt"))

ckpt_writer.EXIT_WAIT_S = 2.0
info = DistInfo(rank=0, world_size=1, local_rank=0)
root = Path(sys.argv[1])
for name, delay in (("slow", 0.1), ("hung", None)):
    ckpt_save.begin_save(Engine(delay), root / name, 2, {}, {}, info, background=True)
print("main thread done", flush=True)
"""


def test_writer_threads_neither_keep_the_process_alive_nor_are_cut_off_at_exit(tmp_path):
    """A script that leaves two asynchronous saves running when its main thread ends (the
    loop always waits for them; this is the backstop): the slow one is waited for at exit
    and finishes (its file list is there), the hung one is abandoned after ``ckpt_writer.EXIT_WAIT_S``
    with a warning, and the process exits 0 (a non-daemon thread would keep it alive for
    good; a daemon stopped mid-write could abort it)."""
    import sys
    import time

    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-c", _EXIT_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert time.monotonic() - t0 < 60
    assert "main thread done" in res.stdout
    assert (tmp_path / "slow" / ".tmp-step_00000002" / "files_rank0.json").is_file()
    assert not (tmp_path / "hung" / ".tmp-step_00000002" / "files_rank0.json").exists()
    assert "checkpoint step_00000002 still being saved at exit after 2 s" in res.stderr
    assert "terminate called" not in res.stderr


def test_an_async_save_in_a_forked_child_gets_a_writer_of_its_own(tmp_path):
    """A process that saved asynchronously (its writer thread started), then forks a trainer
    (a fork-based sweep or launcher): the parent's thread does not survive the fork, so the
    child's save must start a writer of its own (it would wait for ever on the inherited queue)
    and commits; the parent's writer goes on working. Bounded: the child gives up after 20 s,
    the parent kills it after 60 s."""
    import signal
    import time
    import traceback

    e = FakeEngine(10)
    assert save(e, tmp_path / "parent", 2, background=True) == "step_00000002"
    c = tmp_path / "child"
    pid = os.fork()
    if pid == 0:  # the child always leaves through os._exit, never back into pytest
        code = 1
        try:
            p = ckpt_save.begin_save(e, c, 4, {"step": 4}, {"rank": 0}, INFO, background=True)
            p.release()  # (the loop's step all-reduce)
            deadline = time.monotonic() + 20
            while not p.ready and time.monotonic() < deadline:
                time.sleep(0.01)
            if p.ready and p.commit(10) == "step_00000004":
                code = 0 if ckpt.read_latest(c) == "step_00000004" else 3
            else:
                code = 2
        except BaseException:  # noqa: BLE001  # reported through the exit code
            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert done[0] == pid, "the child hung (killed after 60 s)"
    assert os.waitstatus_to_exitcode(done[1]) == 0, "2: the child's save never ran"
    assert ckpt.select_checkpoint(c, INFO)[0] == "step_00000004"
    assert save(e, tmp_path / "parent", 4, background=True) == "step_00000004"


def test_snapshot_is_a_deep_copy_with_tensors_on_the_host():
    """``snapshot`` (on the loop's thread at every save) against ``copy.deepcopy`` as the
    reference: the same values and types all through (an ``OrderedDict`` state dict with its
    ``_metadata``, a named tuple, an RNG state, a numpy array, an object), a tensor referenced
    twice stays one tensor, and nothing the live state does afterwards reaches it."""
    import collections
    import copy
    import dataclasses
    import random

    import numpy as np

    Address = collections.namedtuple("Address", "numel start")

    @dataclasses.dataclass
    class Fragment:
        numel: int
        start: int

    w = torch.arange(6.0)
    sd = collections.OrderedDict(w=w, b=torch.ones(2))
    sd._metadata = {"": {"version": 1}}
    live = {
        "module": sd,
        "tied": w,
        "shapes": [torch.Size([2, 3]), (1, (2, [3]))],
        "address": Address(6, 0),
        "fragment": Fragment(6, 0),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state()},
        "scaler": types.SimpleNamespace(scale=2.0**16, history=[1, 2]),
        "dtype": torch.bfloat16,
    }
    want = copy.deepcopy(live)
    got = ckpt_capture.snapshot(live)
    w.add_(100.0)  # the next optimizer step, in place
    sd["b"] = torch.zeros(2)
    live["shapes"][1][1][1].append(4)
    live["scaler"].history.append(3)
    live["fragment"].start = 7

    def same(x, y) -> bool:
        assert type(x) is type(y), (type(x), type(y))
        if isinstance(x, torch.Tensor):
            return torch.equal(x, y) and x.device.type == "cpu"
        if isinstance(x, np.ndarray):
            return np.array_equal(x, y)
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, list | tuple):
            return len(x) == len(y) and all(same(a, b) for a, b in zip(x, y, strict=True))
        if isinstance(x, types.SimpleNamespace | Fragment):
            return same(vars(x), vars(y))
        return x == y

    assert same(got, want)
    assert got["module"]._metadata == {"": {"version": 1}}
    assert got["tied"] is got["module"]["w"] and got["tied"] is not w
    assert got["shapes"][1][1][1] == [3] and got["scaler"].history == [1, 2]


def test_a_save_that_cannot_start_is_flagged_and_raised_at_the_agreement(tmp_path):
    """A rank whose save fails before any write (its directory cannot be made; any error in
    DeepSpeed's save) does not raise at the save, where the other ranks would go on into the
    next step's collective without it: it flags the save failed, and the agreement raises the
    error (on every rank: ``test_ckpt_dist``); ``latest`` and the files stay as they were."""
    from janus_train.trainer.state import Checkpointer, TrainState

    c = tmp_path / "checkpoints"
    e = FakeEngine()
    saver = Checkpointer(e, c, INFO, keep_last=10, background=True)
    saver.save(TrainState(step=2), Loader())
    saver.commit()
    (c / ".tmp-step_00000004").write_text("a file where the save's directory goes")
    saver.save(TrainState(step=4), Loader())  # no raise here
    saver.pending.wait()
    assert saver.flags() == (1.0, 1.0)
    with pytest.raises(NotADirectoryError, match="tmp-step_00000004"):
        saver.advance(none_failed=False)
    assert saver.pending is None and ckpt.read_latest(c) == "step_00000002"
    assert sorted(p.name for p in c.iterdir()) == [".tmp-step_00000004", "latest", "step_00000002"]


def test_an_async_saves_writes_wait_for_the_release(tmp_path):
    """The writes of an asynchronous save start only when released (the loop's next step
    all-reduce, which every rank enters after its own save) or waited for: until then the
    writer writes no file (DeepSpeed makes the directory in its save, on the loop's thread;
    this stand-in does too) and the save is not ready."""
    import time

    c = tmp_path / "checkpoints"
    e = FakeEngine()
    p = ckpt_save.begin_save(e, c, 2, {"step": 2}, {"rank": 0}, INFO, background=True)
    time.sleep(0.2)  # (time enough for a writer that was not held)
    assert not p._task.go.is_set() and not p._task.done.is_set() and not p.ready
    assert not [f for f in c.rglob("*") if f.is_file()]
    p.release()
    p.wait()
    assert p.ready and not p.failed
    assert (c / ".tmp-step_00000002" / "step_00000002" / "trainer_state_rank0.pt").is_file()
    assert p.commit(10) == "step_00000002"
    q = ckpt_save.begin_save(e, c, 4, {"step": 4}, {"rank": 0}, INFO, background=True)
    assert q.commit(10) == "step_00000004"  # waiting for it releases it


def test_frozen_parameters_are_written_from_the_live_tensors():
    """A save does not copy what no optimizer step changes: ``_frozen_storage`` names the host
    storage of the frozen parameters (``requires_grad`` off) of DeepSpeed's ``param_names``,
    read at the save (a parameter whose storage was replaced since is followed), and
    ``snapshot`` keeps a tensor starting there as it is (any alias: the model's weight, a
    fragment); a trainable parameter's alias is still copied."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    net[0].requires_grad_(False)
    engine = types.SimpleNamespace(param_names={p: n for n, p in net.named_parameters()})
    frozen = ckpt_capture.frozen_storage(engine)
    assert frozen == {net[0].weight.data_ptr(), net[0].bias.data_ptr()}
    sd = net.state_dict()
    got = ckpt_capture.snapshot(
        {"module": sd, "fragments": {"0.weight": net[0].weight}}, frozen=frozen
    )
    assert got["module"]["0.weight"].data_ptr() == net[0].weight.data_ptr()
    assert got["fragments"]["0.weight"].data_ptr() == net[0].weight.data_ptr()
    assert got["module"]["1.weight"].data_ptr() != net[1].weight.data_ptr()
    assert torch.equal(got["module"]["1.weight"], net[1].weight)
    net[0].weight.data = torch.zeros(3, 3)  # replaced storage: the new one is followed
    assert ckpt_capture.frozen_storage(engine) >= {net[0].weight.data_ptr()}
    assert ckpt_capture.frozen_storage(types.SimpleNamespace()) == frozenset()
    trained = torch.nn.Parameter(torch.zeros(4))
    alias = torch.nn.Parameter(trained.data, requires_grad=False)  # tied through .data
    shared = types.SimpleNamespace(param_names={trained: "a", alias: "b"})
    assert ckpt_capture.frozen_storage(shared) == frozenset()  # never taken as frozen


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own nice: Linux")
def test_the_writer_thread_runs_below_the_loops_priority():
    """The writer's jobs run at the process's nice value + ``ckpt_writer.WRITER_NICE`` (relative:
    a run launched under ``nice`` keeps its writer lower still)."""
    import threading

    seen = []
    job = ckpt_writer.submit(
        lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())), "nice"
    )
    assert job.done.wait(10)
    assert seen == [os.getpriority(os.PRIO_PROCESS, 0) + ckpt_writer.WRITER_NICE]
