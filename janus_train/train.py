"""``janus-train``: the Hydra app and the training loop of every stage, top to bottom.

    janus-train experiment=janus_pro_1b stage=stage2 deepspeed=zero3 [key=value ...]
    torchrun --nproc_per_node 8 -m janus_train.train experiment=... stage=...
    deepspeed --num_gpus 8 --module janus_train.train experiment=... stage=...
    janus-train ... --cfg job        # print the composed config and exit
    janus-train ... train.dry_run=true   # validate config, data, batch; print the plan, write nothing

Re-running the same command resumes from ``run_dir/checkpoints/latest``. Exit status:
0 done; 75 (``EXIT_REQUEUE``) checkpointed after SIGTERM/SIGUSR1, requeue me; 70 stuck after
such a signal (``trainer/guard.py``); 2 a user error (one line); 3 (``EXIT_STORAGE_FULL``) a
checkpoint did not fit on the disk (one ``storage full:`` line; the previous one stays
``latest``); anything else is an error (e.g.
``train.max_consecutive_skips`` non-finite updates in a row).

``run`` reads top to bottom: :func:`prepare` (validate; the stage resolved once, a
:class:`StageSpec`), :func:`build_engine` (model, freezing, DeepSpeed), the loop of :func:`train_step` inside one :class:`RunGuard` (clean-up on
every exit path), with the :class:`TrainState` saved and loaded as one.

Loss of an optimizer step (``train.loss_reduction``): ``token_mean`` = sum of every supervised
token's CE over all micro-batches and ranks / number of those tokens; ``task_mean_sum`` = sum
over tasks of each task's token mean. The token counts are known before any forward
(``count_supervised``) and all-reduced first, so each micro-batch's backward carries its exact
share of the step loss.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from janus_train.batch import TASKS, check_batch, count_supervised
from janus_train.config import (
    CONF_DIR,
    RunConfig,
    check_removed_keys,
    explain_removed_key,
    resolve_stage,
    to_run_config,
)
from janus_train.data.synthetic_loader import SyntheticStepLoader
from janus_train.errors import (
    debug_requested,
    is_storage_full,
    is_user_error,
    report_storage_full,
    report_user_error,
)
from janus_train.model import (
    JanusTrainModel,
    apply_freeze,
    build_model,
    get_processor,
    set_train_mode,
    write_trainable_report,
)
from janus_train.model.attention import check_attn_available
from janus_train.model.build import check_init_from, hf_init_from, loads_partitioned
from janus_train.model.chat_template import set_chat_template
from janus_train.model.forward import with_index
from janus_train.model.kernels import build_head_loss, check_kernels_available
from janus_train.step_loader import StepLoader
from janus_train.trainer.checkpoint import EXIT_REQUEUE, tag_for
from janus_train.trainer.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    build_deepspeed_config,
    check_quantized_available,
    exit_finished,
    init_engine,
    partitioned_load,
    resolve_precision,
    set_collective_timeout,
    set_lr,
    setup_distributed,
)
from janus_train.trainer.export import export_hf, is_exported
from janus_train.trainer.guard import RunGuard
from janus_train.trainer.metrics import FlopCounter, MetricsLogger, Throughput, fill_metrics
from janus_train.trainer.model_card import model_card
from janus_train.trainer.optim import build_param_groups, lr_at
from janus_train.trainer.spec import StageSpec
from janus_train.trainer.startup import node_copy_root, node_local_init_from
from janus_train.trainer.state import (
    Checkpointer,
    TrainState,
    load_train_state,
    prepare_resume,
)

logger = logging.getLogger("janus_train")
EXIT_OK = 0
__all__ = ["EXIT_OK", "build_engine", "forward_backward", "run", "step_weights"]


@dataclass
class Prepared:
    """A validated, planned stage (no model yet)."""

    spec: StageSpec
    precision: str
    ds_config: dict
    run_dir: Path
    ckpt_dir: Path


@dataclass
class Trainee:
    """The model being trained: the HF model, its processor, the DeepSpeed engine wrapping it."""

    janus: torch.nn.Module
    processor: object
    engine: object
    flops: FlopCounter


@dataclass
class StepOut:
    """What one optimizer step leaves for the checks and the log."""

    n_tokens: torch.Tensor  # (3,) supervised tokens of the step, all ranks
    weights: torch.Tensor  # (3,) per-task loss weights
    lr: float
    grad_norm: float | None  # None when DeepSpeed computed none
    loss: float | None  # all-reduced; None on steps that neither log nor need it
    summed: torch.Tensor | None  # (6,) all-reduced CE sums + throughput counters, with loss
    stop: bool  # some rank got a stop signal before this step
    applied: bool  # DeepSpeed applied the update (not an overflow skip)
    saves_ready: bool  # every rank had done its part of the pending save's phase before it
    saves_failed: bool  # and some rank's part had failed


def build_loader(cfg: RunConfig, spec: StageSpec, processor, rank: int) -> StepLoader:
    """The step loader of stage ``spec``: synthetic batches or the WebDataset pipeline (same
    interface)."""
    if cfg.train.synthetic_data:
        return SyntheticStepLoader(
            processor,
            cfg.model,
            spec.plan,
            spec.ratio,
            rank=rank,
            seq_len=cfg.train.synthetic_seq_len,
            length_mix=cfg.train.synthetic_length_mix,
            seed=cfg.data.seed,
        )
    from janus_train.data.loader import build_train_loader

    ctx = spec.context(processor, cfg.model, cfg.data)
    # token-budget mode: the ranks exchange their queued sample lengths once per step
    return build_train_loader(
        spec.recipe, ctx, cfg.data, spec.ratio, spec.plan, rank=rank, exchange=all_gather_objects
    )


def step_weights(n_tokens: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-task weights w (3,) float64 such that ``sum(w * loss_sum)`` over the step is its loss.
    ``n_tokens``: (3,) supervised tokens of the whole step (all micro-batches and ranks)."""
    n = n_tokens.double()
    if reduction == "token_mean":
        total = n.sum()
        w = torch.full_like(n, 1.0 / total.item() if total > 0 else 0.0)
    else:  # task_mean_sum: a task absent from the step contributes nothing
        w = torch.where(n > 0, 1.0 / n.clamp(min=1), torch.zeros_like(n))
    return w


