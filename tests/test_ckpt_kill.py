"""A real SIGKILL at each moment of the asynchronous save order, on 2 ranks under torchrun.

Each moment is one launch (``python tests/test_ckpt_kill.py kill <dir> <moment>`` is the
worker): both ranks commit a checkpoint of step 2, start an asynchronous save of step 4
(``begin_save(background=True)``) and advance it at "step boundaries" (the ready flags
all-reduced, as the training loop does) until the process named for the moment kills itself
with SIGKILL from inside its writer or commit thread; torchrun then stops the other rank. One
more launch (``resume``) then selects and loads every killed directory on 2 ranks (the
collective verification), saves step 6 over what the kill left and checks that it verifies.

The moments, in the save order of ``janus_train/trainer/ckpt_save.py``:

* ``writing``: rank 1's writer, after its first file (nothing synced yet);
* ``written``: rank 0's commit thread, before the manifest (every rank's files synced);
* ``manifest``: after the manifest, before the rename;
* ``renamed``: after the rename into place, before ``latest`` moves;
* ``latest``: after ``latest`` moved, before its directory's fsync and the prune.

The engine is a stand-in writing DeepSpeed's file names through its ``checkpoint_engine``
(the real engine's saves under async SIGKILL run in ``test_train_dist.py``'s resume chain),
which keeps a launch to seconds. Six launches (29 s quiet, 84 s loaded): ``heavy`` tier; the same moments in one
process, sync and async, run in ``test_ckpt_faults.py``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_utils import ZeroFilesEngine as Engine  # noqa: E402
from dist_utils import run_torchrun  # noqa: E402

pytestmark = [pytest.mark.dist, pytest.mark.heavy]
SELF = str(Path(__file__).resolve())
MOMENTS = {"writing": 2, "written": 2, "manifest": 2, "renamed": 2, "latest": 4}
"""moment -> the step the killed directory resumes at"""


def _save(engine, c, step, info, background=False):
    import torch

    from janus_train.trainer import ckpt_save

    engine.w = torch.full_like(engine.w, float(step))
    return ckpt_save.begin_save(
        engine, c, step, {"step": step}, {"rank": info.rank, "step": step}, info, background
    )


def _die_after(fn, when):
    def wrapped(*a, **k):
        out = fn(*a, **k)
        if when(*a):
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    return wrapped


def scenario_kill(root: Path, moment: str) -> None:
    import time

    import torch

    from janus_train.trainer import ckpt_save
    from janus_train.trainer.distributed import all_reduce_sum, setup_distributed

    info = setup_distributed()
    e, c = Engine(), root / moment / "checkpoints"
    _save(e, c, 2, info).commit(10)
    if moment == "writing" and info.rank == 1:
        e.save = _die_after(e.save, lambda *a: True)  # in the writer thread, after 1 file
    elif info.rank == 0 and moment == "written":
        ckpt_save._write_manifest = _die_after(lambda *a: None, lambda *a: True)
    elif info.rank == 0 and moment == "manifest":
        ckpt_save._write_manifest = _die_after(ckpt_save._write_manifest, lambda *a: True)
    elif info.rank == 0 and moment == "renamed":
        os.rename = _die_after(os.rename, lambda a, b: Path(b).name == "step_00000004")
    elif info.rank == 0 and moment == "latest":
        os.replace = _die_after(os.replace, lambda a, b: Path(b).name == "latest")
    p = _save(e, c, 4, info, background=True)
    for _ in range(2000):  # the loop's step boundaries
        time.sleep(0.005)
        every_rank_ready = int(all_reduce_sum(torch.tensor([float(p.ready)])))
        p.release()  # every rank is past its save: its writes start (as the loop's step does)
        if every_rank_ready == info.world_size:
            if p.advance(10):
                break
    (root / f"{moment}.survived.rank{info.rank}").write_text("the kill did not happen")


def scenario_resume(root: Path) -> None:
    from janus_train.trainer import checkpoint as ckpt
    from janus_train.trainer.distributed import setup_distributed

    info = setup_distributed()
    e, out = Engine(), {}
    for moment in MOMENTS:
        c = root / moment / "checkpoints"
        tag, n = ckpt.select_checkpoint(c, info)  # ends in a barrier: rank 0 has cleaned up
        leftovers = sorted(p.name for p in c.iterdir() if p.name.startswith(".tmp-"))
        client, rank_states, fallbacks = ckpt.load_latest(e, c, info)
        w = float(e.w[0])  # the loaded weights
        _save(e, c, 6, info).commit(10)
        out[moment] = {
            "tag": tag,
            "set_aside": n + fallbacks,
            "client": client,
            "rank_state": rank_states[info.rank],
            "w": w,
            "leftovers": leftovers,
            "after": ckpt.read_latest(c),
            "verifies": ckpt.verify_checkpoint(c / "step_00000006", info),
        }
    (root / f"resume.rank{info.rank}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_kill")
    codes = {}
    for moment in MOMENTS:
        res = run_torchrun([SELF, "kill", str(root), moment], timeout=120)
        codes[moment] = (res.returncode, res.worker_exit_codes(), res.output[-3000:])
    res = run_torchrun([SELF, "resume", str(root)], timeout=120)
    assert res.returncode == 0, res.output[-4000:]
    return root, codes


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_sigkill_at_each_moment_of_the_async_save_resumes_on_two_ranks(killed, moment):
    root, codes = killed
    returncode, exits, output = codes[moment]
    assert returncode != 0 and -signal.SIGKILL in exits, output
    assert not list(root.glob(f"{moment}.survived.*"))
    step = MOMENTS[moment]
    for rank in (0, 1):
        got = json.loads((root / f"resume.rank{rank}.json").read_text())[moment]
        assert got["tag"] == f"step_{step:08d}" and got["set_aside"] == 0
        assert got["client"] == {"step": step} and got["w"] == step
        assert got["rank_state"] == {"rank": rank, "step": step}
        assert got["leftovers"] == []  # the killed save's .tmp- directory removed
        assert got["after"] == "step_00000006" and got["verifies"] == []


if __name__ == "__main__":
    scenario, where = sys.argv[1], Path(sys.argv[2])
    if scenario == "kill":
        scenario_kill(where, sys.argv[3])
    elif scenario == "resume":
        scenario_resume(where)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    from janus_train.trainer.distributed import exit_finished

    exit_finished(0)
