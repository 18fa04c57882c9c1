"""Saving a checkpoint: the save order, what makes it durable, a full disk, asynchronous writes.

The layout and the reading side (verification, fallback) are in
:mod:`janus_train.trainer.checkpoint`. The order of a save (:func:`begin_save`, then
:meth:`PendingSave.commit`); a kill or power loss at any point leaves ``latest`` naming a
complete checkpoint whose data is on disk:

1. every rank runs DeepSpeed's ``save_checkpoint`` (its collectives included, less its two
   barriers: :func:`~janus_train.compat.save_without_barriers`; the model's description
   reused from the first save: :func:`~janus_train.compat.reuse_save_metadata`) with the file
   writes captured as host-memory snapshots (a) -- the only part the loop waits for with
   ``train.ckpt_async``. No collective of ours runs at the save: each rank makes
   ``.tmp-<tag>/<tag>`` (DeepSpeed's ``makedirs``; the writer too, for its files), and
   leftovers of earlier runs were removed once, when the
   :class:`~janus_train.trainer.state.Checkpointer` was made. Then, inline or in the writer
   thread of that rank (b), which starts once every rank has taken its snapshots (released
   after the next step's all-reduce: :meth:`PendingSave.release`) while training goes on:
2. rank 0 checks the free space against the previous checkpoint's size (a warning when the
   save would leave less than one checkpoint of room); every rank writes its snapshots and
   ``trainer_state_rank{r}.pt`` into ``.tmp-<tag>/<tag>``;
3. every rank fsyncs the files it wrote itself and computes their size and CRC-32 (same thread):
   its captured snapshots, its ``trainer_state_rank{r}.pt`` and whatever DeepSpeed wrote on that
   rank outside its checkpoint engine (:class:`~janus_train.trainer.ckpt_capture.WrittenHere`).
   On a multi-node shared file system only the writer's fsync flushes its node's client cache,
   so no rank syncs another's file (a file no rank saw itself write is synced by rank 0, with a
   warning);
4. the commit, a collective on the main thread of every rank: synchronously, or (async) at
   the first step boundary at which every rank's writer has finished (a flag in the step's
   token-count all-reduce), and at the latest before the next save, at the end of the stage and
   after a stop signal. When only the agreement on rank 0's commit is left at the next save, that
   save carries it: rank 0's writer thread runs the commit first, and the new save's flags
   (every rank done, none failed) agree on both; a failed commit is raised on every rank at
   that agreement. Rank 0 merges the ranks' file lists (each rank's writer left its
   list in ``.tmp-<tag>/files_rank{r}.json``; they are gathered instead when the flags are not
   known or some rank failed), writes ``manifest.json`` (fsynced), then fsyncs the directories
   (``<tag>``, its subdirectories, ``.tmp-<tag>``) once every rank's files are synced; steps
   4-7 run in rank 0's writer thread with ``train.ckpt_async``;
5. rank 0 renames ``.tmp-<tag>/<tag>`` to ``<tag>`` and fsyncs ``checkpoints/``;
6. rank 0 writes ``latest.tmp`` (fsynced), ``os.replace``-s it onto ``latest`` and fsyncs
   ``checkpoints/`` again: from here on the checkpoint counts;
7. rank 0 prunes to ``train.keep_last``.

An error that ends the run while a save is pending: rank 0 still commits it, alone, when every
rank's writer has finished (each left its list; no collective is needed); otherwise it stays
under ``.tmp-``, ``latest`` stays the previous checkpoint and the next start removes it.

A save that fails for lack of space (ENOSPC, a quota, torch's "unexpected pos") on any rank
removes the partial directory, leaves ``latest`` alone and raises
:class:`~janus_train.errors.StorageFull` on every rank (exit 3). When the space runs out after
``latest`` has moved (its directory's fsync), the checkpoint counts: the line says it was
committed, nothing is pruned, and the run still stops with exit 3.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from janus_train import compat
from janus_train.errors import StorageFull, is_storage_full, one_line
from janus_train.trainer.checkpoint import (
    LATEST,
    MANIFEST,
    TAG_RE,
    UNIVERSAL_SUFFIX,
    checkpoint_bytes,
    crc32_file,
    fsync_dir,
    fsync_file,
    read_latest,
    tag_for,
    write_atomic,
)
from janus_train.trainer.ckpt_capture import Capture, WrittenHere, frozen_storage, snapshot
from janus_train.trainer.ckpt_writer import Job, submit
from janus_train.trainer.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    barrier,
)

logger = logging.getLogger(__name__)


def _commit(src: Path, dst: Path) -> None:
    """Rank 0: move a completely written (and synced) checkpoint into place, then point
    ``latest`` at it (steps 5-6 of the save order)."""
    if dst.exists():  # a previous save of this tag committed but never became `latest`
        shutil.rmtree(dst)
    os.rename(src, dst)
    fsync_dir(dst.parent)
    write_atomic(dst.parent / LATEST, dst.name)


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    latest = read_latest(ckpt_dir)
    tags = sorted(d.name for d in ckpt_dir.iterdir() if d.is_dir() and TAG_RE.match(d.name))
    for tag in tags[: max(0, len(tags) - keep_last)]:
        if tag != latest:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    for d in ckpt_dir.glob(f"*{UNIVERSAL_SUFFIX}"):  # conversions of older checkpoints
        if d.name != f"{latest}{UNIVERSAL_SUFFIX}":
            shutil.rmtree(d, ignore_errors=True)


def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != MANIFEST)


def _write_manifest(d: Path, step: int, world_size: int, files: dict[str, dict]) -> None:
    """Rank 0, step 4: the manifest, then the directory tree's entries, durable."""
    m = {"format": 1, "step": step, "world_size": world_size, "checksum": "crc32"}
    m["files"] = dict(sorted(files.items()))
    with open(d / MANIFEST, "w") as f:
        json.dump(m, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for sub in sorted({(d / rel).parent for rel in files} | {d}, reverse=True):
        fsync_dir(sub)


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _latest_bytes(ckpt_dir: Path) -> int:
    """The bytes of the checkpoint ``latest`` names (0 when none)."""
    latest = None
    try:
        latest = read_latest(ckpt_dir)
    except RuntimeError:
        pass
    return checkpoint_bytes(ckpt_dir / latest) if latest else 0


def _check_space(ckpt_dir: Path) -> int:
    """Rank 0, step 2 (its writer): the previous checkpoint's bytes (0 when none); warns when
    the next save would leave less than one checkpoint of room."""
    need = _latest_bytes(ckpt_dir)
    free = _free_bytes(ckpt_dir)
    if need and free < 2 * need:
        logger.warning(
            "%s: %s free, a checkpoint takes %s: the next save leaves less than one "
            "checkpoint of room%s",
            ckpt_dir,
            _gib(free),
            _gib(need),
            " and may fail" if free < need else "",
        )
    return need


def _write_and_sum(
    d: Path, writes: list, extras: list[str], listing: Path, before: Callable[[], None]
) -> tuple[BaseException | None, dict]:
    """Steps 2-3 on this rank (inline, or the writer thread): make the snapshots'
    directories, ``before`` (rank 0: the previous save's commit succeeded, the space
    check), write the snapshots, then fsync each
    file it wrote and those of ``extras`` and take their size and CRC-32; the result also
    goes to ``listing`` (beside the checkpoint directory), where rank 0's commit reads it when
    the loop's flags said every rank succeeded."""
    rels = [str(Path(p).relative_to(d)) for _, _, p in writes] + extras
    try:
        for parent in sorted({Path(p).parent for _, _, p in writes}):
            parent.mkdir(parents=True, exist_ok=True)
        before()
        while writes:  # each snapshot's host memory is released once it is written
            save, obj, path = writes.pop(0)
            save(obj, path)
            del obj
        files = _sync_and_sum(d, rels)
        tmp = listing.with_name(listing.name + ".tmp")
        tmp.write_text(json.dumps(files))
        os.replace(tmp, listing)  # whole or absent: its presence means "all synced"
        return None, files
    except Exception as e:  # noqa: BLE001  # reported by commit(), on every rank
        return e, {}


def _sync_and_sum(d: Path, rels: list[str]) -> dict[str, dict]:
    """Files ``rels`` of ``d``: fsynced, with size and CRC-32 (step 3)."""
    out = {}
    for rel in rels:
        p = d / rel
        fsync_file(p)
        out[rel] = {"size": p.stat().st_size, "crc32": crc32_file(p)}
    return out


class PendingSave:
    """A checkpoint on its way (:func:`begin_save`): phase ``write`` (every rank writes and
    syncs its files, in a thread of its own with ``background``), then ``commit`` (rank 0
    writes the manifest, renames, moves ``latest`` and prunes, in a thread with
    ``background``), then ``done``. :meth:`advance` moves it on one phase on every rank
    together, on the caller's (main) thread; it is the only part with collectives.

    ``prior``: the save before, of which only the agreement on rank 0's commit was left when
    this one began (asynchronous saves only): rank 0's writer thread ran that commit before
    this save's writes (one thread, in order) and flags this save failed when it failed, so
    this save's write-phase agreement settles both."""

    def __init__(
        self,
        ckpt_dir: Path,
        step: int,
        info: DistInfo,
        background: bool,
        prior: PendingSave | None = None,
    ) -> None:
        self.ckpt_dir, self.step, self.info, self.background = ckpt_dir, step, info, background
        self.prior = prior
        self.need = 0
        self.tag = tag_for(step)
        self.tmp_root = ckpt_dir / f".tmp-{self.tag}"
        self.phase = "write"
        # until a thread reports, it did not finish (e.g. it died): never taken for success
        unfinished = RuntimeError(f"the writer of {self.tag} did not finish")
        self.written: tuple[BaseException | None, dict] = (unfinished, {})  # this rank's files
        self.outcome: tuple[str, BaseException] | None = None  # rank 0's commit: failure
        self._task: Job | None = None
        self.device: torch.device | str = "cpu"  # the engine's: where a collective's tensor lives

    def _run(self, fn: Callable[[], None], held: bool = False) -> None:
        if not self.background:
            fn()
            return
        self._task = submit(fn, self.tag, held)

    def _listing(self, rank: int) -> Path:
        return self.tmp_root / f"files_rank{rank}.json"

    def start(self, writes: list, extras: list[str]) -> None:
        d, listing = self.tmp_root / self.tag, self._listing(self.info.rank)

        def write() -> None:
            self.written = _write_and_sum(d, writes, extras, listing, self._before_writes)

        self._run(write, held=True)

    def release(self) -> None:
        """Lets this rank's writer start (local): once every rank has taken its snapshots, i.e.
        after the next collective every rank enters only after its save (the loop's step
        all-reduce), so that a rank's writer never takes a core from another rank still in
        its snapshot (measured: it doubled a third of the 2-rank stalls on 2 cores). Waiting
        for the writer (:meth:`wait`, and so :meth:`advance` and :meth:`commit`) releases it."""
        if self._task is not None:
            self._task.go.set()

    def _before_writes(self) -> None:
        """Rank 0, first in its part of step 2 (the writer thread, after the previous save's
        commit): that commit must have succeeded (else this save is flagged failed and the
        agreement raises the commit's error), then the space check."""
        if not self.info.is_main:
            return
        if self.prior is not None and self.prior.outcome is not None:
            raise RuntimeError(f"the commit of {self.prior.tag} before it failed")
        self.need = _check_space(self.ckpt_dir)

    @property
    def ready(self) -> bool:
        """This rank's part of the current phase is done (local, no collective)."""
        return self._task is None or self._task.done.is_set()

    @property
    def failed(self) -> bool:
        """This rank's part of the current phase failed (meaningful once :attr:`ready`)."""
        return (self.written[0] if self.phase == "write" else self.outcome) is not None

    def wait(self) -> None:
        """Until this rank's part of the current phase is done (local, no collective)."""
        if self._task is not None:
            self.release()
            self._task.done.wait()

    def advance(self, keep_last: int, none_failed: bool = False) -> bool:
        """Collective: finish the current phase (waiting for this rank's thread when it is
        not :attr:`ready`) and start the next; True once the save is committed.
        ``none_failed``: every rank is :attr:`ready` and none :attr:`failed` (the loop's
        all-reduced flags): then neither phase needs a collective (rank 0's commit reads the
        ranks' file lists from ``.tmp-<tag>/files_rank{r}.json``). Raises
        :class:`StorageFull` on every rank when some rank ran out of space (``latest``
        unchanged, the partial directory removed), and ``RuntimeError`` on every rank after
        any other failure of a write or of the commit (the save is lost)."""
        self.wait()
        self._task = None
        if self.phase == "write":
            self._settle_prior(keep_last, none_failed)
            if none_failed:
                if self.info.is_main:
                    self._run(lambda: self._commit_rank0(None, keep_last))
            else:
                self._gather_written(keep_last)
            self.phase = "commit"
            return not self.background and self.advance(keep_last)
        if none_failed or not self._any_failed(self.outcome is not None):
            self.phase = "done"
            return True
        kind, what = all_gather_objects(
            None if self.outcome is None else (self.outcome[0], one_line(self.outcome[1]))
        )[0] or (None, None)
        self.phase = "done"
        if kind == "full":
            raise StorageFull(what)
        if kind == "error":
            if self.info.is_main:
                raise self.outcome[1]
            raise RuntimeError(f"checkpoint {self.ckpt_dir / self.tag}: rank 0 failed ({what})")
        return True

    def _settle_prior(self, keep_last: int, none_failed: bool) -> None:
        """The agreement on :attr:`prior`'s commit, before this save's write phase ends: none
        needed when no rank flagged a failure (rank 0's flag includes that commit's outcome);
        else the prior's own (one all-reduce), which raises its failure on every rank, this
        save's directory removed."""
        prior, self.prior = self.prior, None
        if prior is None:
            return
        if none_failed:
            prior.phase = "done"
            return
        try:
            prior.advance(keep_last)
        except BaseException:
            if self.info.is_main:
                shutil.rmtree(self.tmp_root, ignore_errors=True)
            raise

    def _any_failed(self, failed: bool) -> bool:
        """Collective: whether ``failed`` on some rank, in one all-reduce (the message, when
        there is one, takes a gather more)."""
        flag = torch.tensor([float(failed)], dtype=torch.float64, device=self.device)
        return bool(all_reduce_sum(flag)[0] > 0)

    def finish_alone(self, keep_last: int, timeout_s: float) -> bool:
        """Without any collective (an error is ending the run): wait for this rank's thread;
        then rank 0 commits the save when every rank's writer has left its listing (all
        files synced) within ``timeout_s``, or has already done so in its commit thread.
        True when the save counts. :attr:`prior`: its commit ran before this save's writes on
        rank 0 (which fail when it failed), logged either way."""
        self.wait()  # (on rank 0, after the prior's commit: one thread, in order)
        prior, self.prior = self.prior, None
        if prior is not None and self.info.is_main:
            if prior.finish_alone(keep_last, timeout_s):
                logger.warning("checkpoint %s committed (agreed on the way out)", prior.tag)
            else:
                logger.warning("checkpoint %s: its commit failed: %s", prior.tag, prior.outcome)
        if not self.info.is_main or self.written[0] is not None and self.phase == "write":
            return False
        if self.phase == "write":
            deadline = time.monotonic() + timeout_s
            while not all(self._listing(r).is_file() for r in range(self.info.world_size)):
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
            self._commit_rank0(None, keep_last)
        return self.outcome is None

    def commit(self, keep_last: int) -> str:
        """Collective: every remaining phase, waiting for the threads. Returns the tag."""
        while not self.advance(keep_last):
            pass
        return self.tag

    def _gather_written(self, keep_last: int) -> None:
        """Steps 3-4: the ranks' file lists; on success rank 0 starts the commit."""
        err, files = self.written
        dst = self.ckpt_dir / self.tag
        full = err is not None and is_storage_full(err)
        gathered = all_gather_objects((None if err is None else one_line(err), full, files))
        failed = [(r, e) for r, (e, f, _) in enumerate(gathered) if e and not f]
        if failed:  # not a full disk: this save is lost, `latest` stays; as loud as a crash
            if self.info.is_main:
                shutil.rmtree(self.tmp_root, ignore_errors=True)
            if err is not None and not full:
                raise err
            r, e = failed[0]
            raise RuntimeError(f"checkpoint {dst}: rank {r} failed to write its files ({e})")
        errors = [e for e, _, _ in gathered if e]
        if errors:
            msg = self._full_message(errors[0], dst) if self.info.is_main else None
            raise StorageFull(all_gather_objects(msg)[0])
        if self.info.is_main:
            merged = {k: v for _, _, f in gathered for k, v in f.items()}
            self._run(lambda: self._commit_rank0(merged, keep_last))

    def _commit_rank0(self, files: dict[str, dict] | None, keep_last: int) -> None:
        """Rank 0, steps 4-7 (inline or its commit thread): the outcome is shared by the next
        :meth:`advance`. ``files``: the gathered lists, or None to read the ranks' listings."""
        dst = self.ckpt_dir / self.tag
        self.outcome = ("error", RuntimeError(f"the commit of {self.tag} did not finish"))
        try:
            if files is None:
                files = {}
                for r in range(self.info.world_size):
                    files.update(json.loads(self._listing(r).read_text()))
            errors = self._commit_main(self.tmp_root / self.tag, dst, files)
            if errors:
                self.outcome = ("full", StorageFull(self._full_message(errors[0], dst)))
                return
            shutil.rmtree(self.tmp_root, ignore_errors=True)
            _prune(self.ckpt_dir, keep_last)
            self.outcome = None
        except Exception as e:  # noqa: BLE001  # shared with every rank by advance()
            self.outcome = ("error", e)

    def _commit_main(self, tmp: Path, dst: Path, files: dict[str, dict]) -> list[str]:
        """Rank 0, steps 4-6; returns ``[the error]`` when the disk filled up meanwhile."""
        try:
            # a file no rank saw itself write (e.g. by a C++ writer in DeepSpeed): every
            # rank's writer has finished, so it is complete; synced and summed here, which
            # is durable on one node but may not flush another node's client cache
            orphans = sorted(set(_files(tmp)) - set(files))
            if orphans:
                logger.warning(
                    "%s: %s written by no rank's recorded writes; fsynced by rank 0",
                    tmp,
                    ", ".join(orphans),
                )
            files = {**files, **_sync_and_sum(tmp, orphans)}
            _write_manifest(tmp, self.step, self.info.world_size, files)
            fsync_dir(self.tmp_root)
            _commit(tmp, dst)
        except Exception as e:
            if not is_storage_full(e):
                raise
            if read_latest(self.ckpt_dir) != self.tag:  # renamed, not `latest`: not a checkpoint
                shutil.rmtree(dst, ignore_errors=True)
            return [one_line(e)]
        return []

    def _full_message(self, error: str, dst: Path) -> str:
        """Rank 0: the ``storage full:`` line, after removing the partial directory."""
        tmp = self.tmp_root / self.tag
        written = checkpoint_bytes(tmp) if tmp.is_dir() else 0
        shutil.rmtree(self.tmp_root, ignore_errors=True)
        latest = read_latest(self.ckpt_dir) if (self.ckpt_dir / LATEST).is_file() else None
        free = _gib(_free_bytes(self.ckpt_dir))
        if latest == self.tag:  # `latest` had moved when the error came: the checkpoint counts
            return (
                f"storage full: checkpoint {dst} was committed and is the latest, but the disk "
                f"filled up right after ({error}); {free} free, a checkpoint needs about "
                f"{_gib(self.need or checkpoint_bytes(dst))}; older checkpoints were not pruned"
            )
        self.need = self.need or _latest_bytes(self.ckpt_dir)  # (failed before the check)
        need = f"about {_gib(self.need)}" if self.need else f"more than {_gib(written)}"
        return (
            f"storage full: could not write checkpoint {dst} ({error}); {free} free, a "
            f"checkpoint needs {need}; "
            + (f"{latest} is still the latest" if latest else "no checkpoint was committed")
        )


def begin_save(
    engine,
    ckpt_dir: str | os.PathLike,
    step: int,
    client_state: dict,
    rank_state: dict,
    info: DistInfo,
    background: bool = False,
    previous: PendingSave | None = None,
    keep_last: int = 2,
) -> PendingSave:
    """Steps 1-3: DeepSpeed's save runs (with its collectives) but its writes are captured as
    host snapshots (:class:`~janus_train.trainer.ckpt_capture.Capture`); then this rank writes
    them and ``rank_state``, fsyncs and sums its files: inline, or with ``background`` in the
    writer thread while the caller goes on (nothing in the thread is a collective). No
    collective of ours runs here: each rank makes the directory (DeepSpeed's ``makedirs``; the
    writer too, for its files), and ``.tmp-<tag>`` must not hold an earlier run's leftovers
    (:func:`~janus_train.trainer.checkpoint.clear_partial_saves` ran before the run's first
    save). The save counts once :meth:`PendingSave.commit` returns. ``previous``: the save
    before, still pending: committed first (a collective), except when only the agreement on
    rank 0's commit is left of an asynchronous one, which this save carries
    (:attr:`PendingSave.prior`)."""
    ckpt_dir = Path(ckpt_dir)
    prior = None
    if previous is not None:
        if previous.background and previous.phase == "commit":
            prior = previous
        else:
            previous.commit(keep_last)
    p = PendingSave(ckpt_dir, step, info, background, prior)
    p.device = getattr(engine, "device", "cpu")
    tmp = p.tmp_root / p.tag
    capture = Capture(engine.checkpoint_engine, frozen_storage(engine))
    engine.checkpoint_engine = capture
    # A failure on one rank (any error inside DeepSpeed's save, lack of space) is caught there
    # and shared at the agreement, where every rank raises it: the failing rank still takes
    # part in each collective of DeepSpeed's save (its epilogue run for it), so the others
    # never wait for it until the timeout. DeepSpeed's barriers are skipped (every rank
    # alike): nothing is written in the call but the directories (DeepSpeed's own
    # ``makedirs`` on each rank), and the commit needs every rank's flag.
    failure: BaseException | None = None
    try:
        with (
            WrittenHere(tmp) as written_here,
            compat.save_without_barriers(engine) as skipped,
            compat.reuse_save_metadata(engine),
            compat.checkpoint_epilogue_once(engine) as finish_epilogue,
        ):
            try:
                engine.save_checkpoint(
                    str(p.tmp_root), tag=p.tag, client_state=client_state, save_latest=False
                )
            except Exception as e:  # noqa: BLE001  # raised on every rank by the agreement
                failure = e
                finish_epilogue()  # the collective the others run after their writes
                if not skipped:
                    barrier()  # DeepSpeed's closing one
    finally:
        engine.checkpoint_engine = capture.inner
    if failure is not None:
        p.written = (failure, {})
        return p
    # this rank's files: its captured writes, the state file, and what DeepSpeed wrote on this
    # rank outside its checkpoint engine (complete: written on this thread)
    writes = capture.writes
    writes.append(
        (torch.save, snapshot(rank_state), str(tmp / f"trainer_state_rank{info.rank}.pt"))
    )
    p.start(writes, written_here.files)
    return p


def save_checkpoint(
    engine,
    ckpt_dir: str | os.PathLike,
    step: int,
    client_state: dict,
    rank_state: dict,
    info: DistInfo,
    keep_last: int,
) -> str:
    """Collective, the whole save order at once (:func:`begin_save` writing inline, then
    :meth:`PendingSave.commit`). Returns the tag. ``client_state`` (same on all ranks) goes
    into DeepSpeed's files, ``rank_state`` (loader position, RNG) into
    ``trainer_state_rank{r}.pt``. Raises :class:`StorageFull` on every rank when some rank ran
    out of space (``latest`` unchanged, the partial directory removed). As for
    :func:`begin_save`, an earlier run's ``.tmp-*`` must have been cleared
    (:func:`~janus_train.trainer.checkpoint.clear_partial_saves`)."""
    return begin_save(engine, ckpt_dir, step, client_state, rank_state, info).commit(keep_last)
