"""Start-up at scale: ``model.init_from`` read from the shared file system once per node.

Every rank loads the whole checkpoint (memory-mapped safetensors, in the training dtype:
``janus_train.model.build_model``), unless it is loaded partitioned (ZeRO-3: rank 0 reads it
whole, the others only the VQ's tensors; then no copy is made, :func:`node_copy_root`). Read straight from a shared file system, a 256-rank job
fetches it 256 times at every start and requeue. Instead, one rank per node (the lowest rank on
each host) copies the directory into node-local storage (``train.init_from_node_copy``,
``/dev/shm`` by default: on tmpfs the copy *is* the memory the node's ranks then map, no second
copy), and the node's ranks load that copy::

    all ranks:     exchange hostnames -> the node's leader (lowest rank on the host)
    node leader:   free space >= size? copy init_from -> <root>/janus_init_<key> (replacing
                   what a killed attempt of the same job left there)
    all ranks:     exchange (copy ok, its path) -> load the leader's copy if every node's copy
                   succeeded and it is visible here, else init_from itself (warned)
    all ranks:     (load) -> exchange "loaded" -> the leader removes its copy

The exchanges are an all-gather of small objects (``trainer.distributed.all_gather_objects``
in the trainer; tests pass a thread stand-in). A rank whose load raises still joins the last
exchange, so the others never wait on it; a mapped file stays readable after its removal
(Linux keeps unlinked pages while mapped).

A rank killed during the load (SIGKILL, OOM, preemption) never removes the copy: on tmpfs it
holds node memory. Its name is therefore a key of the user, the job (``SLURM_JOB_ID``, kept
across requeues, else torchrun's ``MASTER_PORT``, distinct between concurrent jobs of a node)
and the resolved ``init_from``, not a random one: the next attempt finds and replaces it, so
one job leaks at most one copy per node, and only until it runs again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

Exchange = Callable[[object], list]
"""All-gather of a small picklable object: ``[obj of rank 0, ..., obj of rank world-1]``."""


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def copy_name(src: Path) -> str:
    """The node copy's directory name: ``janus_init_<key>``, the same for every attempt of a
    job (see the module docstring)."""
    job = os.environ.get("SLURM_JOB_ID") or "port" + os.environ.get("MASTER_PORT", "")
    key = f"{os.getuid()}:{job}:{src.resolve()}"
    return "janus_init_" + hashlib.sha1(key.encode()).hexdigest()[:16]


def _copy(src: Path, root: Path) -> tuple[str | None, str]:
    """(the copy's path or None, why not)."""
    need = _size(src)
    where = f"train.init_from_node_copy={root}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        dst = root / copy_name(src)
        if dst.exists():  # a killed attempt's copy (possibly partial): its space comes back
            logger.warning("%s: replacing %s, left by an earlier attempt", where, dst)
            shutil.rmtree(dst)
        free = shutil.disk_usage(root).free
        if free < need * 1.02:
            return None, f"{where}: {free / 2**30:.1f} GiB free < {need / 2**30:.1f} GiB needed"
        shutil.copytree(src, dst)
    except OSError as e:
        return None, f"{where}: copy failed: {e}"
    return str(dst), ""


def node_copy_root(root: str | None, partitioned: bool) -> str | None:
    """``train.init_from_node_copy`` as the run uses it: None (no node copy) when ``model.init_from``
    is loaded partitioned (ZeRO-3, ``janus_train.model.build``), where rank 0 alone reads the
    model's tensors and every other rank only the VQ's (memory-mapped safetensors: only those
    bytes): a node leader's copy would read the whole checkpoint once per node for them. Every
    rank then reads ``init_from`` in place (logged, at INFO: rank 0's log)."""
    if root and partitioned:
        logger.info(
            "train.init_from_node_copy=%s not used: model.init_from is loaded partitioned (rank "
            "0 reads it whole, the other ranks only the VQ's tensors), read in place",
            root,
        )
        return None
    return root


@contextmanager
def node_local_init_from(
    init_from: str | None,
    root: str | None,
    rank: int,
    exchange: Exchange,
    host: str | None = None,
) -> Iterator[str | None]:
    """Yields the directory this rank loads ``init_from`` from: its node's copy under ``root``,
    or ``init_from`` itself (no ``root``, a node of one rank, a failed copy on any node).
    Collective: every rank enters and leaves it together. ``host``: this rank's node (default
    its hostname)."""
    if not init_from or not root:
        yield init_from
        return
    hosts = exchange(host or socket.gethostname())
    mine = [r for r, h in enumerate(hosts) if h == hosts[rank]]
    leader = mine[0] == rank
    if max(hosts.count(h) for h in set(hosts)) < 2:
        yield init_from  # one rank per node everywhere: nothing to share
        return
    copy, why = _copy(Path(init_from), Path(root)) if leader and len(mine) > 1 else (None, "")
    told = exchange((copy, why))
    failed = [w for w in (w for _, w in told) if w]
    src = told[mine[0]][0]
    if failed or len(mine) == 1 or src is None or not (Path(src) / "config.json").is_file():
        if failed and rank == 0:
            logger.warning("model.init_from read by every rank: %s", failed[0])
        src = init_from
    try:
        yield src
    finally:
        exchange("loaded")
        if copy:
            shutil.rmtree(copy, ignore_errors=True)