def forward_backward(
    engine, micro_batches: list[dict], weights: torch.Tensor, loss_scale: float
) -> torch.Tensor:
    """Forward + backward of one step's micro-batches; returns the summed per-task CE (3,).

    The number of micro-batches may change from step to step (token-budget micro-batches; the
    same on every rank): the last one is marked as the accumulation boundary explicitly, and
    backwards are not divided by DeepSpeed's nominal accumulation steps. ``engine.step()``
    runs after all but the last micro-batch; the caller's ``engine.step()`` after this is the
    real update. ``loss_scale`` = world undoes DeepSpeed's averaging (see distributed.py).
    """
    weights = weights.float().to(engine.device)
    total = torch.zeros(len(TASKS), dtype=torch.float64, device=engine.device)
    for i, mb in enumerate(micro_batches):
        engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
        out = engine(mb)
        engine.backward((out["loss_sum"] * weights).sum() * loss_scale, scale_wrt_gas=False)
        total += out["loss_sum"].detach().double()
        if i < len(micro_batches) - 1:
            engine.step()
    return total


def _to_device(batch: dict, device) -> dict:
    """Pinned host memory (CUDA) so the copies are asynchronous: the step does not wait."""
    pin = torch.device(device).type == "cuda"
    return {
        k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in batch.items()
    }


def _gather_counters(loader: StepLoader) -> dict[str, int]:
    """Loader counters summed over ranks (keys may differ per rank)."""
    total: Counter = Counter()
    for part in all_gather_objects(loader.counters()):
        total.update(part)
    return dict(total)


def resolve_on_every_rank(cfg: RunConfig, info: DistInfo) -> StageSpec:
    """The stage resolved once per rank (:func:`resolve_stage`), its recipe loaded and checked
    against the stage, and the evaluation's (:func:`check_eval`); only rank 0 stats every shard
    (once per job, not once per rank). An error on any rank is raised on every rank.
    Collective."""
    spec = err = None
    try:
        spec = resolve_stage(cfg, info.world_size, with_recipe=True, stat_shards=info.is_main)
        check_eval(cfg, stat_shards=info.is_main)
    except (ValueError, FileNotFoundError) as e:
        err = e
    dev = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else None
    if all_reduce_sum(torch.tensor([float(err is not None)], device=dev)).item():
        raise err or ValueError("data recipe check failed on rank 0 (see its log)")
    return spec


