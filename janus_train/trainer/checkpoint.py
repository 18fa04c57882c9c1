"""Atomic, auto-resuming checkpoints and preemption signals.

Layout under ``run_dir/checkpoints``::

    step_00000200/                  DeepSpeed files + trainer_state_rank{r}.pt (loader, RNG)
    step_00000400/
    latest                          name of the newest *committed* checkpoint, written last
    .tmp-step_00000600/step_...     a save in progress (or killed mid-way: ignored, removed)

A save writes everything into ``.tmp-<tag>/<tag>`` on every rank, barriers, then rank 0 renames
the directory into place and replaces ``latest`` atomically (write + ``os.replace``). A kill at
any moment therefore leaves ``latest`` naming a complete checkpoint. Resume reads only
``latest``.

SIGTERM / SIGUSR1 (Slurm's pre-emption notice) only set a flag; the loop all-reduces it with the
next step's token counts, finishes that step, checkpoints, and exits with :data:`EXIT_REQUEUE`.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

from janus_train import compat
from janus_train.trainer.distributed import DistInfo, barrier

logger = logging.getLogger(__name__)

EXIT_REQUEUE = 75
"""Exit status after a checkpoint on SIGTERM/SIGUSR1: "requeue me" (BSD EX_TEMPFAIL)."""
LATEST = "latest"
UNIVERSAL_SUFFIX = "_universal"
_TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def get_rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def read_latest(ckpt_dir: str | os.PathLike) -> str | None:
    """Tag named by ``latest`` when it exists and points at a directory, else None."""
    p = Path(ckpt_dir) / LATEST
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    if not (Path(ckpt_dir) / tag).is_dir():
        raise RuntimeError(f"{p} names {tag!r}, which does not exist: the run dir was edited")
    return tag


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _commit(src: Path, dst: Path) -> None:
    """Rank 0: move a completely written checkpoint into place, then point ``latest`` at it."""
    if dst.exists():  # a previous save of this tag committed but never became `latest`
        shutil.rmtree(dst)
    os.rename(src, dst)
    _write_atomic(dst.parent / LATEST, dst.name)


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    latest = read_latest(ckpt_dir)
    tags = sorted(d.name for d in ckpt_dir.iterdir() if d.is_dir() and _TAG_RE.match(d.name))
    for tag in tags[: max(0, len(tags) - keep_last)]:
        if tag != latest:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    for d in ckpt_dir.glob(f"*{UNIVERSAL_SUFFIX}"):  # conversions of older checkpoints
        if d.name != f"{latest}{UNIVERSAL_SUFFIX}":
            shutil.rmtree(d, ignore_errors=True)


def save_checkpoint(
    engine,
    ckpt_dir: str | os.PathLike,
    step: int,
    client_state: dict,
    rank_state: dict,
    info: DistInfo,
    keep_last: int,
) -> str:
    """Collective: every rank writes its shards and ``rank_state``; rank 0 commits. Returns the
    tag. ``client_state`` (same on all ranks) goes into DeepSpeed's files, ``rank_state``
    (loader position, RNG) into ``trainer_state_rank{r}.pt``."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tmp_root = ckpt_dir / f".tmp-{tag}"
    if info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_root, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(tmp_root), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rank_state, tmp_root / tag / f"trainer_state_rank{info.rank}.pt")
    barrier()
    if info.is_main:
        _commit(tmp_root / tag, ckpt_dir / tag)
        shutil.rmtree(tmp_root, ignore_errors=True)
        _prune(ckpt_dir, keep_last)
    barrier()
    return tag


def saved_world_size(ckpt_dir: str | os.PathLike) -> int | None:
    """Ranks that wrote the checkpoint ``latest`` names (None when there is none)."""
    tag = read_latest(ckpt_dir)
    if tag is None:
        return None
    return len(list((Path(ckpt_dir) / tag).glob("trainer_state_rank*.pt")))


def convert_to_universal(ckpt_dir: str | os.PathLike, tag: str, info: DistInfo) -> str:
    """Collective: rank 0 converts ``tag`` into a DeepSpeed universal checkpoint
    ``<tag>_universal`` beside it (once; written under ``.tmp-`` and renamed, so complete or
    absent), which any world size loads. Returns the universal tag."""
    ckpt_dir = Path(ckpt_dir)
    out = ckpt_dir / f"{tag}{UNIVERSAL_SUFFIX}"
    if info.is_main and not out.is_dir():
        tmp = ckpt_dir / f".tmp-{out.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        logger.info("converting %s to a universal checkpoint (world size changed)", tag)
        compat.convert_to_universal(str(ckpt_dir / tag), str(tmp))
        for f in (ckpt_dir / tag).glob("trainer_state_rank*.pt"):
            shutil.copy2(f, tmp / f.name)
        os.rename(tmp, out)
        # ds_to_universal also points a `latest_universal` file at its (temporary) output;
        # resume reads only `latest`
        (ckpt_dir / "latest_universal").unlink(missing_ok=True)
    barrier()
    return out.name


def load_latest(
    engine, ckpt_dir: str | os.PathLike, info: DistInfo, universal: bool = False
) -> tuple[dict, list[dict]] | None:
    """Load the checkpoint ``latest`` names into ``engine``; returns ``(client_state,
    rank_states)`` or None when there is none. ``rank_states``: every saving rank's
    ``trainer_state_rank{r}.pt`` (loader position, RNG), in rank order. ``universal``: load the
    universal conversion of ``latest`` (:func:`convert_to_universal`; the engine must have been
    built with ``checkpoint.load_universal``). Removes leftovers of interrupted saves."""
    ckpt_dir = Path(ckpt_dir)
    if info.is_main and ckpt_dir.is_dir():
        for d in ckpt_dir.glob(".tmp-*"):
            logger.warning("removing %s: a save that never completed", d)
            shutil.rmtree(d, ignore_errors=True)
    barrier()
    tag = read_latest(ckpt_dir)
    if tag is None:
        return None
    if universal:
        tag = f"{tag}{UNIVERSAL_SUFFIX}"
    n = len(list((ckpt_dir / tag).glob("trainer_state_rank*.pt")))
    if n != info.world_size and not universal:
        raise RuntimeError(
            f"{ckpt_dir / tag} was written by {n} ranks, this run has "
            f"{info.world_size}: load its universal conversion"
        )
    path, client_state = engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt_dir / tag}")
    rank_states = [
        torch.load(
            ckpt_dir / tag / f"trainer_state_rank{r}.pt", map_location="cpu", weights_only=False
        )
        for r in range(n)
    ]
    logger.info("resumed from %s", ckpt_dir / tag)
    return client_state, rank_states


class StopSignal:
    """Records SIGTERM / SIGUSR1; the loop shares it with the next step's token-count
    all-reduce and checkpoints after that step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
