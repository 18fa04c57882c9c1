"""Checkpoint faults on 2 CPU ranks with real DeepSpeed files, ZeRO-2 and ZeRO-3, in one
torchrun launch (``python tests/test_ckpt_dist.py main <dir>`` is the worker):

* an uninterrupted 4-step reference run checkpointing every step;
* its checkpoints of steps 1-3 copied and step 3 damaged four ways (a model file truncated, one
  rank's optimizer file with a byte flipped, a rank's state file missing, the manifest of step
  2): every rank agrees on falling back to step 2, step 3 is renamed aside;
* one damaged copy per stage trained to the end: it resumes from step 2 and its losses and
  exported weights equal the reference's bitwise, ``ckpt/fallbacks`` = 1;
* ENOSPC injected into rank 1's optimizer file of the step-2 save: both ranks raise the same
  ``storage full:`` line, ``latest`` stays step 1, the partial directory is gone;
* an error raised inside DeepSpeed's ``save_checkpoint`` on rank 1 at step 2: both ranks raise
  it (no hang), ``latest`` stays step 1, the partial directory is gone;
* the asynchronous protocol with a stand-in engine: a save carrying the agreement on the
  previous commit, and a carried commit that failed on rank 0 raised on both ranks.

* every file of the reference runs' saves written by the ranks' writer threads
  (``train.ckpt_async``, the default; so are all the runs above), fsynced by the rank that
  wrote it (two files written outside DeepSpeed's checkpoint engine included), then the
  directories by rank 0, before the rename.

Kills at each moment of the save order are covered in one process (``test_ckpt_faults.py``),
on 2 ranks with real SIGKILLs (``test_ckpt_kill.py``, heavy tier) and in the
SIGKILL/resume chain of ``test_train_dist.py``.
"""

from __future__ import annotations

import errno
import json
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_utils import ZeroFilesEngine, run_torchrun  # noqa: E402

pytestmark = pytest.mark.dist
SELF = str(Path(__file__).resolve())
KINDS = ("model", "optim_rank1", "rank_file", "manifest")
RESUMED = {2: "model", 3: "optim_rank1"}  # the damaged copy trained to the end, per stage


def _run(root, name, zero, steps, extra=()):
    from janus_train.config import compose, to_run_config

    ov = [
        "stage=stage2",
        f"deepspeed=zero{zero}",
        "train.synthetic_data=true",
        f"train.run_dir={root}/{name}",
        f"experiment.stage2.steps={steps}",
        "experiment.stage2.global_batch_size=4",
        "train.log_every=1",
        "train.ckpt_every=1",
        "train.keep_last=10",
        "train.tokens_per_micro=0",
        "train.export_at_end=false",
        "train.progress_bar=false",
        "train.synthetic_seq_len=40",
        *extra,
    ]
    return to_run_config(compose(ov))


def _damage(d: Path, kind: str) -> None:
    if kind == "model":
        p = sorted(d.glob("*model_states.pt"))[0]
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif kind == "optim_rank1":
        (p,) = d.glob("*zero_pp_rank_1_*optim_states.pt")
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0xFF
        p.write_bytes(bytes(b))
    elif kind == "rank_file":
        (d / "trainer_state_rank1.pt").unlink()
    else:
        shutil.copy(d.parent / "step_00000002" / "manifest.json", d / "manifest.json")


