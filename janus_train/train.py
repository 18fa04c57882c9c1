"""``janus-train``: the Hydra app and the training loop of every stage, top to bottom.

    janus-train experiment=janus_pro_1b stage=stage2 deepspeed=zero3 [key=value ...]
    torchrun --nproc_per_node 8 -m janus_train.train experiment=... stage=...
    deepspeed --num_gpus 8 --module janus_train.train experiment=... stage=...
    janus-train ... --cfg job        # print the composed config and exit
    janus-train ... train.dry_run=true   # validate config + batch arithmetic, write ds_config.json

Re-running the same command resumes from ``run_dir/checkpoints/latest``. Exit status:
0 done; 75 (``EXIT_REQUEUE``) checkpointed after SIGTERM/SIGUSR1, requeue me; anything else is
an error (e.g. ``train.max_consecutive_skips`` non-finite updates in a row).

Loss of an optimizer step (``train.loss_reduction``): ``token_mean`` = sum of every supervised
token's CE over all micro-batches and ranks / number of those tokens; ``task_mean_sum`` = sum
over tasks of each task's token mean. The token counts are known before any forward
(``count_supervised``) and all-reduced first, so each micro-batch's backward carries its exact
share of the step loss.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from janus_train.config import CONF_DIR, RunConfig, to_run_config
from janus_train.model import (
    TASKS,
    JanusTrainModel,
    apply_freeze,
    build_model,
    count_supervised,
    get_processor,
    set_train_mode,
    write_trainable_report,
)
from janus_train.model.chat_template import run_prompt_format, set_chat_template
from janus_train.trainer.checkpoint import (
    EXIT_REQUEUE,
    StopSignal,
    get_rng_state,
    load_latest,
    save_checkpoint,
    set_rng_state,
    tag_for,
)
from janus_train.trainer.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    build_deepspeed_config,
    init_engine,
    plan_as_dict,
    plan_batch,
    resolve_precision,
    set_lr,
    setup_distributed,
)
from janus_train.trainer.export import export_hf, is_exported
from janus_train.trainer.metrics import FlopCounter, MetricsLogger
from janus_train.trainer.optim import build_param_groups, lr_at
from janus_train.trainer.synthetic import SyntheticStepLoader

logger = logging.getLogger("janus_train")
EXIT_OK = 0
__all__ = ["EXIT_OK", "EXIT_REQUEUE", "forward_backward", "run", "step_weights"]


def build_loader(run: RunConfig, processor, info: DistInfo, micro_batch_size: int,
                 grad_accum: int):
    """The step loader: synthetic batches or the WebDataset pipeline (same interface)."""
    kw = dict(rank=info.rank, world_size=info.world_size, micro_batch_size=micro_batch_size,
              grad_accum=grad_accum)
    if run.train.synthetic_data:
        return SyntheticStepLoader(run, processor, **kw)
    from janus_train.data.loader import build_train_loader

    return build_train_loader(run, processor, **kw)


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


def forward_backward(engine, micro_batches: list[dict], weights: torch.Tensor,
                     loss_scale: float) -> torch.Tensor:
    """Forward + backward of one step's micro-batches; returns the summed per-task CE (3,).

    ``engine.step()`` runs after all but the last micro-batch (DeepSpeed counts micro-steps);
    the caller's ``engine.step()`` after this is the accumulation boundary, the real update.
    ``loss_scale`` = world x accumulation undoes DeepSpeed's averaging (see distributed.py).
    """
    weights = weights.float().to(engine.device)
    total = torch.zeros(len(TASKS), dtype=torch.float64, device=engine.device)
    for i, mb in enumerate(micro_batches):
        out = engine(mb)
        engine.backward((out["loss_sum"] * weights).sum() * loss_scale)
        total += out["loss_sum"].detach().double()
        if i < len(micro_batches) - 1:
            engine.step()
    return total


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _gather_counters(loader) -> dict[str, int]:
    """Loader counters summed over ranks (keys may differ per rank)."""
    local = loader.counters()
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    out: dict[str, int] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0) + int(v)
    return out


def run(cfg: RunConfig) -> int:
    """Train one stage; returns the exit status (``EXIT_OK`` or ``EXIT_REQUEUE``)."""
    tc, hp = cfg.train, cfg.hparams
    info = setup_distributed()
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logger.setLevel(logging.INFO if info.is_main else logging.WARNING)

    # ---- validate and plan before any model exists ------------------------------------
    plan = plan_batch(hp.global_batch_size, tc.micro_batch_size, info.world_size)
    precision = resolve_precision(cfg.deepspeed.precision)
    ds_config = build_deepspeed_config(cfg.deepspeed, plan, precision, hp.weight_decay, hp.lr)
    stop_step = min(hp.steps, hp.stop_at) if hp.stop_at else hp.steps
    if not tc.synthetic_data:  # recipe, sources and shard existence, before any model
        from janus_train.data.recipe import check_recipe_for_stage, load_recipe

        recipe = load_recipe(cfg.data.recipe or hp.data_recipe)
        check_recipe_for_stage(recipe, {"und": hp.ratio.und, "text": hp.ratio.text,
                                        "gen": hp.ratio.gen}, hp.steps)
    run_dir, ckpt_dir = Path(tc.run_dir), Path(tc.run_dir) / "checkpoints"
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "ds_config.json").write_text(_json(ds_config))
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        logger.info("%s %s: %d steps, batch %d = %d micro x %d accum x %d ranks, %s, ZeRO-%d",
                    cfg.experiment.name, cfg.stage.name, stop_step, plan.global_batch_size,
                    plan.micro_batch_size, plan.grad_accum, plan.world_size, precision,
                    cfg.deepspeed.zero_stage)
        logger.info("DeepSpeed config (also in %s): %s", run_dir / "ds_config.json",
                    json.dumps(ds_config, sort_keys=True))
    if tc.dry_run:
        if info.is_main:
            print(_json({"batch": plan_as_dict(plan), "deepspeed": ds_config}))
        return EXIT_OK

    # ---- model, freezing, engine ------------------------------------------------------
    stop = StopSignal()  # from here on a pre-emption notice is honoured after the next step
    torch.manual_seed(tc.seed + info.rank)
    if info.is_main:  # a locally trained tokenizer is written once, then read by every rank
        get_processor(cfg.model, run_dir)
    barrier()
    janus, processor = build_model(cfg.model, workdir=run_dir)
    # The trained prompt format as the processor's chat template (evaluation, the export),
    # saved at once in run_dir/processor.
    replaced = set_chat_template(processor, run_prompt_format(cfg))
    if info.is_main:
        processor.save_pretrained(run_dir / "processor")
        logger.info("chat template: %s", "the run's format" if replaced else "the checkpoint's own")
    report = apply_freeze(janus, cfg.trainable_groups, cfg.model.lora)  # + LoRA adapters
    if info.is_main:
        write_trainable_report(report, run_dir / "trainable.json")
    flops = FlopCounter(janus)
    model = JanusTrainModel(janus, params_partitioned=cfg.deepspeed.zero_stage == 3)
    engine = init_engine(model, ds_config, build_param_groups(model, hp.weight_decay))
    set_train_mode(janus, cfg.trainable_groups)
    loader = build_loader(cfg, processor, info, plan.micro_batch_size, plan.grad_accum)

    # ---- resume -----------------------------------------------------------------------
    step, skipped_total, consecutive, wandb_id = 0, 0, 0, None
    resumed = load_latest(engine, ckpt_dir, info)
    if resumed is not None:
        client, rank_state = resumed
        client = client["janus_train"]  # namespaced: DeepSpeed owns top-level keys
        step, wandb_id = client["step"], client.get("wandb_id")
        skipped_total, consecutive = client["skipped_steps"], client["consecutive_skips"]
        loader.load_state_dict(rank_state["loader"])
        set_rng_state(rank_state["rng"])
        logger.info("resuming at step %d", step)
    wandb_cfg = None
    if tc.wandb:
        wandb_cfg = dict(project=tc.wandb_project, name=f"{cfg.experiment.name}-{cfg.stage.name}",
                         config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True,
                                                       enum_to_str=True),
                         run_id=wandb_id, run_dir=str(run_dir))
    metrics = MetricsLogger(run_dir, info.is_main, wandb_cfg)
    bar = None
    if info.is_main and tc.progress_bar and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=stop_step, initial=step, desc=cfg.stage.name, dynamic_ncols=True)

    def checkpoint() -> None:
        client = {"janus_train": {"step": step, "wandb_id": metrics.wandb_id or wandb_id,
                                  "skipped_steps": skipped_total,
                                  "consecutive_skips": consecutive}}
        rank_state = {"loader": loader.state_dict(), "rng": get_rng_state()}
        save_checkpoint(engine, ckpt_dir, step, client, rank_state, info, tc.keep_last)

    # ---- the loop ---------------------------------------------------------------------
    window = torch.zeros(4, dtype=torch.float64)  # local tokens, samples, FLOPs; steps
    t_log, saved_at = time.perf_counter(), step if resumed else -1
    while step < stop_step:
        host = loader.next_step()
        # Counted on the host copies: no device synchronisation inside the step.
        local_n = torch.stack([count_supervised(b) for b in host]).sum(0)
        window += torch.tensor([sum(int(b["attention_mask"].sum()) for b in host),
                                sum(int(b["input_ids"].shape[0]) for b in host),
                                sum(flops.batch_flops(b) for b in host), 1.0],
                               dtype=torch.float64)
        micro = [loader.finish(_to_device(b, engine.device)) for b in host]  # uint8 -> float
        # The loop's one collective of a non-logging step: the supervised-token counts (the
        # loss normalisation, needed before any backward) and the stop flag (a signal that
        # arrived before this step is honoured right after it, on every rank together).
        red = all_reduce_sum(torch.cat([
            local_n.to(torch.float64), torch.tensor([float(stop.requested)], dtype=torch.float64)
        ]).to(engine.device)).cpu()
        n_tokens, stop_now = red[:3].to(local_n.dtype), bool(red[3] > 0)
        weights = step_weights(n_tokens, tc.loss_reduction)
        lr = lr_at(step, hp.lr, hp.warmup_steps, hp.steps, hp.schedule.value, hp.min_lr_ratio)
        set_lr(engine, lr)

        loss_sum = forward_backward(engine, micro, weights, plan.loss_scale)
        engine.step()
        grad_norm = engine.get_global_grad_norm()  # None when DeepSpeed computed none
        grad_norm = None if grad_norm is None else float(grad_norm)
        step += 1

        # Non-finite steps are detected on values every rank shares: DeepSpeed's global grad
        # norm and its overflow skip, plus the all-reduced loss where that is computed: at
        # logging steps (CE sums and throughput counters), or every step when DeepSpeed gives
        # no grad norm. Other steps leave the loss on the device (no host sync).
        log_now = step % tc.log_every == 0 or step == stop_step
        loss = None
        if log_now or grad_norm is None:
            summed = all_reduce_sum(torch.cat([
                loss_sum.to(torch.float64), window[:3].to(engine.device)
            ])).cpu()
            loss = float((summed[:3] * weights).sum())
        finite = (grad_norm is None or math.isfinite(grad_norm)) and (
            loss is None or math.isfinite(loss))
        applied = bool(getattr(engine, "_step_applied", True))
        if not finite and applied:
            raise RuntimeError(f"step {step}: DeepSpeed applied a non-finite update "
                               f"(loss {loss}, grad norm {grad_norm}); use ZeRO stage >= 1")
        if finite and applied:
            consecutive = 0
        else:
            skipped_total, consecutive = skipped_total + 1, consecutive + 1
            logger.warning("step %d: non-finite loss %s / grad norm %s, update skipped (%d in a "
                           "row)", step, loss, grad_norm, consecutive)
            if consecutive >= tc.max_consecutive_skips:
                raise RuntimeError(
                    f"stopping at step {step}: {consecutive} consecutive non-finite updates "
                    f"(train.max_consecutive_skips={tc.max_consecutive_skips}); the last good "
                    f"checkpoint is {ckpt_dir / 'latest'}")

        if log_now:
            elapsed = time.perf_counter() - t_log
            window[:3] = summed[3:6]  # every rank's tokens, samples and FLOPs
            rec = {"step": step, "time": time.time(), "loss": loss, "optim/lr": lr,
                   "optim/grad_norm": grad_norm, "optim/skipped_steps": skipped_total}
            for i, task in enumerate(TASKS):
                n = float(n_tokens[i])
                rec[f"loss/{task}"] = float(summed[i]) / n if n > 0 else None
                rec[f"tokens/{task}"] = int(n)
            rec["speed/tokens_per_s"] = float(window[0]) / elapsed
            rec["speed/samples_per_s"] = float(window[1]) / elapsed
            rec["speed/step_time_s"] = elapsed / float(window[3])
            mfu = flops.mfu(float(window[2]), elapsed, info.world_size)
            if mfu is not None:
                rec["speed/mfu"] = mfu
            rec.update({f"data/{k}": v for k, v in _gather_counters(loader).items()})
            metrics.log(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            window.zero_()
            t_log = time.perf_counter()
        if bar is not None:
            bar.update(1)

        if tc.eval_every and step % tc.eval_every == 0:
            from janus_train.evaluate import run_eval

            t_eval = time.perf_counter()
            eval_dir = run_dir / "eval" / tag_for(step)
            res = run_eval(janus, processor, cfg, step, eval_dir)
            metrics.log({"step": step, **{k if k.startswith("eval/") else f"eval/{k}": v
                                          for k, v in res.items()}})
            metrics.log_eval_media(step, eval_dir)
            set_train_mode(janus, cfg.trainable_groups)
            t_log += time.perf_counter() - t_eval  # throughput counts training time only

        if stop_now:  # some rank got SIGTERM/SIGUSR1: all ranks checkpoint and leave
            checkpoint()
            logger.warning("stop signal: checkpointed step %d, exiting %d (requeue)", step,
                           EXIT_REQUEUE)
            loader.close()
            metrics.close()
            stop.restore()
            return EXIT_REQUEUE
        if (tc.ckpt_every and step % tc.ckpt_every == 0) or step == stop_step:
            t_ckpt = time.perf_counter()
            checkpoint()
            saved_at = step
            t_log += time.perf_counter() - t_ckpt

    # ---- end of stage: final checkpoint, HF export -------------------------------------
    if saved_at != step:
        checkpoint()
    if bar is not None:
        bar.close()
    out = run_dir / "hf"
    if tc.export_at_end and not is_exported(out, step):
        export_hf(janus, processor, out, cfg.deepspeed.zero_stage, info, step)
        logger.info("exported %s (next stage: model.init_from=%s)", out, out.resolve())
    loader.close()
    metrics.close()
    stop.restore()
    return EXIT_OK


def _json(obj) -> str:
    return json.dumps(obj, indent=2, default=str)


_exit_status = EXIT_OK


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(dcfg: DictConfig) -> None:
    global _exit_status
    _exit_status = run(to_run_config(dcfg))


def main() -> None:
    # The `deepspeed` launcher appends --local_rank=N unless given --no_local_rank; Hydra would
    # reject it, and LOCAL_RANK in the environment carries the same information.
    for arg in list(sys.argv[1:]):
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            sys.argv.remove(arg)
    if {"--help", "-h"} & set(sys.argv[1:]):  # ours; Hydra's own stays under --hydra-help
        from janus_train.cli_help import render

        print(render([a for a in sys.argv[1:] if not a.startswith("-")]))
        sys.exit(0)
    _hydra_main()
    sys.exit(_exit_status)


if __name__ == "__main__":
    main()
