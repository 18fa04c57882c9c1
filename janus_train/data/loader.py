"""The training loader built from the run config: the recipe and batch arithmetic checked, then
the rank's step loader (``janus_train.step_loader.StepLoader``).

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

from janus_train.data.builders import BuildContext
from janus_train.data.mixing import task_counts
from janus_train.data.recipe import check_recipe_for_stage, load_recipe
from janus_train.data.step_loaders import FixedStepLoader, TokenStepLoader
from janus_train.model.tokenizer import resolve_special_tokens
from janus_train.step_loader import StepLoader

logger = logging.getLogger(__name__)

__all__ = ["build_train_loader", "build_context"]


def build_context(run, processor) -> BuildContext:
    """Builder settings from the run config and the processor (ids resolved by string)."""
    tok = processor.tokenizer
    ip = processor.image_processor
    n_proc = getattr(processor, "num_image_tokens", run.model.num_image_tokens)
    if n_proc != run.model.num_image_tokens:
        raise ValueError(
            f"processor inserts {n_proc} image tokens but model.num_image_tokens "
            f"is {run.model.num_image_tokens}"
        )
    d = run.data
    return BuildContext(
        tokenizer=tok,
        st=resolve_special_tokens(tok),
        chat_template=getattr(run.experiment.chat_template, "value", run.experiment.chat_template),
        und_format=run.und_format,  # the stage's, or experiment.<stage>'s override
        gen_format=run.gen_format,
        sft=run.stage.sft,
        seq_len=d.seq_len,
        text_chunk=d.text_chunk,
        image_size=run.model.image_size,
        num_image_tokens=run.model.num_image_tokens,
        codebook_size=run.model.vq.num_embeddings,
        mean=tuple(float(x) for x in ip.image_mean),
        std=tuple(float(x) for x in ip.image_std),
        cfg_dropout=d.cfg_dropout,
        first_sentence_prob=run.hparams.first_sentence_prob,  # per stage (experiment)
        system_prompt=d.system_prompt,
    )


def build_train_loader(
    run,
    processor,
    *,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    grad_accum: int,
    recipe: str | None = None,
    tokens_per_micro: int | None = None,
    exchange=None,
) -> StepLoader:
    """Validate the recipe and batch arithmetic, then the rank's loader: a
    ``TokenStepLoader`` with ``tokens_per_micro`` > 0 (``exchange``: the all-gather of the
    ranks' queue lengths; None = a world of one), else a ``FixedStepLoader``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hp = run.hparams
    if tokens_per_micro:
        if tokens_per_micro < run.data.seq_len:
            raise ValueError(
                f"train.tokens_per_micro={tokens_per_micro} < data.seq_len="
                f"{run.data.seq_len}: a sample of seq_len tokens must fit"
            )
    elif micro_batch_size * grad_accum * world_size != hp.global_batch_size:
        raise ValueError(
            f"global_batch_size={hp.global_batch_size} != micro_batch_size {micro_batch_size} x "
            f"grad_accum {grad_accum} x world_size {world_size}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    # shard existence: rank 0 only (every rank statting every shard floods a shared filesystem)
    rec = load_recipe(recipe or run.data.recipe or hp.data_recipe, stat_shards=rank == 0)
    ratio = {"und": hp.ratio.und, "text": hp.ratio.text, "gen": hp.ratio.gen}
    check_recipe_for_stage(rec, ratio, hp.steps)
    counts = task_counts(ratio, hp.global_batch_size)
    consumers = world_size * max(1, run.data.num_workers)
    for s in rec.sources:
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
    ctx = build_context(run, processor)
    dcfg = dataclasses.replace(run.data)  # a snapshot: later edits of run.data do not leak in
    if tokens_per_micro:
        return TokenStepLoader(
            rec,
            ctx,
            dcfg,
            counts,
            rank,
            world_size,
            tokens_per_micro=tokens_per_micro,
            exchange=exchange,
        )
    return FixedStepLoader(rec, ctx, dcfg, counts, rank, world_size, micro_batch_size, grad_accum)