class Durability:
    """On this rank, while a reference run saves: the checkpoint files it wrote (through
    ``torch.save``, and two more DeepSpeed-like files written outside the checkpoint engine:
    rank 0 one named like rank 1's ZeRO file, rank 1 one in a subdirectory), and every fsync
    and rename under ``checkpoints/`` with its time (``time.monotonic``: one clock for both
    processes of this host)."""

    def __init__(self) -> None:
        self.wrote: list[str] = []
        self.synced: list[tuple[str, float]] = []
        self.renamed: list[tuple[str, float]] = []

    def __enter__(self):
        import os
        import time

        import torch.distributed as dist
        from deepspeed.runtime.engine import DeepSpeedEngine

        real = self.real = (torch.save, os.fsync, os.rename, DeepSpeedEngine._save_zero_checkpoint)

        def save(obj, f, *a, **k):
            if "checkpoints" in str(f):
                self.wrote.append(str(f))
            return real[0](obj, f, *a, **k)

        def fsync(fd):
            path = os.readlink(f"/proc/self/fd/{fd}")
            if "/checkpoints" in path:
                self.synced.append((path, time.monotonic()))
            return real[1](fd)

        def rename(a, b):
            real[2](a, b)
            self.renamed.append((str(b), time.monotonic()))

        def zero_files(engine, save_path, tag):
            real[3](engine, save_path, tag)
            d = Path(save_path) / str(tag)
            f = d / "zero_pp_rank_1_notes.txt"  # a name the old by-name owner gave rank 1
            if dist.get_rank() == 1:
                (d / "notes").mkdir(exist_ok=True)
                f = d / "notes" / "extra.txt"
            f.write_text(f"written by rank {dist.get_rank()}")
            self.wrote.append(str(f))

        torch.save, os.fsync, os.rename = save, fsync, rename
        DeepSpeedEngine._save_zero_checkpoint = zero_files
        return self

    def __exit__(self, *exc):
        import os

        from deepspeed.runtime.engine import DeepSpeedEngine

        torch.save, os.fsync, os.rename, DeepSpeedEngine._save_zero_checkpoint = self.real

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(vars(self) | {"real": None}))


def scenario_main(root):
    import torch.distributed as dist

    from janus_train import train
    from janus_train.errors import StorageFull
    from janus_train.trainer.checkpoint import select_checkpoint
    from janus_train.trainer.distributed import barrier, setup_distributed

    root = Path(root)
    real_save = torch.save
    writers = []  # (file, thread) of every checkpoint file written

    def recorded(obj, f, *a, **k):
        if "checkpoints" in str(f):
            writers.append((Path(f).name, threading.current_thread().name))
        return durability_save(obj, f, *a, **k)

    for zero in (2, 3):
        writers.clear()
        with Durability() as durability:
            durability_save, torch.save = torch.save, recorded
            try:
                run = _run(root, f"ref_z{zero}", zero, 4, ["train.export_at_end=true"])
                assert train.run(run) == 0
            finally:
                torch.save = real_save
        info = setup_distributed()
        durability.dump(root / f"durability_z{zero}.rank{info.rank}.json")
        (root / f"writers_z{zero}.rank{info.rank}.json").write_text(json.dumps(writers))
        src = root / f"ref_z{zero}" / "checkpoints"
        for kind in KINDS:
            c = root / f"{kind}_z{zero}" / "checkpoints"
            if info.is_main:
                c.mkdir(parents=True)
                for step in (1, 2, 3):
                    shutil.copytree(src / f"step_{step:08d}", c / f"step_{step:08d}")
                (c / "latest").write_text("step_00000003")
                _damage(c / "step_00000003", kind)
            barrier()
            if kind == RESUMED[zero]:  # through the trainer, to the end
                run = _run(root, f"{kind}_z{zero}", zero, 4, ["train.export_at_end=true"])
                assert train.run(run) == 0
                continue
            tag, n = select_checkpoint(c, info)
            (root / f"{kind}_z{zero}.rank{info.rank}.json").write_text(
                json.dumps({"tag": tag, "fallbacks": n})
            )

        def full(obj, f, *a, **k):
            if dist.get_rank() == 1 and "step_00000002" in str(f) and "optim" in str(f):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(obj, f, *a, **k)

        torch.save = full
        try:
            train.run(_run(root, f"enospc_z{zero}", zero, 3))
            msg = None
        except StorageFull as e:
            msg = str(e)
        finally:
            torch.save = real_save
        (root / f"enospc_z{zero}.rank{dist.get_rank()}.json").write_text(json.dumps(msg))

        from deepspeed.runtime.engine import DeepSpeedEngine

        real_zero = DeepSpeedEngine._save_zero_checkpoint

        def broken(engine, save_path, tag, real_zero=real_zero):  # before ZeRO-3's epilogue
            if dist.get_rank() == 1 and tag == "step_00000002":
                raise RuntimeError("injected failure in DeepSpeed's save")
            return real_zero(engine, save_path, tag)

        DeepSpeedEngine._save_zero_checkpoint = broken
        try:
            train.run(_run(root, f"dserror_z{zero}", zero, 3))
            msg = None
        except RuntimeError as e:
            msg = f"{type(e).__name__}: {e}"
        finally:
            DeepSpeedEngine._save_zero_checkpoint = real_zero
        (root / f"dserror_z{zero}.rank{dist.get_rank()}.json").write_text(json.dumps(msg))


