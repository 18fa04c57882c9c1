"""Choosing activation checkpointing from memory: the cheapest of ``none`` | every k-th layer
| ``full`` whose ``janus-plan`` estimate leaves :data:`HEADROOM` of the usable GPU memory free
at a given deployment. The shipped per-model defaults (``conf/model/*.yaml``) were chosen with
it at the deployments of ``launch/slurm/*.sbatch`` (``benchmarks/ckpt_memory.py`` prints the
table in BENCHMARKS.md; tests/test_plan.py keeps every shipped stage fitting).

Cheapest means least recompute: checkpointed layers recompute their forward in the backward
(on Janus-Pro-1B stage 2 on one H200, issue 10 measured MFU 0.18 with every layer checkpointed
against 0.244 without), so fewer checkpointed layers is faster whenever memory allows.
"""

from __future__ import annotations

import dataclasses

from janus_train.plan.config import ClusterConfig
from janus_train.plan.estimate import Estimate, StageShape, estimate
from janus_train.trainer.config import DeepSpeedConfig

HEADROOM = 0.15
"""Fraction of the planner's usable memory (itself GPU memory less ``memory_margin`` and the
reserved context) a default must leave free: the activation model is checked against measured
peaks on CPU only (tests/test_plan.py), not yet on a GPU."""

OPTIONS: tuple[tuple[str, bool, int], ...] = (
    ("none", False, 1),
    ("every 4", True, 4),
    ("every 3", True, 3),
    ("every 2", True, 2),
    ("full", True, 1),
)
"""(label, ``model.gradient_checkpointing``, ``model.checkpoint_every``), least recompute
first."""


def label(checkpointing: bool, every: int) -> str:
    return "none" if not checkpointing else ("full" if every == 1 else f"every {every}")


def estimates(
    shape: StageShape, cl: ClusterConfig, preset: str, ds: DeepSpeedConfig, nodes: int
) -> list[tuple[str, Estimate]]:
    """The stage's estimate under every option of :data:`OPTIONS`."""
    return [
        (
            name,
            estimate(
                dataclasses.replace(shape, checkpointing=on, checkpoint_every=k),
                cl,
                preset,
                ds,
                nodes,
            ),
        )
        for name, on, k in OPTIONS
    ]


def fits(est: Estimate, headroom: float = HEADROOM) -> bool:
    return est.total_memory <= (1 - headroom) * est.usable


def cheapest(options: list[tuple[str, Estimate]], headroom: float = HEADROOM) -> str | None:
    """The first option (least recompute) that fits with ``headroom``; None if none does."""
    return next((name for name, est in options if fits(est, headroom)), None)
