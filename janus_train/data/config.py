"""Typed configuration of the data pipeline (owned by janus_train.data)."""

from __future__ import annotations

from dataclasses import dataclass

from janus_train.model.chat_template import SYSTEM_PROMPT


@dataclass
class DataConfig:
    """How samples are read, built and batched. The data mixture (recipe: sources, task
    weights) is the stage's, ``experiment.<stage>.data_recipe``."""

    seq_len: int = 4096
    """Maximum tokens per sample row."""
    text_chunk: int = 0
    """Text documents are cut into chunks of at most this many tokens (0: ``seq_len``). The
    papers' recipes keep 0; a shorter chunk is a different recipe (fewer text tokens per
    sample, so less work per step) that evens out the ranks' tokens (``janus-plan
    text_chunk=N`` reports its effect beside the plan)."""
    num_workers: int = 2
    """DataLoader workers per rank (0: build in the main process). Exact resume needs the same
    value (and world size) as the run that saved the state."""
    prefetch_factor: int = 2
    """Steps each worker builds ahead."""
    pin_memory: bool = True
    """Pin batches in page-locked memory (when CUDA is available) so host-to-device copies
    with ``non_blocking=True`` overlap compute."""
    mp_context: str | None = None
    """Worker start method: None (platform default, fork on Linux), ``spawn`` or ``forkserver``
    (safer when the trainer process already runs many threads; slower worker start)."""
    seed: int = 0
    """Seeds shard order, in-shard order, source picks per step, CFG and caption dropout."""
    shuffle: bool = True
    """Shuffle shard order per epoch and, for local shards, record order within each shard."""
    cfg_dropout: float = 0.1
    """Probability that a generation sample's prompt becomes unconditional (pad tokens)."""
    system_prompt: str | None = SYSTEM_PROMPT
    """System prompt of understanding and chat conversations (captions as QA, SFT, evaluation,
    the export's chat template; a conversation's own ``system`` turn wins). Default: DeepSeek's
    (``chat_template.SYSTEM_PROMPT``). ``data.system_prompt=null`` (or ``''``) disables it.
    Text-to-image prompts never have one."""
    max_failure_rate: float = 0.05
    """Above this fraction of skipped samples per source the run stops naming the shard."""
    failure_min_samples: int = 100
    """Samples a shard (or source) must have tried before ``max_failure_rate`` applies."""
    pixels_uint8: bool = True
    """Ship ``pixel_values`` / ``gen_pixel_values`` as (N, 3, S, S) uint8 and normalise them on
    the device with ``StepLoader.finish(batch)`` (the trainer calls it): saves the loader's
    float pass and 3/4 of the host-to-device traffic (BENCHMARKS.md). False: float32 from the
    workers, the batch contract as is."""
    pack: bool = False
    """Pack each micro-batch's samples into rows of ``seq_len`` (first fit; ``position_ids``
    restart per sample). Samples of a row never attend to each other: every accepted
    ``model.attn_implementation`` keeps them apart by those restarts (cu_seqlens for the varlen
    kernels, a block-causal mask for sdpa/eager/flex; ``janus_train.model.attention``)."""
    pad_to_multiple_of: int = 1
    """Pad each micro-batch's length to a multiple of this (e.g. 64 for tensor cores)."""
