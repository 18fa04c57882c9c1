"""The train state: everything the loop carries from step to step, saved and loaded as one.

Shared by all ranks (in DeepSpeed's checkpoint files, under ``client_state["janus_train"]``):
the step, the non-finite-update and checkpoint-fallback counters and the wandb run id. Per rank
(``trainer_state_rank{r}.pt`` beside them): the loader's position and the RNG states. The loop
reads and writes only a :class:`TrainState`; :class:`Checkpointer` / :func:`load_train_state`
are the one place that knows how it is laid out on disk.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

from janus_train.step_loader import StepLoader
from janus_train.trainer.checkpoint import (
    clear_partial_saves,
    convert_to_universal,
    get_rng_state,
    load_latest,
    read_latest,
    saved_world_size,
    select_checkpoint,
    set_rng_state,
)
from janus_train.trainer.ckpt_save import PendingSave, begin_save
from janus_train.trainer.distributed import DistInfo

logger = logging.getLogger(__name__)
CLIENT_KEY = "janus_train"  # namespaced: DeepSpeed owns the top-level keys of client_state


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done (the next step to run has this index)."""
    skipped_steps: int = 0
    """Non-finite updates skipped since the stage began."""
    consecutive_skips: int = 0
    """Non-finite updates in a row (reset by a good one)."""
    ckpt_fallbacks: int = 0
    """Damaged checkpoints set aside on resume since the stage began (``ckpt/fallbacks``)."""
    wandb_id: str | None = None
    """The wandb run continued on resume."""
    resumed_from: int | None = None
    """Step of the checkpoint this process resumed from (not saved: None on a fresh start)."""

    def client_state(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("resumed_from")
        return {CLIENT_KEY: d}

    @classmethod
    def from_client_state(cls, client: dict) -> TrainState:
        d = client[CLIENT_KEY]
        return cls(
            step=int(d["step"]),
            skipped_steps=int(d["skipped_steps"]),
            consecutive_skips=int(d["consecutive_skips"]),
            ckpt_fallbacks=int(d.get("ckpt_fallbacks", 0)),
            wandb_id=d.get("wandb_id"),
            resumed_from=int(d["step"]),
        )


class Checkpointer:
    """The loop's saves of engine + train state + this rank's loader position and RNG.
    Collective to make (what earlier runs' saves left under ``.tmp-`` is removed). :meth:`save`
    starts one (the one before committed first, or carried when only its agreement is left); it
    counts once :meth:`commit` returns. ``background`` (``train.ckpt_async``): ``save`` returns
    after the host snapshot; a writer thread of each rank writes and syncs its files, then a
    thread of rank 0 commits, while the loop goes on; the loop calls :meth:`advance` at a step
    boundary where every rank's :meth:`flags` said ready (twice per save) and :meth:`commit` on
    leaving; a save that finds the pending one down to the agreement on its commit carries it
    (no collective at the save). Otherwise ``save`` writes and commits at once."""

    def __init__(
        self, engine, ckpt_dir: str | os.PathLike, info: DistInfo, keep_last: int, background: bool
    ) -> None:
        self.engine, self.ckpt_dir, self.info = engine, ckpt_dir, info
        self.keep_last, self.background = keep_last, background
        self.pending: PendingSave | None = None
        clear_partial_saves(ckpt_dir, info)  # the saves themselves run no collective of ours

    def flags(self) -> tuple[float, float]:
        """This rank's (ready, failed) for the loop's all-reduce: no save pending, or its part
        of the pending save's current phase done; and that part failed (local)."""
        p = self.pending
        ready = p is None or p.ready
        return float(ready), float(ready and p is not None and p.failed)

    def release(self) -> None:
        """Local: the pending save's writes may start (:meth:`PendingSave.release`); the loop
        calls it right after its step's all-reduce, which every rank enters after its save."""
        if self.pending is not None:
            self.pending.release()

    def advance(self, none_failed: bool = False) -> None:
        """Collective, when every rank's ``flags`` said ready: the pending save's next phase
        (see :class:`PendingSave`); ``none_failed``: no rank's said failed."""
        p = self.pending
        if p is None:
            return
        try:
            done = p.advance(self.keep_last, none_failed)
        except BaseException:
            self.pending = None  # a failed save never counts
            raise
        if done:
            self.pending = None

    def save(self, state: TrainState, loader: StepLoader) -> None:
        """Collective only when a pending save is not down to the agreement on its commit
        (then committed first): start a save of ``state`` (:func:`begin_save`, which carries
        that agreement otherwise)."""
        previous, self.pending = self.pending, None  # a failed save never counts
        rank_state = {"loader": loader.state_dict(), "rng": get_rng_state()}
        self.pending = begin_save(
            self.engine,
            self.ckpt_dir,
            state.step,
            state.client_state(),
            rank_state,
            self.info,
            self.background,
            previous,
            self.keep_last,
        )
        if not self.background:
            self.commit()

    def close(self) -> None:
        """On leaving with a save pending (an error, as the normal exits commit): finish it
        where no collective is needed (:meth:`PendingSave.finish_alone`), else it never
        counts (removed at the next start)."""
        p, self.pending = self.pending, None  # (its prior save, if any, is settled first)
        if p is not None and p.finish_alone(self.keep_last, timeout_s=60.0):
            logger.warning("checkpoint %s committed on the way out", p.tag)

    def commit(self) -> str | None:
        """Collective: wait for the pending save and commit it (its tag; None when none).
        The save is dropped whatever happens (an exception: it never counts)."""
        pending, self.pending = self.pending, None
        return None if pending is None else pending.commit(self.keep_last)


@dataclass
class ResumePlan:
    """What :func:`prepare_resume` decided before the engine exists."""

    universal: bool = False
    """Load ``latest``'s universal conversion (the world size changed)."""
    fallbacks: int = 0
    """Newer checkpoints that did not verify and were set aside."""


def prepare_resume(ckpt_dir: str | os.PathLike, info: DistInfo, ds_config: dict) -> ResumePlan:
    """Collective, before the engine exists: pick the newest checkpoint that verifies
    (``select_checkpoint``: damaged newer ones set aside, ``latest`` pointed at it); when it was
    written by another number of ranks, convert it to a DeepSpeed universal checkpoint and set
    ``ds_config`` to load that (``checkpoint.load_universal``)."""
    _, fallbacks = select_checkpoint(ckpt_dir, info)
    saved = saved_world_size(ckpt_dir)
    if saved is None or saved == info.world_size:
        return ResumePlan(False, fallbacks)
    logger.warning(
        "the checkpoint was written by %d ranks, this run has %d: resuming through "
        "a universal checkpoint",
        saved,
        info.world_size,
    )
    convert_to_universal(ckpt_dir, read_latest(ckpt_dir), info)
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return ResumePlan(True, fallbacks)


def load_train_state(
    engine,
    ckpt_dir: str | os.PathLike,
    loader: StepLoader,
    info: DistInfo,
    plan: ResumePlan | None = None,
) -> TrainState:
    """Collective: resume engine, loader and RNG from ``latest``; a fresh state when none.
    ``plan``: from :func:`prepare_resume`; its fallbacks (and those of a checkpoint that failed
    to load here) are added to ``ckpt_fallbacks``.

    Same world size and loader layout: exact (every rank's own loader position and RNG).
    Otherwise the loader continues from all saving ranks' positions (``load_resharded``: no
    sample twice, what is skipped counted in its ``data/skipped/*/reshard`` counters) and the
    RNGs keep this run's seeds."""
    plan = plan or ResumePlan()
    resumed = load_latest(engine, ckpt_dir, info, plan.universal)
    if resumed is None:
        return TrainState(ckpt_fallbacks=plan.fallbacks)
    client, rank_states, fallbacks = resumed
    state = TrainState.from_client_state(client)
    state.ckpt_fallbacks += plan.fallbacks + fallbacks
    loader_states = [rs["loader"] for rs in rank_states]
    if len(rank_states) == info.world_size and loader.can_resume_exactly(loader_states[info.rank]):
        loader.load_state_dict(loader_states[info.rank])
        set_rng_state(rank_states[info.rank]["rng"])
    else:
        loader.load_resharded(loader_states)
        logger.warning(
            "resumed on %d ranks from %d: loader positions carried over, RNG reseeded",
            info.world_size,
            len(rank_states),
        )
    logger.info("resuming at step %d", state.step)
    return state