def scenario_carry(root: Path) -> None:
    """The loop's protocol of asynchronous saves on 2 ranks, with the loop's step all-reduce
    written out (flags, release, advance): a save that finds the previous one down to the
    agreement on rank 0's commit carries it (no collective of ``ckpt_save`` at the save or at
    that agreement); then rank 0's commit of step 4 fails (ENOSPC) and the save of step 6,
    carrying it, raises the same ``storage full`` line on both ranks."""
    from janus_train.errors import StorageFull
    from janus_train.trainer import ckpt_save
    from janus_train.trainer.distributed import all_reduce_sum, setup_distributed
    from janus_train.trainer.state import Checkpointer, TrainState

    info = setup_distributed()
    calls: list[str] = []
    reduce, gather = ckpt_save.all_reduce_sum, ckpt_save.all_gather_objects
    ckpt_save.all_reduce_sum = lambda t: calls.append("reduce") or reduce(t)
    ckpt_save.all_gather_objects = lambda o: calls.append("gather") or gather(o)

    class Loader:
        def state_dict(self):
            return {"rank": info.rank}

    c = root / "carry" / "checkpoints"
    saver = Checkpointer(ZeroFilesEngine(), c, info, keep_last=10, background=True)

    def boundary() -> None:  # train_step's all-reduce of the flags, then the loop's advance
        ready, failed = all_reduce_sum(torch.tensor(saver.flags(), dtype=torch.float64))
        saver.release()
        if saver.pending is not None and int(ready) == info.world_size:
            saver.advance(none_failed=not failed)

    def to_commit_phase() -> None:
        saver.pending.wait()  # this rank's writes done
        boundary()  # every rank ready: rank 0's commit thread starts
        assert saver.pending.phase == "commit"
        saver.pending.wait()  # (rank 0: its commit done, not yet agreed on)

    out: dict = {}
    saver.save(TrainState(step=2), Loader())
    to_commit_phase()
    saver.save(TrainState(step=4), Loader())  # carries step 2's agreement
    out["carried"] = saver.pending.prior.tag
    if info.rank == 0:
        real = ckpt_save._write_manifest

        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

        ckpt_save._write_manifest = full  # step 4's commit
    to_commit_phase()  # settles step 2 without a collective of ckpt_save
    out["calls_before_failure"] = list(calls)
    if info.rank == 0:
        ckpt_save._write_manifest = real
    saver.save(TrainState(step=6), Loader())  # carries step 4's failed commit
    saver.pending.wait()
    out["flags_after_write"] = list(saver.flags())
    try:
        boundary()
        out["error"] = None
    except StorageFull as e:
        out["error"] = str(e)
    out["calls"] = calls
    (root / f"carry.rank{info.rank}.json").write_text(json.dumps(out))


