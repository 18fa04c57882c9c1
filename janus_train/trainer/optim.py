"""Optimiser parameter groups and the learning-rate schedule (spec §5).

AdamW (0.9, 0.95) sees trainable parameters only, in two groups: weight decay for matrices,
none for norms, biases (every parameter with fewer than 2 dims) and embedding tables. The
schedule is a pure function of the step, so resuming needs no scheduler state.
"""

from __future__ import annotations

import math

from torch import nn

from janus_train.model.freeze import full_shape


def build_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decay / no-decay groups (empty groups dropped)."""
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if len(full_shape(p)) < 2 or id(p) in embedding_params:  # ZeRO-3: built partitioned
            no_decay.append(p)
        else:
            decay.append(p)
    if not decay and not no_decay:
        raise ValueError("no trainable parameter: check stage.trainable")
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def lr_at(
    step: int,
    lr: float,
    warmup_steps: int,
    total_steps: int,
    schedule: str,
    min_lr_ratio: float = 0.0,
) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to ``lr`` over
    ``warmup_steps``, then constant, or cosine down to ``min_lr_ratio * lr`` at ``total_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}: constant | cosine")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