def prepare(cfg: RunConfig, info: DistInfo) -> Prepared:
    """Validate and resolve the stage once (:class:`StageSpec`) before any model exists; writes
    ``ds_config.json`` and ``config.yaml`` into the run dir."""
    tc = cfg.train
    check_init_from(cfg.model)
    # batch arithmetic, then recipe, sources and shard existence, before any model
    spec = resolve_on_every_rank(cfg, info)
    precision = resolve_precision(cfg.deepspeed.precision)
    ds = build_deepspeed_config(cfg.deepspeed, spec.plan, precision, spec.weight_decay, spec.lr)
    if tc.keep_last < 2:  # resume is always on: a damaged newest one needs one to fall back to
        raise ValueError(
            f"train.keep_last={tc.keep_last}: must be >= 2, so that a damaged newest "
            "checkpoint leaves an older one to resume from"
        )
    run_dir = Path(tc.run_dir)
    if info.is_main and not tc.dry_run:  # a dry run prints its plan and leaves no run dir
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "ds_config.json").write_text(_json(ds))
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        plan = spec.plan
        batching = (
            f"micro-batches of <= {plan.tokens_per_micro} tokens x {plan.world_size} ranks"
            if plan.tokens_per_micro
            else f"{plan.micro_batch_size} micro x {plan.grad_accum} accum x {plan.world_size} ranks"
        )
        logger.info(
            "%s %s: %d steps, batch %d samples in %s, %s, ZeRO-%d",
            spec.experiment,
            spec.name,
            spec.stop_step,
            plan.global_batch_size,
            batching,
            precision,
            cfg.deepspeed.zero_stage,
        )
        logger.info(
            "DeepSpeed config (also in %s): %s",
            run_dir / "ds_config.json",
            json.dumps(ds, sort_keys=True),
        )
    return Prepared(spec, precision, ds, run_dir, run_dir / "checkpoints")


def check_eval(cfg: RunConfig, stat_shards: bool = True) -> None:
    """With ``eval.every``: every ``eval.metrics`` callable and the held-out recipe load now,
    not at the first evaluation after hours of training: its file, its sources and its shards
    (globbed; with ``stat_shards``, rank 0's part, every local one an existing tar file)."""
    if not cfg.eval.every:
        return
    from janus_train.data.recipe import load_recipe
    from janus_train.data.tario import check_tar, is_remote

    if cfg.eval.metrics:
        from janus_train.evaluate import load_metric

        for spec in cfg.eval.metrics:
            load_metric(spec)
    recipe = load_recipe(cfg.eval.recipe, stat_shards=stat_shards)
    if stat_shards:
        for src in recipe.sources:
            for url in src.shards:
                if not is_remote(url):
                    check_tar(url, f"{recipe.path}: source {src.name}")


def build_engine(
    cfg: RunConfig, spec: StageSpec, info: DistInfo, ds_config: dict, run_dir: str | os.PathLike
) -> Trainee:
    """Model, freezing and DeepSpeed engine, as every stage trains them (also used by the tests
    and benchmarks that drive the engine directly). Collective."""
    run_dir = Path(run_dir)
    torch.manual_seed(cfg.train.seed + info.rank)
    if info.is_main:  # a locally trained tokenizer is written once, then read by every rank
        get_processor(cfg.model, run_dir)
    barrier()
    # model.init_from is read in the training dtype: no rank holds an fp32 copy of a bf16 run;
    # a whole load reads the node's copy: the shared file system is read once per node
    # (a partitioned load reads it in place: node_copy_root)
    bf16 = ds_config.get("bf16", {}).get("enabled", False)
    init = cfg.model.init_from and hf_init_from(cfg.model.init_from)
    partitioned = partitioned_load(ds_config)  # ZeRO-3: no rank holds the whole model
    root = node_copy_root(
        cfg.train.init_from_node_copy, bool(partitioned and init and loads_partitioned(init))
    )
    with node_local_init_from(init, root, info.rank, all_gather_objects) as src:
        janus, processor = build_model(
            dataclasses.replace(cfg.model, init_from=src),
            workdir=run_dir,
            dtype=torch.bfloat16 if bf16 else torch.float32,
            partitioned=partitioned,
        )
    # The trained prompt format as the processor's chat template (evaluation, the export),
    # saved at once in run_dir/processor.
    replaced = set_chat_template(processor, spec.prompt)
    if info.is_main:
        processor.save_pretrained(run_dir / "processor")
        logger.info("chat template: %s", "the run's format" if replaced else "the checkpoint's own")
    report = apply_freeze(janus, list(spec.trainable), cfg.model.lora)  # + LoRA adapters
    if info.is_main:
        write_trainable_report(report, run_dir / "trainable.json")
    flops = FlopCounter(janus)
    zero3 = cfg.deepspeed.zero_stage == 3
    model = JanusTrainModel(
        janus, params_partitioned=zero3, head_loss=build_head_loss(cfg.model, zero3)
    )
    engine = init_engine(model, ds_config, build_param_groups(model, spec.weight_decay))
    set_train_mode(janus, list(spec.trainable))
    return Trainee(janus, processor, engine, flops)


