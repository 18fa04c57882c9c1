"""Typed configuration of the data pipeline (owned by janus_train.data)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """How samples are read, built and batched. The per-stage recipe (sources, task ratio)
    comes from the experiment's stage hyper-parameters; ``recipe`` overrides it."""

    recipe: str | None = None
    """Data recipe: a name in ``data_recipes/`` or a path to a YAML file. Unset: the stage's."""
    seq_len: int = 4096
    """Maximum tokens per sample row."""
    num_workers: int = 2
    """DataLoader workers per rank."""
    seed: int = 0
    cfg_dropout: float = 0.1
    """Probability that a generation sample's prompt becomes unconditional (pad tokens)."""
    first_sentence_prob: float = 0.25
    """Probability that a generation caption keeps only its first sentence."""
    system_prompt: str | None = None
    """Optional system prompt for conversations (None: none)."""
    max_failure_rate: float = 0.05
    """Above this fraction of skipped samples per source the run stops naming the shard."""
