"""Typed configuration of the trainer and of DeepSpeed (owned by janus_train.trainer)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DeepSpeedConfig:
    """ZeRO settings; the DeepSpeed JSON is generated from this and saved in the run dir."""

    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    precision: str = "bf16"
    """``bf16`` | ``fp32``; bf16 falls back to fp32 where the device lacks it (CPU)."""
    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool = True


@dataclass
class TrainConfig:
    """Loop, logging and checkpoint settings shared by all stages."""

    run_dir: str = "runs/${experiment.name}/${stage.name}"
    micro_batch_size: int = 1
    """Samples per rank per micro-batch; accumulation = global batch / (micro x world)."""
    steps: int | None = None
    """Override the stage's step count (smoke runs)."""
    global_batch_size: int | None = None
    """Override the stage's global batch size (smoke runs, small clusters)."""
    loss_reduction: str = "token_mean"
    """``token_mean``: mean over all supervised tokens of the step (all tasks, micro-batches and
    ranks). ``task_mean_sum``: sum over tasks of each task's token mean."""
    log_every: int = 10
    ckpt_every: int = 1000
    keep_last: int = 2
    max_consecutive_skips: int = 10
    """Non-finite updates in a row before the run stops."""
    export_at_end: bool = True
    dry_run: bool = False
    """Validate config, recipe and batch arithmetic, then exit before building the model."""
    wandb: bool = False
    wandb_project: str = "janus_train"
    seed: int = 0
