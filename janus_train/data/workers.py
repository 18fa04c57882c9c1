"""Loader worker processes: started for a step dataset, their life tied to the trainer's,
stopped for sure.

A worker ignores the SIGUSR1/SIGTERM Slurm sends every process of a job (the trainer checkpoints,
then stops its workers with :func:`stop_workers`) and dies with the trainer when the trainer dies
without closing (:func:`init_worker`). ``data.num_workers=0`` builds the steps in the trainer's
own process, with no worker to start or stop.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from janus_train import compat
from janus_train.data.config import DataConfig


def init_worker(parent_pid: int, _worker_id: int) -> None:
    """A loader worker's life is tied to the trainer's.

    Slurm may signal every process of a job (workers included): only the trainer reacts to
    SIGUSR1/SIGTERM (checkpoint, then exit), so a worker ignores them, and the trainer kills it
    in :func:`stop_workers`. If the trainer dies without closing (SIGKILL, ``os._exit``), the
    worker must not outlive it: the kernel kills it with the parent (``PR_SET_PDEATHSIG``, Linux;
    the parent is the trainer under the fork and spawn contexts), and a thread polls the trainer's
    pid (every context, every OS; forkserver workers' parent is the fork server).
    """
    import signal
    import threading
    import time

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else (pid reused): treat as gone
            return False
        return True

    direct = os.getppid() == parent_pid  # fork / spawn: a dead parent means a new ppid

    def watch() -> None:
        while alive(parent_pid) and not (direct and os.getppid() != parent_pid):
            time.sleep(1.0)
        os._exit(1)

    if not alive(parent_pid):  # died between the fork and here
        os._exit(1)
    threading.Thread(target=watch, name="janus-parent-watch", daemon=True).start()


def start_workers(dataset: IterableDataset, dcfg: DataConfig) -> Iterator:
    """An iterator over ``dataset``'s items: from ``data.num_workers`` worker processes (each
    running its own copy of ``dataset``), or from this process when it is 0."""
    if dcfg.num_workers == 0:
        return iter(dataset)
    return iter(
        DataLoader(
            dataset,
            batch_size=None,
            num_workers=dcfg.num_workers,
            prefetch_factor=dcfg.prefetch_factor,
            persistent_workers=False,
            pin_memory=dcfg.pin_memory and torch.cuda.is_available(),
            multiprocessing_context=dcfg.mp_context,
            worker_init_fn=functools.partial(init_worker, os.getpid()),
        )
    )


def stop_workers(it: Iterator) -> None:
    """Stop the worker processes of ``it`` (from :func:`start_workers`): asked to finish, killed
    when they have not after torch's grace (5 s per worker)."""
    workers, shutdown = compat.dataloader_workers(it)
    if shutdown is None:
        return
    # torch's shutdown asks each worker to finish, joins it with a timeout, then sends
    # SIGTERM, which workers ignore (init_worker): a worker busy in a long step or blocked
    # on a full queue would keep this process waiting at exit forever. Kill what is left.
    try:
        shutdown()
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
            w.join(timeout=5)


def worker_pids(it: Iterator | None) -> list[int]:
    """The worker processes' pids of ``it`` (none in-process or before a start)."""
    return [w.pid for w in compat.dataloader_workers(it)[0]] if it is not None else []
