"""A rank that finished exits with its status, never SIGABRT at interpreter exit
(``exit_finished``, called by ``janus-train``'s ``main`` after a run that returned).

The mechanism: ``destroy_process_group`` only unregisters the groups; the DeepSpeed engine
(kept alive by its own hooks) still holds them, so gloo's transport and worker threads and the
TCPStore's thread run until Python's finalization destroys those objects in no particular order;
a ``std::thread`` destroyed while joinable calls ``std::terminate``: "terminate called without
an active exception" after the rank printed its results (seen in ``test_reduce_fp32``'s ZeRO-3
bf16 run; reproduced here in 1 of 40 ranks with the groups destroyed and a normal exit; none
of 60 ranks aborted with ``exit_finished``).
``exit_finished`` destroys the groups, runs the ``atexit`` handlers, flushes, and leaves with
``os._exit``: no finalization.

The exit path is repeated cheaply: one parent process imports torch and DeepSpeed once, then
for each repetition forks 2 ranks that run a ZeRO-3 bf16 step (a small MLP, the DeepSpeed config
from ``build_deepspeed_config``) and leave through ``exit_finished`` (``JANUS_NO_SHUTDOWN=1``:
through Python's own exit instead, a forked child running the interpreter's finalization).
Each rank's wait status is recorded. This file is also that script:
``python tests/test_clean_exit.py <repetitions> <out.json>``; ``JANUS_CORE_DIR`` keeps a core
file per aborted rank.

20 repetitions take 3-7 minutes on 2 loaded cores: ``heavy`` tier (``make test-heavy``). The
abort is a race (rare), so this test cannot produce it on demand; that ``main`` takes this exit
is checked in ``test_train_unit.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_utils import free_port, torchrun_env  # noqa: E402

SELF = str(Path(__file__).resolve())


def _rank(rank: int, port: int, shutdown: bool) -> None:
    """One rank: a ZeRO-3 bf16 step on 2 CPU ranks, then (``shutdown``) the process groups
    destroyed as ``janus-train`` does before exiting."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_PORT=str(port))
    import deepspeed
    import torch

    from janus_train.batch import plan_batch
    from janus_train.trainer.config import DeepSpeedConfig
    from janus_train.trainer.distributed import (
        build_deepspeed_config,
        exit_finished,
        setup_distributed,
    )

    setup_distributed(timeout_s=120)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 32)
    ).to(torch.bfloat16)
    ds = build_deepspeed_config(DeepSpeedConfig(zero_stage=3), plan_batch(2, 1, 2), "bf16", 0, 1e-3)
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 3
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(rank)).bfloat16()
    engine.backward(engine(x).float().pow(2).mean())
    engine.step()
    if shutdown:
        exit_finished(0)


def repeat(reps: int, out: str, shutdown: bool = True) -> None:
    """Fork 2 ranks ``reps`` times; write every rank's wait status to ``out``."""
    import deepspeed  # noqa: F401  # imported once here, inherited by every fork
    import torch  # noqa: F401

    statuses = []
    for _ in range(reps):
        port = free_port()
        pids = []
        for rank in range(2):
            pid = os.fork()
            if pid == 0:  # the child: one rank, then Python's own exit (finalization)
                if os.environ.get("JANUS_CORE_DIR"):  # a core file per aborted rank, to debug
                    import resource

                    resource.setrlimit(resource.RLIMIT_CORE, (-1, -1))
                    d = Path(os.environ["JANUS_CORE_DIR"]) / f"r{len(statuses)}_{rank}"
                    d.mkdir(parents=True, exist_ok=True)
                    os.chdir(d)
                try:
                    _rank(rank, port, shutdown)
                except BaseException:  # noqa: BLE001
                    import traceback

                    traceback.print_exc()
                    os._exit(1)
                return
            pids.append(pid)
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            statuses.append(
                {"exit": os.WEXITSTATUS(status)}
                if os.WIFEXITED(status)
                else {"signal": os.WTERMSIG(status)}
            )
    Path(out).write_text(json.dumps(statuses))


def _run(reps: int, tmp_path) -> list[dict]:
    out = tmp_path / "statuses.json"
    res = subprocess.run(
        [sys.executable, SELF, str(reps), str(out)],
        env=torchrun_env(),
        capture_output=True,
        text=True,
        timeout=60 + 60 * reps,
    )
    assert res.returncode == 0 and out.exists(), res.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.heavy
@pytest.mark.dist
def test_finished_zero3_bf16_ranks_exit_0_twenty_times(tmp_path):
    statuses = _run(20, tmp_path)
    assert statuses == [{"exit": 0}] * 40, statuses


if __name__ == "__main__":
    repeat(int(sys.argv[1]), sys.argv[2], shutdown=os.environ.get("JANUS_NO_SHUTDOWN") != "1")