def train_step(
    cfg: RunConfig,
    spec: StageSpec,
    t: Trainee,
    loader: StepLoader,
    step: int,
    guard: RunGuard,
    meter: Throughput,
    log_now: bool,
    saver: Checkpointer | None = None,
) -> StepOut:
    """One optimizer step (index ``step``, 0-based) on every rank. Collective.
    ``saver``: its pending save's flags ride in the step's all-reduce, and its writes are
    released once every rank is in it (``Checkpointer.release``)."""
    tc, plan, engine = cfg.train, spec.plan, t.engine
    host = loader.next_step()
    local_n = torch.stack([count_supervised(check_batch(b)) for b in host]).sum(0)
    meter.add_step(host)
    # indexed on the host (no sync in the forward), then copied; uint8 -> float on the device
    micro = [loader.finish(_to_device(with_index(b, t.janus), engine.device)) for b in host]
    # The loop's one collective of a non-logging step: the supervised-token counts (the loss
    # normalisation, needed before any backward), the stop flag (a signal that arrived
    # before this step is honoured right after it, on every rank together), the
    # micro-step count m (equal on all ranks iff world * sum m^2 == (sum m)^2) and the
    # pending checkpoint's flags (this rank's thread done; it failed): once every rank is
    # done, the save advances a phase after this step.
    m = float(len(host))
    save_flags = (1.0, 0.0) if saver is None else saver.flags()
    flags = [float(guard.stop_requested), m, m * m, *save_flags]
    red = all_reduce_sum(
        torch.cat(
            [
                local_n.to(torch.float64),
                torch.tensor(flags, dtype=torch.float64),
            ]
        ).to(engine.device)
    ).cpu()
    if saver is not None:  # every rank is past its save: its writer may take a core now
        saver.release()
    n_tokens, stop = red[:3].to(local_n.dtype), bool(red[3] > 0)
    if float(red[5]) * plan.world_size != float(red[4]) ** 2:
        raise RuntimeError(
            f"step {step}: ranks hold different micro-step counts (this rank {len(host)}); "
            "ZeRO's collectives would hang"
        )
    weights = step_weights(n_tokens, tc.loss_reduction)
    lr = lr_at(step, spec.lr, spec.warmup_steps, spec.steps, spec.schedule, spec.min_lr_ratio)
    set_lr(engine, lr)

    loss_sum = forward_backward(engine, micro, weights, plan.loss_scale)
    engine.step()
    grad_norm = engine.get_global_grad_norm()
    grad_norm = None if grad_norm is None else float(grad_norm)
    # The loss is all-reduced (a host sync) only at logging steps, or every step when DeepSpeed
    # gives no grad norm to detect non-finite updates with.
    loss = summed = None
    if log_now or grad_norm is None:
        summed = all_reduce_sum(
            torch.cat([loss_sum.to(torch.float64), meter.local[:3].to(engine.device)])
        ).cpu()
        loss = float((summed[:3] * weights).sum())
    applied = bool(engine.was_step_applied())
    ready, failed = int(red[6]) == plan.world_size, bool(red[7] > 0)
    return StepOut(n_tokens, weights, lr, grad_norm, loss, summed, stop, applied, ready, failed)