def _metrics(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def scen(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_dist")
    res = run_torchrun([SELF, "main", str(root)], timeout=400)
    assert res.returncode == 0, res.output[-6000:]
    return root


@pytest.mark.parametrize("zero", [2, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_damaged_newest_checkpoint_falls_back_on_every_rank(scen, zero, kind):
    c = scen / f"{kind}_z{zero}" / "checkpoints"
    assert (c / "step_00000003.bad").is_dir()
    if kind == RESUMED[zero]:
        return  # trained on (step 3 saved again): checked below
    assert not (c / "step_00000003").exists()
    assert (c / "latest").read_text() == "step_00000002"
    for rank in (0, 1):
        got = json.loads((scen / f"{kind}_z{zero}.rank{rank}.json").read_text())
        assert got == {"tag": "step_00000002", "fallbacks": 1}


@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_files_are_written_by_the_writer_threads(scen, zero):
    """``train.ckpt_async`` (the default): every file of every save of the reference run (4
    saves, DeepSpeed's and ours) was written by a writer thread, none by the loop's thread."""
    for rank in (0, 1):
        writers = json.loads((scen / f"writers_z{zero}.rank{rank}.json").read_text())
        names = {name for name, _ in writers}
        assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in names
        assert f"trainer_state_rank{rank}.pt" in names
        assert (rank == 0) <= any(n.endswith("model_states.pt") for n in names)
        assert len(writers) == 4 * len(names)
        assert all(thread.startswith("janus-ckpt") for _, thread in writers), writers


@pytest.mark.parametrize("zero", [2, 3])
def test_each_rank_fsyncs_the_files_it_wrote_then_rank_0_the_directories(scen, zero):
    """The durability order of ``ckpt_save`` with per-rank ownership, on the reference run's 4
    saves: every file of a checkpoint was fsynced by the rank that wrote it and by no other
    (on a multi-node file system only the writer's fsync flushes its cache), DeepSpeed-like
    files written outside the checkpoint engine included, whatever their name; then rank 0
    fsynced the checkpoint's directories, after every rank's file fsyncs, before the rename."""
    rec = [json.loads((scen / f"durability_z{zero}.rank{r}.json").read_text()) for r in (0, 1)]
    c = scen / f"ref_z{zero}" / "checkpoints"
    for step in (1, 2, 3, 4):
        tag = f"step_{step:08d}"
        tmp = f"{c}/.tmp-{tag}/{tag}"
        manifest = json.loads((c / tag / "manifest.json").read_text())["files"]
        assert {"zero_pp_rank_1_notes.txt", "notes/extra.txt"} <= set(manifest)
        wrote = {f[len(tmp) + 1 :]: r for r in (0, 1) for f in rec[r]["wrote"] if f.startswith(tmp)}
        assert wrote["zero_pp_rank_1_notes.txt"] == 0 and wrote["notes/extra.txt"] == 1
        assert set(wrote) == set(manifest)
        for rel, writer in wrote.items():
            by = {r for r in (0, 1) for p, _ in rec[r]["synced"] if p == f"{tmp}/{rel}"}
            assert by == {writer}, (rel, by)
        paths = {f"{tmp}/{rel}" for rel in [*manifest, "manifest.json"]}
        last_file = max(t for r in (0, 1) for p, t in rec[r]["synced"] if p in paths)
        dirs = {p: t for p, t in rec[0]["synced"] if p in (tmp, f"{tmp}/notes")}
        assert set(dirs) == {tmp, f"{tmp}/notes"}  # rank 0's, after every rank's files
        assert not any(p in dirs for p, _ in rec[1]["synced"])
        (renamed,) = [t for p, t in rec[0]["renamed"] if p == str(c / tag)]
        assert last_file < min(dirs.values()) and max(dirs.values()) < renamed


@pytest.mark.parametrize("zero", [2, 3])
def test_resume_past_a_damaged_checkpoint_equals_uninterrupted_run(scen, zero):
    from safetensors.torch import load_file

    ref_dir, run_dir = scen / f"ref_z{zero}", scen / f"{RESUMED[zero]}_z{zero}"
    ref = {r["step"]: r["loss"] for r in _metrics(ref_dir / "metrics.jsonl")}
    rows = _metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 4]  # resumed from step 2
    assert all(r["ckpt/fallbacks"] == 1 for r in rows)
    assert {r["step"]: r["loss"] for r in rows} == {3: ref[3], 4: ref[4]}
    a = load_file(str(ref_dir / "hf" / "model.safetensors"))
    b = load_file(str(run_dir / "hf" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = run_dir / "checkpoints"
    assert (c / "latest").read_text() == "step_00000004"


@pytest.mark.parametrize("zero", [2, 3])
def test_enospc_on_one_rank_stops_every_rank_with_previous_latest(scen, zero):
    c = scen / f"enospc_z{zero}" / "checkpoints"
    msgs = [json.loads((scen / f"enospc_z{zero}.rank{r}.json").read_text()) for r in (0, 1)]
    assert msgs[0] == msgs[1] and msgs[0].startswith(
        f"storage full: could not write checkpoint {c}"
    )
    assert "step_00000001 is still the latest" in msgs[0]
    assert (c / "latest").read_text() == "step_00000001"
    assert sorted(p.name for p in c.iterdir()) == ["latest", "step_00000001"]


def test_a_save_carries_the_agreement_on_the_previous_commit_on_two_ranks(scen):
    """``scenario_carry``: the carried agreement needs no collective of ``ckpt_save``; a failed
    carried commit (rank 0 only) is flagged by rank 0 alone and raised on both ranks, the same
    line, with ``latest`` left at step 2 and no partial directory (step 6's included)."""
    c = scen / "carry" / "checkpoints"
    got = [json.loads((scen / f"carry.rank{r}.json").read_text()) for r in (0, 1)]
    for rank, g in enumerate(got):
        assert g["carried"] == "step_00000002"
        assert g["calls_before_failure"] == []
        assert g["flags_after_write"] == [1.0, 1.0 if rank == 0 else 0.0]
        assert g["calls"] == ["reduce", "gather"]  # the carried commit's agreement, its message
    assert got[0]["error"] == got[1]["error"]
    assert got[0]["error"].startswith(f"storage full: could not write checkpoint {c}")
    assert "step_00000002 is still the latest" in got[0]["error"]
    assert (c / "latest").read_text() == "step_00000002"
    assert sorted(p.name for p in c.iterdir()) == ["latest", "step_00000002"]


@pytest.mark.parametrize("zero", [2, 3])
def test_an_error_inside_deepspeeds_save_on_one_rank_stops_every_rank(scen, zero):
    """An error raised inside DeepSpeed's ``save_checkpoint`` on rank 1 (its barriers skipped,
    ZeRO-3's epilogue collective still to come): rank 1 still joins that collective, the
    error is flagged at the next step's all-reduce and raised on every rank (rank 1 its own,
    rank 0 one naming rank 1): no rank waits for the collective timeout, ``latest`` stays the
    previous checkpoint and the partial directory is gone."""
    c = scen / f"dserror_z{zero}" / "checkpoints"
    msgs = [json.loads((scen / f"dserror_z{zero}.rank{r}.json").read_text()) for r in (0, 1)]
    assert msgs[1] == "RuntimeError: injected failure in DeepSpeed's save"
    assert msgs[0] == (
        f"RuntimeError: checkpoint {c / 'step_00000002'}: rank 1 failed to write its files "
        "(injected failure in DeepSpeed's save)"
    )
    assert (c / "latest").read_text() == "step_00000001"
    assert sorted(p.name for p in c.iterdir()) == ["latest", "step_00000001"]


if __name__ == "__main__":
    scenario, root = sys.argv[1], sys.argv[2]
    if scenario == "main":
        scenario_main(root)
        scenario_carry(Path(root))
        from janus_train.trainer.distributed import exit_finished

        exit_finished(0)  # as janus-train does: no finalization racing gloo's threads (SIGABRT)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
