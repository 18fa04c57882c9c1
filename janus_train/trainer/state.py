"""The train state: everything the loop carries from step to step, saved and loaded as one.

Shared by all ranks (in DeepSpeed's checkpoint files, under ``client_state["janus_train"]``):
the step, the non-finite-update counters and the wandb run id. Per rank
(``trainer_state_rank{r}.pt`` beside them): the loader's position and the RNG states. The loop
reads and writes only a :class:`TrainState`; :func:`save_train_state` / :func:`load_train_state`
are the one place that knows how it is laid out on disk.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

from janus_train.trainer.checkpoint import (
    convert_to_universal,
    get_rng_state,
    load_latest,
    read_latest,
    save_checkpoint,
    saved_world_size,
    set_rng_state,
)
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
            wandb_id=d.get("wandb_id"),
            resumed_from=int(d["step"]),
        )


def save_train_state(
    engine, ckpt_dir: str | os.PathLike, state: TrainState, loader, info: DistInfo, keep_last: int
) -> str:
    """Collective: engine + train state + this rank's loader position and RNG, atomically."""
    rank_state = {"loader": loader.state_dict(), "rng": get_rng_state()}
    return save_checkpoint(
        engine, ckpt_dir, state.step, state.client_state(), rank_state, info, keep_last
    )


def prepare_resume(ckpt_dir: str | os.PathLike, info: DistInfo, ds_config: dict) -> bool:
    """Collective, before the engine exists: when ``latest`` was written by another number of
    ranks, convert it to a DeepSpeed universal checkpoint and set ``ds_config`` to load that
    (``checkpoint.load_universal``). Returns whether the resume is universal."""
    saved = saved_world_size(ckpt_dir)
    if saved is None or saved == info.world_size:
        return False
    logger.warning(
        "the checkpoint was written by %d ranks, this run has %d: resuming through "
        "a universal checkpoint",
        saved,
        info.world_size,
    )
    convert_to_universal(ckpt_dir, read_latest(ckpt_dir), info)
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return True


def load_train_state(
    engine, ckpt_dir: str | os.PathLike, loader, info: DistInfo, universal: bool = False
) -> TrainState:
    """Collective: resume engine, loader and RNG from ``latest``; a fresh state when none.

    Same world size and loader layout: exact (every rank's own loader position and RNG).
    Otherwise the loader continues from all saving ranks' positions (``load_resharded``: no
    sample twice, what is skipped counted in its ``data/skipped/*/reshard`` counters) and the
    RNGs keep this run's seeds."""
    resumed = load_latest(engine, ckpt_dir, info, universal)
    if resumed is None:
        return TrainState()
    client, rank_states = resumed
    state = TrainState.from_client_state(client)
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