def check_update(out: StepOut, state: TrainState, tc, ckpt_dir: Path) -> None:
    """Non-finite updates, detected on values every rank shares (DeepSpeed's global grad norm
    and overflow skip, the all-reduced loss where computed): counted while skipped, fatal after
    ``train.max_consecutive_skips`` in a row or when DeepSpeed applied one."""
    finite = (out.grad_norm is None or math.isfinite(out.grad_norm)) and (
        out.loss is None or math.isfinite(out.loss)
    )
    if not finite and out.applied:
        raise RuntimeError(
            f"step {state.step}: DeepSpeed applied a non-finite update "
            f"(loss {out.loss}, grad norm {out.grad_norm}); use ZeRO stage >= 1"
        )
    if finite and out.applied:
        state.consecutive_skips = 0
        return
    state.skipped_steps += 1
    state.consecutive_skips += 1
    logger.warning(
        "step %d: non-finite loss %s / grad norm %s, update skipped (%d in a row)",
        state.step,
        out.loss,
        out.grad_norm,
        state.consecutive_skips,
    )
    if state.consecutive_skips >= tc.max_consecutive_skips:
        raise RuntimeError(
            f"stopping at step {state.step}: {state.consecutive_skips} consecutive non-finite "
            f"updates (train.max_consecutive_skips={tc.max_consecutive_skips}); the last good "
            f"checkpoint is {ckpt_dir / 'latest'}"
        )


def step_record(
    out: StepOut, state: TrainState, meter: Throughput, loader: StepLoader, world_size: int
) -> dict:
    """The metrics row of a logging step. Collective (loader counters are gathered)."""
    rec = {
        "step": state.step,
        "time": time.time(),
        "loss": out.loss,
        "optim/lr": out.lr,
        "optim/grad_norm": out.grad_norm,
        "optim/skipped_steps": state.skipped_steps,
        "ckpt/fallbacks": state.ckpt_fallbacks,
    }
    for i, task in enumerate(TASKS):
        n = float(out.n_tokens[i])
        rec[f"loss/{task}"] = float(out.summed[i]) / n if n > 0 else None
        rec[f"tokens/{task}"] = int(n)
    rec.update(meter.record(out.summed[3:6], world_size))
    rec.update({f"data/{k}": v for k, v in _gather_counters(loader).items()})
    rec.update(fill_metrics(all_gather_objects(meter.fill)))
    meter.fill = []
    return rec


def evaluate(cfg: RunConfig, prep: Prepared, t: Trainee, step: int, metrics: MetricsLogger) -> None:
    """In-training evaluation on all ranks (``eval.every``)."""
    from janus_train.evaluate import run_eval

    eval_dir = prep.run_dir / "eval" / tag_for(step)
    res = run_eval(t.janus, t.processor, prep.spec, cfg.model, cfg.data, cfg.eval, step, eval_dir)
    metrics.log(
        {"step": step, **{k if k.startswith("eval/") else f"eval/{k}": v for k, v in res.items()}}
    )
    metrics.log_eval_media(step, eval_dir)
    set_train_mode(t.janus, list(prep.spec.trainable))


def build_metrics(
    cfg: RunConfig, info: DistInfo, run_dir: Path, state: TrainState, total_steps: int
) -> MetricsLogger:
    """Rank 0's metrics: ``metrics.jsonl`` (rows after ``state.step`` dropped), wandb when
    enabled, a log line per logged step when no progress bar shows."""
    tc = cfg.train
    wandb_cfg = None
    if tc.wandb:
        wandb_cfg = dict(
            project=tc.wandb_project,
            name=f"{cfg.experiment.name}-{cfg.stage.name}",
            config=OmegaConf.to_container(
                OmegaConf.structured(cfg), resolve=True, enum_to_str=True
            ),
            run_id=state.wandb_id,
            run_dir=str(run_dir),
        )
    metrics = MetricsLogger(
        run_dir,
        info.is_main,
        wandb_cfg,
        resume_step=state.step,
        total_steps=total_steps,
        console=not (tc.progress_bar and sys.stderr.isatty()),
    )
    state.wandb_id = metrics.wandb_id or state.wandb_id
    return metrics


