"""The training loader built from the stage's typed pieces (``config.resolve_stage``: the recipe
loaded and checked once, the batch plan): the rank's step loader
(``janus_train.step_loader.StepLoader``).

::

    recipe sources --streams.py: SampleStream (split by rank x worker, seeded)--> samples
        --steps.py: the exact ratio per step, built by the workers (workers.py)-->
        --step_loaders.py: FixedStepLoader (grad_accum micro-batches of micro_batch_size)
                         | TokenStepLoader (micro-batches of <= tokens_per_micro tokens)
        --collate--> batch dicts (contract: janus_train/batch.py)
"""

from __future__ import annotations

import dataclasses
import logging
import os

from janus_train.batch import BatchPlan, task_counts
from janus_train.data.builders import BuildContext
from janus_train.data.config import DataConfig
from janus_train.data.recipe import Recipe
from janus_train.data.step_loaders import FixedStepLoader, TokenStepLoader
from janus_train.data.steps import LoaderArgs
from janus_train.model.chat_template import PromptFormat
from janus_train.model.config import ModelConfig
from janus_train.model.tokenizer import resolve_special_tokens
from janus_train.step_loader import StepLoader

logger = logging.getLogger(__name__)

__all__ = ["build_train_loader", "build_context"]


def build_context(
    processor,
    model: ModelConfig,
    data: DataConfig,
    prompt: PromptFormat,
    *,
    sft: bool = False,
    first_sentence_prob: float = 0.0,
) -> BuildContext:
    """Builder settings: the processor (ids resolved by string), the model's image geometry, the
    data settings, the stage's framing (``prompt``, ``sft``) and caption truncation."""
    tok = processor.tokenizer
    ip = processor.image_processor
    n_proc = getattr(processor, "num_image_tokens", model.num_image_tokens)
    if n_proc != model.num_image_tokens:
        raise ValueError(
            f"processor inserts {n_proc} image tokens but model.num_image_tokens "
            f"is {model.num_image_tokens}"
        )
    return BuildContext(
        tokenizer=tok,
        st=resolve_special_tokens(tok),
        chat_template=prompt.chat_template,
        und_format=prompt.style,
        gen_format=prompt.gen_style,
        sft=sft,
        seq_len=data.seq_len,
        text_chunk=data.text_chunk,
        image_size=model.image_size,
        num_image_tokens=model.num_image_tokens,
        codebook_size=model.vq.num_embeddings,
        mean=tuple(float(x) for x in ip.image_mean),
        std=tuple(float(x) for x in ip.image_std),
        cfg_dropout=data.cfg_dropout,
        first_sentence_prob=first_sentence_prob,
        system_prompt=prompt.system_prompt,
    )


def build_train_loader(
    recipe: Recipe,
    ctx: BuildContext,
    data: DataConfig,
    ratio: dict[str, int],
    plan: BatchPlan,
    *,
    rank: int,
    exchange=None,
) -> StepLoader:
    """The rank's loader of the stage's ``recipe`` (loaded and checked against the stage once,
    by ``config.resolve_stage``) under ``plan`` (its arithmetic checked by
    ``batch.plan_batch``): a ``TokenStepLoader`` with ``plan.tokens_per_micro`` > 0
    (``exchange``: the all-gather of the ranks' queue lengths; None = a world of one), else a
    ``FixedStepLoader``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    world_size = plan.world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    counts = task_counts(ratio, plan.global_batch_size)
    consumers = world_size * max(1, data.num_workers)
    for s in recipe.sources:
        if ratio[s.task_key] > 0 and len(s.shards) < consumers:
            logger.warning(
                "data source %s has %d shards < %d ranks x workers: every worker reads all of "
                "them and keeps every %d-th record (correct, but reads %dx the bytes; "
                "write more shards)",
                s.name,
                len(s.shards),
                consumers,
                consumers,
                consumers,
            )
    args = LoaderArgs(
        recipe,
        ctx,
        dataclasses.replace(data),  # a snapshot: later edits of the config do not leak in
        counts,
        rank,
        world_size,
    )
    if plan.tokens_per_micro:
        return TokenStepLoader(args, tokens_per_micro=plan.tokens_per_micro, exchange=exchange)
    return FixedStepLoader(args, plan.micro_batch_size, plan.grad_accum)
