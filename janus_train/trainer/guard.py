"""The one guard around a training run: whatever ends it, the run's resources are released.

``with RunGuard(stop_grace_s) as guard:`` installs the stop-signal handler (SIGTERM / SIGUSR1
only set a flag, :class:`~janus_train.trainer.checkpoint.StopSignal`); resources registered with
``guard.add`` (the loader, the metrics logger, the progress bar) are closed in reverse order on a
normal end, an exception, Ctrl-C or a stop signal, and the previous signal handlers come back.
Closing the loader stops its worker processes (terminated, killed after a grace period), so an
error never leaves the process waiting at exit for workers.

A stop signal is honoured at the next step boundary, which a rank blocked in a collective (a peer
died or froze) never reaches, and Python runs signal handlers only between bytecodes of the main
thread. So the C-level signal handler also writes to a pipe (``signal.set_wakeup_fd``) read by a
watchdog thread: once a stop signal arrived, the loop must call ``guard.progress()`` at least
every ``stop_grace_s`` seconds (it does after every step, evaluation and checkpoint); otherwise
the process exits with :data:`EXIT_STUCK` (the last committed checkpoint stays valid; loader
workers die with their parent, see ``janus_train.data.workers``).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import threading
import time

from janus_train.trainer.checkpoint import StopSignal

logger = logging.getLogger(__name__)

EXIT_STUCK = 70
"""Exit status when a stop signal could not be honoured within ``train.stop_grace_s`` (a rank
stuck in a collective or a step): BSD EX_SOFTWARE, a crash for the scheduler."""


class RunGuard:
    """Context manager: stop signals, the stuck-stop watchdog and ordered clean-up."""

    def __init__(self, stop_grace_s: float) -> None:
        if stop_grace_s <= 0:
            raise ValueError(f"train.stop_grace_s must be > 0, got {stop_grace_s}")
        self.grace = float(stop_grace_s)
        self.stop: StopSignal | None = None
        self._resources: list = []
        self._last_progress = time.monotonic()
        self._pipe: tuple[int, int] | None = None
        self._old_wakeup_fd = -1
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunGuard:
        self.stop = StopSignal()
        rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)  # the C handler must never block
        self._pipe = (rfd, wfd)
        self._old_wakeup_fd = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="janus-stop-watchdog", daemon=True)
        self._thread.start()
        return self

    def add(self, resource):
        """Close ``resource`` (anything with ``close()``) when the guarded block ends; returns
        it. Resources close in reverse order of registration."""
        self._resources.append(resource)
        return resource

    def progress(self) -> None:
        """The loop is alive (a step, an evaluation or a save completed)."""
        self._last_progress = time.monotonic()

    @property
    def stop_requested(self) -> bool:
        return self.stop is not None and self.stop.requested

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            for res in reversed(self._resources):
                try:
                    res.close()
                except Exception:  # noqa: BLE001  # one failing close must not skip the others
                    logger.exception("closing %s failed", type(res).__name__)
            self._resources.clear()
        finally:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            rfd, wfd = self._pipe
            os.close(wfd)  # EOF ends the watchdog
            self._thread.join(timeout=5)
            os.close(rfd)
            self.stop.restore()
        return False

    def _watch(self) -> None:
        rfd = self._pipe[0]
        stop_bytes = {int(s) for s in StopSignal.SIGNALS}
        signalled_at = None
        poll = min(1.0, self.grace / 4)
        while True:
            ready, _, _ = select.select([rfd], [], [], None if signalled_at is None else poll)
            if ready:
                try:
                    data = os.read(rfd, 64)
                except OSError:
                    return
                if not data:  # write end closed: the guard exited
                    return
                if signalled_at is None and stop_bytes.intersection(data):
                    signalled_at = time.monotonic()
            if signalled_at is not None:
                idle = time.monotonic() - max(signalled_at, self._last_progress)
                if idle > self.grace:
                    self._abort(idle)

    def _abort(self, idle: float) -> None:
        msg = (
            f"janus_train: no progress for {idle:.0f} s after a stop signal "
            f"(train.stop_grace_s={self.grace:g}): a rank is stuck (in a collective or a "
            f"step); exiting {EXIT_STUCK} without a new checkpoint\n"
        )
        try:
            sys.stderr.write(msg)
            sys.stderr.flush()
        finally:
            os._exit(EXIT_STUCK)
