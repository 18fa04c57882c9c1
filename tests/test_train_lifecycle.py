"""No hang on any exit path: the trainer ends, and leaves no process behind, when a data source
fails, when evaluation fails (with loader workers running, on 1 and 2 ranks), and when it gets
SIGTERM while stuck in a collective; loader workers die with their parent.

The command-line runs are real ``janus-train`` processes (tiny model, shards in tmp_path); every
process below them is recorded while they run and must be gone afterwards. This file is also
the worker script of the stuck-collective run: ``python tests/test_train_lifecycle.py stuck``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_utils import run_watched, torchrun_cmd  # noqa: E402

from janus_train.errors import EXIT_USER_ERROR  # noqa: E402

pytestmark = pytest.mark.dist
SELF = str(Path(__file__).resolve())
EXIT_BOUND_S = 30
# Short timeouts keep the stuck/frozen runs quick; the bounds asserted are stated in them. The
# stuck run's collective timeout stays far above its grace: the watchdog must be what ends it.
# The frozen run trains its first steps under a long timeout, then sets one scaled to its own
# measured step time (a loaded machine's slow steps must not time out before the freeze).
STUCK_GRACE_S, STUCK_COLLECTIVE_TIMEOUT_S = 2, 60
FROZEN_SETUP_TIMEOUT_S, FROZEN_MIN_TIMEOUT_S, FROZEN_STEPS_PER_TIMEOUT = 300, 10, 50


def _survivors(res, within_s: float = 1.0) -> list[int]:
    """Processes of the run still alive ``within_s`` after it ended (loader workers die with
    their parent, a moment later): polled, so a clean exit costs no wait."""
    deadline = time.monotonic() + within_s
    while (left := res.survivors()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _recipe(root: Path, bad: bool) -> Path:
    from janus_train.data.synthetic import caption_records, class_records
    from janus_train.data.tario import write_tar

    caps = caption_records(0, 40)
    if bad:  # good records first (a few steps run), then only bad ones
        caps = caps[:8] + [
            (f"{i:06d}", {"jpg": b"not an image", "txt": b"a red circle"}) for i in range(8, 40)
        ]
    write_tar(root / "cap-0.tar", caps)
    write_tar(root / "cls-0.tar", class_records(0, 40))
    path = root / "recipe.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "lifecycle",
                "sources": [
                    {
                        "name": "cap",
                        "task": "understanding",
                        "format": "caption",
                        "shards": str(root / "cap-0.tar"),
                    },
                    {
                        "name": "cls",
                        "task": "generation",
                        "format": "class_label",
                        "shards": str(root / "cls-0.tar"),
                    },
                ],
            }
        )
    )
    return path


def _heldout(root: Path) -> tuple[Path, Path]:
    """A held-out recipe globbing ``eval_data/*.tar`` (one good text shard: prepare's check
    passes) and that directory, which the eval-failure test removes once training runs."""
    from janus_train.data.synthetic import text_records
    from janus_train.data.tario import write_tar

    data = root / "eval_data"
    data.mkdir()
    write_tar(data / "text-0.tar", text_records(0, 4))
    src = {"name": "text", "task": "text", "format": "text", "shards": str(data / "*.tar")}
    path = root / "heldout.yaml"
    path.write_text(yaml.safe_dump({"name": "heldout", "sources": [src]}))
    return path, data


def _train_args(root: Path, recipe: Path, workers: int, extra=()) -> list[str]:
    return [
        "experiment=tiny",
        "stage=stage1",
        "deepspeed=zero2",
        f"experiment.stage1.data_recipe={recipe}",
        f"data.num_workers={workers}",
        "data.failure_min_samples=4",
        "data.max_failure_rate=0.5",
        "data.shuffle=false",
        f"train.run_dir={root}/run",
        "experiment.stage1.steps=6",
        "experiment.stage1.global_batch_size=4",
        "train.log_every=1",
        "train.ckpt_every=0",
        "train.export_at_end=false",
        "train.progress_bar=false",
        *extra,
    ]


@pytest.mark.parametrize(
    "failure,ranks,workers", [("data", 1, 2), ("data", 2, 1), ("eval", 1, 1), ("eval", 2, 2)]
)
def test_failure_exits_nonzero_and_leaves_no_process(tmp_path, failure, ranks, workers):
    recipe = _recipe(tmp_path, bad=failure == "data")
    extra, on_line = [], None
    if failure == "eval":  # held-out shards checked by prepare, gone by the first evaluation
        heldout, eval_data = _heldout(tmp_path)
        extra = [f"eval.recipe={heldout}", "eval.every=2", "eval.n_und=0", "eval.n_gen=0"]

        def on_line(line, proc):
            if "step 1/6" in line:
                shutil.rmtree(eval_data, ignore_errors=True)

    args = ["-m", "janus_train.train", *_train_args(tmp_path, recipe, workers, extra)]
    cmd = torchrun_cmd(args[1:], nproc=ranks, module=True) if ranks > 1 else [sys.executable, *args]
    # The data failure is near once a worker reports its first bad sample; the eval failure at
    # the first evaluation after step 1's log line (step 2, or 4 should the removal lag): the
    # held-out glob matches no shard any more.
    marker = "skipped a sample" if failure == "data" else "step 1/6"
    res = run_watched(cmd, marker, timeout=240, on_line=on_line)
    out = res.output
    # both are user errors: one line naming the field / file, exit 2 (a rank's, under torchrun)
    codes = (
        [res.returncode]
        if ranks == 1
        else [int(x) for x in re.findall(r"exitcode\s*:\s*(-?\d+)", out)]
    )
    assert EXIT_USER_ERROR in codes, (codes, out[-3000:])
    line = [ln for ln in out.splitlines() if "janus-train: error:" in ln][0]
    assert ("data.max_failure_rate" if failure == "data" else "heldout.yaml") in line, line
    assert res.seconds_after_marker is not None, out[-3000:]
    assert res.seconds_after_marker < EXIT_BOUND_S, (res.seconds_after_marker, out[-3000:])
    # the ranks and their loader workers ran (the agent's ranks under torchrun)
    assert len(res.descendants) >= ranks * workers + (ranks if ranks > 1 else 0)
    assert _survivors(res) == [], out[-3000:]


@pytest.mark.heavy
def test_sigkill_resume_and_reshard_on_real_shards_with_workers(tmp_path):
    """The real WebDataset loader with 2 workers per rank, 2 ranks: a run SIGKILLed (the whole
    process tree) after step 3 resumes and equals an uninterrupted run bitwise (per-step
    losses: same weights, optimizer state and loader position); a run stopped at step 4
    continues on 1 rank (universal checkpoint) to the end, each step logged once. Heavy tier:
    five launches."""
    recipe = _recipe(tmp_path, bad=False)

    def launch(name, nproc, extra=(), kill_at=None):
        args = _train_args(tmp_path / name, recipe, 2, ["train.ckpt_every=1", *extra])
        cmd = torchrun_cmd(["-m", "janus_train.train", *args][1:], nproc=nproc, module=True)

        def on_line(line, proc):
            if kill_at and kill_at in line:
                os.killpg(proc.pid, signal.SIGKILL)

        res = run_watched(cmd, kill_at or "step 1/6", timeout=400, on_line=on_line)
        assert _survivors(res, within_s=10) == [], res.output[-3000:]
        return res

    def losses(name):
        return [(r["step"], r["loss"]) for r in _rows(tmp_path / name / "run") if "loss" in r]

    assert launch("ref", 2).returncode == 0
    killed = launch("chain", 2, kill_at="step 3/6")
    assert killed.returncode != 0
    assert launch("chain", 2).returncode == 0
    ref = losses("ref")
    assert len(ref) == 6 and losses("chain") == ref  # bitwise, each step once
    assert launch("reshard", 2, ["experiment.stage1.stop_at=4"]).returncode == 0
    res = launch("reshard", 1)
    assert res.returncode == 0, res.output[-3000:]
    assert "written by 2 ranks, this run has 1" in res.output
    got = losses("reshard")
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
    assert got[:4] == ref[:4]  # the 2-rank part of it is the reference run


# ---------------------------------------------------------------------------------------------
# SIGTERM while stuck in a collective
# ---------------------------------------------------------------------------------------------
def scenario(root: str, mode: str) -> None:
    """``stuck``: rank 1 stops taking part before step 2 (sleeps), so rank 0 blocks in that
    step's all-reduce; rank 1 writes ``stuck`` when it stops. ``frozen``: a long run with a
    short collective timeout (the test SIGSTOPs a rank). Each rank writes its pid."""
    import torch.distributed as dist

    from janus_train import train
    from janus_train.config import compose, to_run_config
    from janus_train.data.synthetic_loader import SyntheticStepLoader
    from janus_train.trainer.distributed import set_collective_timeout

    orig = SyntheticStepLoader.next_step
    started: list[float] = []

    def next_step(self):
        if mode == "stuck" and self.step == 1 and dist.get_rank() == 1:
            (Path(root) / "stuck").write_text("1")
            time.sleep(3600)
        if mode == "frozen" and self.step == 0:
            started.append(time.monotonic())
        if mode == "frozen" and self.step == 2:  # 2 steps measured: the real timeout
            step_s = (time.monotonic() - started[0]) / 2
            timeout = max(FROZEN_MIN_TIMEOUT_S, FROZEN_STEPS_PER_TIMEOUT * step_s)
            set_collective_timeout(timeout)
            (Path(root) / f"timeout{dist.get_rank()}").write_text(str(timeout))
        return orig(self)

    SyntheticStepLoader.next_step = next_step
    steps = 4 if mode == "stuck" else 500
    timeout = STUCK_COLLECTIVE_TIMEOUT_S if mode == "stuck" else FROZEN_SETUP_TIMEOUT_S
    run = to_run_config(
        compose(
            [
                "stage=stage1",
                "deepspeed=zero2",
                "train.synthetic_data=true",
                f"train.run_dir={root}",
                f"experiment.stage1.steps={steps}",
                "experiment.stage1.global_batch_size=2",
                "train.log_every=1",
                "train.ckpt_every=0",
                "train.export_at_end=false",
                "train.progress_bar=false",
                "train.synthetic_seq_len=32",
                f"train.stop_grace_s={STUCK_GRACE_S}",
                f"train.collective_timeout_s={timeout}",
            ]
        )
    )
    (Path(root) / f"pid{os.environ['RANK']}").write_text(str(os.getpid()))
    rc = train.run(run)
    from janus_train.trainer.distributed import exit_finished

    exit_finished(rc)  # as janus-train's main does after a run that returned


def test_sigterm_to_a_rank_stuck_in_a_collective_ends_it(tmp_path):
    from janus_train.trainer.guard import EXIT_STUCK

    sent: list[float] = []

    def on_line(line, proc):  # noqa: ARG001
        # Step 1 is logged after its collectives, so rank 0's stop flag can only travel in
        # step 2's all-reduce, which rank 1 never joins: the signal may come at any moment
        # from here on (no sleep needed for rank 0 to be inside the collective).
        if not sent and "step 1/4" in line:
            deadline = time.monotonic() + 120
            while not (tmp_path / "stuck").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(int((tmp_path / "pid0").read_text()), signal.SIGTERM)
            sent.append(time.monotonic())

    res = run_watched(
        torchrun_cmd([SELF, "stuck", str(tmp_path)], nproc=2),
        "step 1/4",
        timeout=240,
        on_line=on_line,
    )
    assert sent, res.output[-3000:]
    assert res.returncode != 0
    assert f"exiting {EXIT_STUCK}" in res.output, res.output[-3000:]
    # the bound grows with the step time this machine measured (a loaded machine is slower)
    step_s = [r for r in _rows(tmp_path) if r["step"] == 1][0]["speed/step_time_s"]
    bound = EXIT_BOUND_S + 20 * step_s
    assert res.seconds_after_marker < bound, (res.seconds_after_marker, bound)
    assert _survivors(res) == [], res.output[-3000:]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_frozen_rank_makes_the_others_exit_after_the_collective_timeout(tmp_path):
    """SIGSTOP on rank 1 mid-run: rank 0 fails within its collective timeout + 60 s instead of
    torch's 30 min (the timeout: 50 of the run's measured steps, at least 10 s)."""
    from dist_utils import _start_time

    stopped: list[float] = []
    rank0_gone: list[float] = []

    def on_line(line, proc):  # noqa: ARG001
        if not stopped and "step 3/500" in line:
            os.kill(int((tmp_path / "pid1").read_text()), signal.SIGSTOP)
            stopped.append(time.monotonic())
            pid0 = int((tmp_path / "pid0").read_text())
            t0 = _start_time(pid0)

            def watch():
                while _start_time(pid0) == t0:
                    time.sleep(0.2)
                rank0_gone.append(time.monotonic())
                try:  # let the frozen rank see the agent's SIGTERM (or die of its SIGKILL)
                    os.kill(int((tmp_path / "pid1").read_text()), signal.SIGCONT)
                except OSError:
                    pass

            import threading

            threading.Thread(target=watch, daemon=True).start()

    try:
        res = run_watched(
            torchrun_cmd([SELF, "frozen", str(tmp_path)], nproc=2),
            "step 3/500",
            timeout=300,
            on_line=on_line,
        )
    finally:
        if (tmp_path / "pid1").exists():
            try:
                os.kill(int((tmp_path / "pid1").read_text()), signal.SIGCONT)
            except OSError:
                pass
    assert stopped and rank0_gone, res.output[-3000:]
    assert res.returncode != 0
    took = rank0_gone[0] - stopped[0]
    timeout = float((tmp_path / "timeout0").read_text())
    assert took < timeout + 60, (took, timeout, res.output[-3000:])
    assert _survivors(res) == [], res.output[-3000:]


if __name__ == "__main__":
    scenario(sys.argv[2], sys.argv[1])
