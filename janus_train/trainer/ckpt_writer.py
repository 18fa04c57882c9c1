"""The checkpoint writer: one daemon thread per process that runs the asynchronous phases of
saves (a rank's writes, rank 0's commit) in order, at a lower CPU priority than the loop.

A job can be submitted held (:class:`Job`'s ``go``): a save's writes start only once released
(:meth:`janus_train.trainer.ckpt_save.PendingSave.release`). The thread survives neither a fork
(the child starts its own) nor the interpreter's end (the exit waits, bounded, for the jobs
still running). The save order itself is in :mod:`janus_train.trainer.ckpt_save`.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

EXIT_WAIT_S = 60.0
"""How long the interpreter's exit waits for a save's job still running (every normal exit
path of the loop has waited for it already, ``PendingSave.wait``)."""


class Job:
    """One phase of an asynchronous save (its writes, or rank 0's commit) for the thread,
    which starts it once ``go`` is set (at once, unless submitted ``held``)."""

    def __init__(self, fn: Callable[[], None], tag: str, held: bool = False) -> None:
        self.fn, self.tag, self.done, self.go = fn, tag, threading.Event(), threading.Event()
        if not held:
            self.go.set()


_QUEUE: queue.SimpleQueue[Job] | None = None
PENDING: list[Job] = []
"""The jobs submitted and not yet seen done."""


WRITER_NICE = 10
"""How much lower the writer thread's CPU priority is than the loop's (Linux: a thread's nice
value is its own): it serializes, checksums and syncs with the cycles training leaves idle,
rather than taking a core from a rank's loop thread (on a host with few cores per rank)."""


def _lower_priority() -> None:
    try:
        me = threading.get_native_id()  # (relative: a run launched under `nice` stays lower)
        os.setpriority(os.PRIO_PROCESS, me, os.getpriority(os.PRIO_PROCESS, me) + WRITER_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: the default priority
        pass


def _work() -> None:
    _lower_priority()
    while True:
        job = _QUEUE.get()
        job.go.wait()
        try:
            job.fn()
        except BaseException:  # noqa: BLE001,S110  # (a test's stand-in for SIGKILL) the
            pass  # job's outcome stays "did not finish", which advance() raises on every rank
        finally:
            job.done.set()


def submit(fn: Callable[[], None], tag: str, held: bool = False) -> Job:
    """Runs ``fn`` in the process's one checkpoint thread, after the jobs before it. The
    thread is a daemon, started once (a thread start costs the loop milliseconds on a busy
    host): it never keeps a process alive, and idle it waits on a queue, where the end of
    the interpreter can stop it safely."""
    global _QUEUE
    if _QUEUE is None:
        _QUEUE = queue.SimpleQueue()
        threading.Thread(target=_work, name="janus-ckpt", daemon=True).start()
    job = Job(fn, tag, held)
    PENDING[:] = [j for j in PENDING if not j.done.is_set()] + [job]
    _QUEUE.put(job)
    return job


def _forget_writer_after_fork() -> None:
    """In a forked child: the parent's writer thread did not survive the fork, so the child's
    first job starts one of its own (else it would wait for ever on a queue nobody reads); the
    parent's jobs are not the child's to wait for at its exit."""
    global _QUEUE
    _QUEUE = None
    PENDING.clear()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_writer_after_fork)


@atexit.register
def _join_at_exit() -> None:
    """Waits (bounded) for the jobs still running before the interpreter finalizes: a daemon
    thread stopped there while inside torch's C++ writer can abort the process (``terminate
    called without an active exception``). A save abandoned here never counts (it stays
    under ``.tmp-``, removed at the next start)."""
    deadline = time.monotonic() + EXIT_WAIT_S
    for job in list(PENDING):
        job.go.set()
        if not job.done.wait(max(0.0, deadline - time.monotonic())):
            logger.warning(
                "checkpoint %s still being saved at exit after %.0f s: abandoned",
                job.tag,
                EXIT_WAIT_S,
            )