class _Bar:
    """tqdm bar on rank 0 when stderr is a terminal (else a no-op)."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(self, out: StepOut) -> None:
        if self.bar is not None:
            if out.loss is not None:
                self.bar.set_postfix(loss=f"{out.loss:.4f}", lr=f"{out.lr:.2e}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def export_stage(cfg: RunConfig, prep: Prepared, t: Trainee, step: int, info: DistInfo) -> None:
    """Collective: the stage's HF export (``run_dir/hf``, the next stage's ``model.init_from``,
    with its model card), once, when ``train.export_at_end``."""
    tc = cfg.train
    set_collective_timeout(tc.init_timeout_s)  # consolidation on rank 0 may be slow
    out_dir = prep.run_dir / "hf"
    if not tc.export_at_end or is_exported(out_dir, step):
        return
    card = partial(
        model_card,
        prep.spec,
        t.processor,
        step,
        model=cfg.model,
        deepspeed=cfg.deepspeed,
        loss_reduction=tc.loss_reduction,
        seq_len=cfg.data.seq_len,
        metrics_path=prep.run_dir / "metrics.jsonl",
    )  # called on rank 0, with the exported weights' dtype
    zero, shard = cfg.deepspeed.zero_stage, tc.export_max_shard_size
    export_hf(t.janus, t.processor, out_dir, zero, info, step, shard, card, tc.export_dtype)
    logger.info("exported %s (next stage: model.init_from=%s)", out_dir, out_dir.resolve())


def check_machine(cfg: RunConfig, info: DistInfo) -> None:
    """What this machine cannot run, before any model (a dry run may plan for another one)."""
    check_attn_available(cfg.model.attn_implementation)
    check_kernels_available(cfg.model)
    check_quantized_available(cfg.deepspeed, info.world_size)


def run(cfg: RunConfig) -> int:
    """Train one stage; returns the exit status (``EXIT_OK`` or ``EXIT_REQUEUE``)."""
    tc = cfg.train
    info = setup_distributed(tc.init_timeout_s)
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logger.setLevel(logging.INFO if info.is_main else logging.WARNING)
    prep = prepare(cfg, info)
    spec, stop_step = prep.spec, prep.spec.stop_step
    if tc.dry_run:
        if info.is_main:
            print(_json({"batch": dataclasses.asdict(spec.plan), "deepspeed": prep.ds_config}))
        return EXIT_OK
    check_machine(cfg, info)
    # From here on, whatever ends the run (end, exception, signal) closes what `guard` holds.
    with RunGuard(tc.stop_grace_s) as guard:
        # the newest checkpoint that verifies; universal when the world size changed
        resume = prepare_resume(prep.ckpt_dir, info, prep.ds_config)
        t = build_engine(cfg, spec, info, prep.ds_config, prep.run_dir)
        loader = guard.add(build_loader(cfg, spec, t.processor, info.rank))
        state = load_train_state(t.engine, prep.ckpt_dir, loader, info, resume)
        metrics = guard.add(build_metrics(cfg, info, prep.run_dir, state, stop_step))
        bar = guard.add(_Bar(info.is_main and tc.progress_bar, stop_step, state.step, spec.name))
        meter = Throughput(t.flops)
        set_collective_timeout(tc.collective_timeout_s)  # set-up done: training collectives
        saved_at = state.step if state.resumed_from is not None else -1
        saver = guard.add(Checkpointer(t.engine, prep.ckpt_dir, info, tc.keep_last, tc.ckpt_async))

        def checkpoint(save: bool, commit: bool, none_failed: bool = False) -> None:
            """Start a save of this step (``save``; the pending one is committed first, or
            carried when only its agreement is left) and/or commit the pending save
            (``commit``; neither: advance it one phase)."""
            t0 = time.perf_counter()
            set_collective_timeout(tc.init_timeout_s)  # rank 0 writes more than the others
            if save:
                saver.save(state, loader)
            if commit:
                saver.commit()
            elif not save:
                saver.advance(none_failed)
            set_collective_timeout(tc.collective_timeout_s)
            meter.exclude(time.perf_counter() - t0)  # throughput counts training time only
            guard.progress()

        while state.step < stop_step:
            log_now = (state.step + 1) % tc.log_every == 0 or state.step + 1 == stop_step
            out = train_step(cfg, spec, t, loader, state.step, guard, meter, log_now, saver)
            state.step += 1
            guard.progress()
            if saver.pending is not None and out.saves_ready:  # e.g. every rank's files synced
                checkpoint(save=False, commit=False, none_failed=not out.saves_failed)
            check_update(out, state, tc, prep.ckpt_dir)
            if log_now:
                metrics.log(step_record(out, state, meter, loader, info.world_size))
            bar.update(out)
            if cfg.eval.every and state.step % cfg.eval.every == 0:
                t0 = time.perf_counter()
                evaluate(cfg, prep, t, state.step, metrics)
                meter.exclude(time.perf_counter() - t0)
                guard.progress()
            if out.stop:  # some rank got SIGTERM/SIGUSR1: all ranks checkpoint and leave
                checkpoint(save=True, commit=True)
                logger.warning(
                    "stop signal: checkpointed step %d, exiting %d (requeue)",
                    state.step,
                    EXIT_REQUEUE,
                )
                return EXIT_REQUEUE
            if (tc.ckpt_every and state.step % tc.ckpt_every == 0) or state.step == stop_step:
                checkpoint(save=True, commit=state.step == stop_step)
                saved_at = state.step

        # ---- end of stage: final checkpoint (committed), HF export ---------------------
        if saved_at != state.step or saver.pending is not None:
            checkpoint(save=saved_at != state.step, commit=True)
        export_stage(cfg, prep, t, state.step, info)
    return EXIT_OK


def _json(obj) -> str:
    return json.dumps(obj, indent=2, default=str)


_exit_status = EXIT_OK
_error: Exception | None = None


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(dcfg: DictConfig) -> None:
    global _exit_status, _error
    try:
        _exit_status = run(to_run_config(dcfg))
    except Exception as e:  # noqa: BLE001  # classified in main(), outside Hydra's reporting
        _error = e


def dry_run_requested(args: list[str]) -> bool:
    """Whether the command line sets ``train.dry_run`` true, read as Hydra and OmegaConf will:
    the override grammar (``train.dry_run=...``, ``+``/``++`` forms, the last one counts, ``~``
    deletes), then the conversion of a ``bool`` field (``true``/``yes``/``on``/``1``, any case).
    A value either cannot read is Hydra's to report: not a dry run here."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import BooleanNode, OmegaConf

    parser, on = OverridesParser.create(), False
    for arg in args:
        if arg[:1] == "-" or "dry_run" not in arg:
            continue
        try:
            (o,) = parser.parse_overrides([arg])
            if o.key_or_group == "train.dry_run":
                on = not o.is_delete() and OmegaConf.create({"v": BooleanNode(o.value())}).v
        except Exception:  # noqa: BLE001  # Hydra reports the bad override itself
            continue
    return bool(on)


