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
    get_rng_state,
    load_latest,
    save_checkpoint,
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


def load_train_state(engine, ckpt_dir: str | os.PathLike, loader, info: DistInfo) -> TrainState:
    """Collective: resume engine, loader and RNG from ``latest``; a fresh state when none."""
    resumed = load_latest(engine, ckpt_dir, info)
    if resumed is None:
        return TrainState()
    client, rank_state = resumed
    state = TrainState.from_client_state(client)
    loader.load_state_dict(rank_state["loader"])
    set_rng_state(rank_state["rng"])
    logger.info("resuming at step %d", state.step)
    return state
