"""Unit tests of the loop's guard (clean-up on every exit path, the stuck-stop watchdog), the
train state saved as one, and the metrics rows (dropped after the resumed step, one log line)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from janus_train.trainer.guard import EXIT_STUCK, RunGuard
from janus_train.trainer.metrics import MetricsLogger, drop_rows_after, format_row
from janus_train.trainer.state import TrainState


class _Res:
    def __init__(self, name, log, fail=False):
        self.name, self.log, self.fail = name, log, fail

    def close(self):
        self.log.append(self.name)
        if self.fail:
            raise OSError("close failed")


def test_guard_closes_everything_in_reverse_and_restores_handlers_on_exception():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    log: list[str] = []
    with pytest.raises(ZeroDivisionError):
        with RunGuard(60) as g:
            g.add(_Res("loader", log))
            g.add(_Res("metrics", log, fail=True))  # a failing close does not skip the rest
            g.add(_Res("bar", log))
            assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]
            os.kill(os.getpid(), signal.SIGUSR1)
            assert g.stop_requested
            raise ZeroDivisionError
    assert log == ["bar", "metrics", "loader"]
    assert {s: signal.getsignal(s) for s in before} == before
    assert signal.set_wakeup_fd(-1) == -1  # the guard's wakeup fd was removed


def _guarded_child(body: str, clock: bool = False) -> subprocess.CompletedProcess:
    """Run ``body`` inside ``RunGuard(1.0)`` in a child. ``clock``: the guard reads a fake
    monotonic clock that only ``tick(s)`` advances, so what the watchdog sees does not depend on
    how the (loaded) machine schedules the child."""
    code = "import os, signal, sys, time\nimport janus_train.trainer.guard as guard\n"
    if clock:
        code += (
            "class Clock:\n    now = 1000.0\n    def monotonic(self):\n        return self.now\n"
            "clock = guard.time = Clock()\n"
            "def tick(s):\n    clock.now += s\n    time.sleep(0.05)\n"
        )
    code += "with guard.RunGuard(1.0) as g:\n" + body
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_watchdog_ends_a_process_that_makes_no_progress_after_a_stop_signal():
    # The main thread never returns to a step boundary (a collective with a dead peer). The
    # child prints when it signalled itself (CLOCK_MONOTONIC: one clock for both processes),
    # so interpreter start-up under load does not count.
    res = _guarded_child(
        "    print(time.monotonic(), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(120)\n"
    )
    took = time.monotonic() - float(res.stdout.split()[0])
    assert res.returncode == EXIT_STUCK, res.stderr
    assert "train.stop_grace_s=1" in res.stderr
    assert took < 60, took  # grace 1 s + a poll; far below the 120 s the child would sleep


@pytest.mark.parametrize("progress", [True, False])
def test_watchdog_leaves_a_progressing_run_alone(progress):
    """2.4 s of (fake) time after the signal, more than the 1 s grace: progress every 0.3 s
    keeps the run alive; without it the same timeline ends it (the fake clock is live)."""
    res = _guarded_child(
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    for _ in range(8):\n"
        "        tick(0.3)\n"
        + ("        g.progress()\n" if progress else "")
        + "    time.sleep(1)\n"
        "    assert g.stop_requested\n",
        clock=True,
    )
    assert res.returncode == (0 if progress else EXIT_STUCK), res.stderr


def test_train_state_round_trip_through_client_state():
    s = TrainState(step=7, skipped_steps=2, consecutive_skips=1, wandb_id="abc")
    client = s.client_state()
    assert set(client) == {"janus_train"} and "resumed_from" not in client["janus_train"]
    back = TrainState.from_client_state(json.loads(json.dumps(client)))
    assert (back.step, back.skipped_steps, back.consecutive_skips, back.wandb_id) == (
        7,
        2,
        1,
        "abc",
    )
    assert back.resumed_from == 7 and TrainState().resumed_from is None


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path):
    m = MetricsLogger(tmp_path, enabled=True)
    for step in (1, 2, 3, 4):
        m.log({"step": step, "loss": float(step)})
    m.log({"step": 4, "eval/x": 1.0})
    MetricsLogger(tmp_path, enabled=True, resume_step=2)  # resumed from the step-2 checkpoint
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert drop_rows_after(tmp_path / "metrics.jsonl", 5) == 0
    MetricsLogger(tmp_path / "other", enabled=False, resume_step=0)  # other ranks: no file work


def test_log_line_has_step_losses_throughput_and_eta():
    rec = {
        "step": 40,
        "loss": 5.12345,
        "loss/und": 6.0,
        "loss/text": None,
        "loss/gen": 4.1,
        "optim/lr": 1e-3,
        "optim/grad_norm": 2.3141,
        "speed/tokens_per_s": 1234.4,
        "speed/step_time_s": 1.5,
    }
    line = format_row(rec, 100)
    assert line == (
        "step 40/100 loss 5.1235 (und 6.000 text - gen 4.100) lr 1.00e-03 "
        "grad 2.31 tok/s 1234 eta 0:01:30"
    )