def main() -> None:
    # The `deepspeed` launcher appends --local_rank=N unless given --no_local_rank; Hydra would
    # reject it, and LOCAL_RANK in the environment carries the same information.
    for arg in list(sys.argv[1:]):
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            sys.argv.remove(arg)
    from janus_train.quiet import quiet_known_noise

    quiet_known_noise()
    if {"--help", "-h"} & set(sys.argv[1:]):  # ours; Hydra's own stays under --hydra-help
        from janus_train.cli_help import render
        from janus_train.errors import run_cli

        run_cli("janus-train", lambda: print(render([a for a in sys.argv[1:] if a[:1] != "-"])))
        sys.exit(0)
    if dry_run_requested(sys.argv[1:]):
        # Hydra's own files (.hydra/, train.log) go to a scratch dir removed at exit
        scratch = tempfile.mkdtemp(prefix="janus-dry-run-")
        atexit.register(shutil.rmtree, scratch, True)
        sys.argv += [f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]
    try:  # a removed key on the command line: the one line naming its replacement, no Hydra
        check_removed_keys([a for a in sys.argv[1:] if a[:1] != "-"])
    except ValueError as e:
        sys.exit(report_user_error("janus-train", e))
    global _error
    # Hydra re-raises its composition errors (unknown key, bad override, missing config group
    # option) under HYDRA_FULL_ERROR instead of printing them and exiting 1: they are reported
    # below like every user error (one line, exit 2, recorded for launch/slurm/job.sh).
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except SystemExit as e:
        # run()'s exceptions never reach Hydra (above): a non-zero exit of Hydra's own is a
        # command-line error (argparse), a user error.
        if e.code not in (0, None):
            sys.exit(report_user_error("janus-train", ValueError("invalid command line (above)")))
        raise
    except Exception as e:  # noqa: BLE001  # Hydra's composition errors (above)
        _error = explain_removed_key(e)
    finally:
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error
    if _error is None:  # finished or requeued: exit without Python's finalization
        exit_finished(_exit_status)
    if is_storage_full(_error) and not debug_requested():  # status 3 must not become a crash
        exit_finished(report_storage_full(_error))
    if not is_user_error(_error):
        raise _error
    if debug_requested():
        traceback.print_exception(_error)
    sys.exit(report_user_error("janus-train", _error))


if __name__ == "__main__":
    main()
