"""Atomic, verified, durable, auto-resuming checkpoints and preemption signals.

Layout under ``run_dir/checkpoints``::

    step_00000200/                  DeepSpeed files + trainer_state_rank{r}.pt (loader, RNG)
        manifest.json               every file's size and CRC-32, written last
    step_00000400/
    latest                          name of the newest *committed* checkpoint, written last
    .tmp-step_00000600/step_...     a save in progress (or killed mid-way: ignored, removed)
    step_00000400.bad               a checkpoint that failed verification, renamed aside

Saving (:mod:`janus_train.trainer.ckpt_save`: the save order, its durability, a full disk,
asynchronous writes) commits a checkpoint by renaming ``.tmp-<tag>/<tag>`` into place and
then replacing ``latest``; everything before is invisible to resume. This module holds the
layout, the durable-write helpers both sides use, and the reading side.

Resume (:func:`select_checkpoint`, collective) verifies the checkpoint ``latest`` names (its
manifest is for that step, lists every rank's state file, and every file has its size and
CRC-32; the ranks share the reading) and, when it does not verify or does not load, falls back
to the newest older one that does: a warning naming the bad file, the bad directory renamed
aside (``<tag>.bad``, kept for inspection), ``latest`` rewritten, the count in
``ckpt/fallbacks``. When none verifies the run stops with one line naming the directory
(exit 2) and renames nothing. (A directory where no checkpoint has a manifest was written
before manifests existed: ``latest`` is loaded unverified, with a warning.)

SIGTERM / SIGUSR1 (Slurm's pre-emption notice) only set a flag; the loop all-reduces it with the
next step's token counts, finishes that step, checkpoints, and exits with :data:`EXIT_REQUEUE`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import zlib
from pathlib import Path

import numpy as np
import torch

from janus_train import compat
from janus_train.errors import one_line
from janus_train.trainer.distributed import DistInfo, all_gather_objects, barrier

logger = logging.getLogger(__name__)

EXIT_REQUEUE = 75
"""Exit status after a checkpoint on SIGTERM/SIGUSR1: "requeue me" (BSD EX_TEMPFAIL)."""
LATEST = "latest"
MANIFEST = "manifest.json"
UNIVERSAL_SUFFIX = "_universal"
TAG_RE = re.compile(r"^step_(\d{8})$")
_CHUNK = 8 << 20


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


# ---- durability ------------------------------------------------------------------------------
def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Makes the directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ---- manifest --------------------------------------------------------------------------------
def crc32_file(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def checkpoint_bytes(d: Path) -> int:
    """Size of a checkpoint directory (from its manifest when it has one)."""
    try:
        return sum(f["size"] for f in json.loads((d / MANIFEST).read_text())["files"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) if d.is_dir() else 0


def load_module_state(src: dict, dst: torch.nn.Module) -> None:
    """DeepSpeed's strict module load, less the frozen VQ's tensors of a checkpoint written
    while the VQ was still inside the engine: it is now held outside it
    (``janus_train.model.vq_codes.detach_vq``) and, frozen, comes from the model build."""
    from janus_train.model.vq_codes import VQ_PATH  # here: the model package imports in seconds

    expected = set(dst.state_dict())
    legacy = f"janus.{VQ_PATH}."
    dst.load_state_dict(
        {k: v for k, v in src.items() if k in expected or not k.startswith(legacy)}, strict=True
    )


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


# ---- verification and fallback ---------------------------------------------------------------
def _local_problems(d: Path, info: DistInfo) -> list[str]:
    """What is wrong with checkpoint directory ``d``, as far as this rank checks: the manifest
    (every rank) and its share of the files (by index)."""
    mf = d / MANIFEST
    try:
        m = json.loads(mf.read_text())
        files, step, world = m["files"], int(m["step"]), int(m["world_size"])
    except FileNotFoundError:
        return [f"{mf} is missing"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{mf} is unreadable ({type(e).__name__}: {e})"]
    match = TAG_RE.match(d.name)
    if match and int(match.group(1)) != step:
        return [f"{mf} is the manifest of step {step}, not of {d.name}"]
    out = [
        f"{d / name} is missing from the manifest"
        for r in range(world)
        if (name := f"trainer_state_rank{r}.pt") not in files
    ]
    for i, (rel, want) in enumerate(sorted(files.items())):
        if i % info.world_size != info.rank:
            continue
        p = d / rel
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            out.append(f"{p} is missing")
            continue
        if size != want["size"]:
            out.append(f"{p} has {size} bytes, the manifest says {want['size']}")
        elif crc32_file(p) != want["crc32"]:
            out.append(f"{p} fails its CRC-32 check")
    return out


def verify_checkpoint(d: str | os.PathLike, info: DistInfo) -> list[str]:
    """Collective: every problem of checkpoint directory ``d`` (empty: it verifies); the ranks
    share the reading and all return the same list."""
    out: list[str] = []
    for part in all_gather_objects(_local_problems(Path(d), info)):
        out += [p for p in part if p not in out]
    return out


def _aside(d: Path) -> Path:
    dst = d.with_name(d.name + ".bad")
    n = 1
    while dst.exists():
        n += 1
        dst = d.with_name(f"{d.name}.bad{n}")
    os.rename(d, dst)
    return dst


def clear_partial_saves(ckpt_dir: str | os.PathLike, info: DistInfo) -> None:
    """Collective: rank 0 removes what saves that never completed left (``.tmp-*``), before
    any rank goes on. A process's saves write into ``.tmp-<tag>`` without a collective of
    their own, so this runs before its first one."""
    ckpt_dir = Path(ckpt_dir)
    if info.is_main and ckpt_dir.is_dir():
        for d in ckpt_dir.glob(".tmp-*"):
            logger.warning("removing %s: a save that never completed", d)
            shutil.rmtree(d, ignore_errors=True)
    barrier()


def select_checkpoint(
    ckpt_dir: str | os.PathLike, info: DistInfo, known_bad: dict[str, str] | None = None
) -> tuple[str | None, int]:
    """Collective: the newest checkpoint at or before ``latest`` that verifies (None when
    there is none at all), and how many newer ones were set aside for it. Leftovers of
    interrupted saves are removed. ``known_bad``: tags already found bad (e.g. failed to load)
    with the reason. A checkpoint directory without any that verifies: ``ValueError``."""
    ckpt_dir = Path(ckpt_dir)
    clear_partial_saves(ckpt_dir, info)
    known_bad = dict(known_bad or {})
    lp = ckpt_dir / LATEST
    latest = lp.read_text().strip() if lp.is_file() else None
    tags = (
        sorted(
            (d.name for d in ckpt_dir.iterdir() if d.is_dir() and TAG_RE.match(d.name)),
            reverse=True,
        )
        if ckpt_dir.is_dir()
        else []
    )
    if latest is None and not tags:
        return None, 0
    if latest in tags and not any((ckpt_dir / t / MANIFEST).is_file() for t in tags):
        logger.warning(
            "%s: written before checkpoints had manifests; resuming from %s unverified",
            ckpt_dir,
            latest,
        )
        return latest, 0
    bad: dict[str, str] = {}
    if latest is not None and not (ckpt_dir / latest).is_dir():
        bad[latest] = f"{ckpt_dir / latest} (named by {lp}) does not exist"
    chosen = None
    for tag in tags:
        if latest is not None and tag > latest:
            continue  # committed after `latest` moved for the last time: never counted
        problems = [known_bad[tag]] if tag in known_bad else verify_checkpoint(ckpt_dir / tag, info)
        if not problems:
            chosen = tag
            break
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        bad[tag] = problems[0] + more
    if chosen is None:
        detail = "; ".join(f"{t}: {p}" for t, p in bad.items()) or "none committed"
        raise ValueError(
            f"no checkpoint in {ckpt_dir} verifies ({detail}); move the directory away to "
            "start the stage over"
        )
    if bad and info.is_main:
        for tag, why in bad.items():
            msg = f"checkpoint {tag} is damaged: {why}"
            if (ckpt_dir / tag).is_dir():
                msg += f"; renamed to {_aside(ckpt_dir / tag).name} (kept for inspection)"
            logger.warning("%s; falling back to %s", msg, chosen)
        fsync_dir(ckpt_dir)
        if latest != chosen:
            write_atomic(lp, chosen)
    barrier()
    return chosen, len(bad)


def load_latest(
    engine, ckpt_dir: str | os.PathLike, info: DistInfo, universal: bool = False
) -> tuple[dict, list[dict], int] | None:
    """Collective: load the checkpoint ``latest`` names (chosen by :func:`select_checkpoint`)
    into ``engine``; returns ``(client_state, rank_states, fallbacks)`` or None when there is
    none. ``rank_states``: every saving rank's ``trainer_state_rank{r}.pt`` (loader position,
    RNG), in rank order. When loading fails on some rank the checkpoint is set aside like one
    that does not verify and the next older one is loaded (``fallbacks`` counts them).
    ``universal``: load the universal conversion of ``latest`` (:func:`convert_to_universal`;
    the engine must have been built with ``checkpoint.load_universal``), without fallback."""
    ckpt_dir = Path(ckpt_dir)
    fallbacks = 0
    while True:
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
        err = None
        try:
            path, client_state = engine.load_checkpoint(
                str(ckpt_dir),
                tag=tag,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
                custom_load_fn=load_module_state,
            )
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load {ckpt_dir / tag}")
            rank_states = [
                torch.load(
                    ckpt_dir / tag / f"trainer_state_rank{r}.pt",
                    map_location="cpu",
                    weights_only=False,
                )
                for r in range(n)
            ]
        except Exception as e:
            if universal:
                raise
            err = e
        why = None if err is None else f"{type(err).__name__}: {one_line(err)}"
        errors = [e for e in all_gather_objects(why) if e]
        if not errors:
            logger.info("resumed from %s", ckpt_dir / tag)
            return client_state, rank_states, fallbacks
        _, n_bad = select_checkpoint(
            ckpt_dir, info, known_bad={tag: f"{ckpt_dir / tag} does not load ({errors[0]})"}
        )
        fallbacks += n_bad


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
