"""Trainer overhead: ``janus-train``'s step time vs a bare DeepSpeed loop (issue 4, item 10).

Both run in the same process on the same tiny model (random init, same seed), the same
DeepSpeed config and the same synthetic batches (``SyntheticStepLoader``, called inside both
timed loops so data generation costs the same on each side):

- bare: ``for mb in loader.next_step(): engine.backward(engine(mb)["loss_sum"].sum()/n);
  engine.step()`` and nothing else;
- janus-train: ``janus_train.train.run`` (token-count all-reduce, exact loss weights, LR set,
  non-finite check, end-of-step all-reduce, FLOP accounting, metrics.jsonl every step, loader
  counters gathered every step); its step time is the gap between consecutive metrics records.

Rounds alternate (bare, janus-train, bare, ...) and the medians of the per-step times after
``--warmup`` steps are compared. Target: ratio <= 1.05.

    python benchmarks/bench_step.py [--steps 30] [--rounds 2] [--global-batch 4] [--seq-len 64]
    torchrun --nproc_per_node 2 benchmarks/bench_step.py ...     # 2 ranks (gloo on CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def overrides(args, run_dir: str) -> list[str]:
    return [f"stage={args.stage}", f"deepspeed=zero{args.zero}", "train.synthetic_data=true",
            f"train.synthetic_seq_len={args.seq_len}", f"train.steps={args.steps}",
            f"train.global_batch_size={args.global_batch}", "train.micro_batch_size=1",
            "train.log_every=1", "train.ckpt_every=0", "train.export_at_end=false",
            "train.progress_bar=false", f"train.run_dir={run_dir}"]


def bare_step_times(run, args) -> list[float]:
    """The same model, DeepSpeed config and batches in the plainest DeepSpeed loop."""
    import torch.distributed as dist

    from janus_train.model import JanusTrainModel, apply_freeze, build_model, get_processor
    from janus_train.trainer.distributed import (
        build_deepspeed_config,
        init_engine,
        plan_batch,
        resolve_precision,
        setup_distributed,
    )
    from janus_train.trainer.optim import build_param_groups
    from janus_train.trainer.synthetic import SyntheticStepLoader

    info = setup_distributed()
    hp = run.hparams
    if info.is_main:
        get_processor(run.model, run.train.run_dir)
    dist.barrier()
    janus, proc = build_model(run.model, workdir=run.train.run_dir)
    apply_freeze(janus, run.trainable_groups)
    plan = plan_batch(hp.global_batch_size, 1, info.world_size)
    ds = build_deepspeed_config(run.deepspeed, plan, resolve_precision(run.deepspeed.precision),
                                hp.weight_decay, hp.lr)
    model = JanusTrainModel(janus)
    engine = init_engine(model, ds, build_param_groups(model, hp.weight_decay))
    loader = SyntheticStepLoader(run, proc, rank=info.rank, world_size=info.world_size,
                                 micro_batch_size=1, grad_accum=plan.grad_accum)
    times, last = [], time.perf_counter()
    for _ in range(hp.steps):
        for mb in loader.next_step():
            mb = {k: v.to(engine.device) for k, v in mb.items()}
            out = engine(mb)
            engine.backward(out["loss_sum"].sum() / out["n_tokens"].sum().clamp(min=1))
            engine.step()
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times


def trainer_step_times(run) -> list[float]:
    from janus_train import train

    assert train.run(run) == 0
    recs = [json.loads(x) for x in (Path(run.train.run_dir) / "metrics.jsonl").read_text()
            .splitlines()]
    stamps = [r["time"] for r in recs]
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--stage", default="stage2")
    ap.add_argument("--zero", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch.distributed as dist

    from janus_train.config import compose, to_run_config
    from janus_train.trainer.distributed import setup_distributed

    info = setup_distributed()
    root = Path(tempfile.mkdtemp(prefix="bench_step_")) if info.is_main else None
    holder = [str(root)]
    dist.broadcast_object_list(holder, src=0)
    root = Path(holder[0])
    bare, framework = [], []
    for r in range(args.rounds):
        run = to_run_config(compose(overrides(args, f"{root}/bare{r}")))
        bare += bare_step_times(run, args)[args.warmup:]
        run = to_run_config(compose(overrides(args, f"{root}/train{r}")))
        framework += trainer_step_times(run)[args.warmup - 1:]
    if info.is_main:
        mb, mf = statistics.median(bare), statistics.median(framework)
        print(json.dumps({
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "world_size": info.world_size, "stage": args.stage, "zero": args.zero,
            "global_batch": args.global_batch, "seq_len": args.seq_len,
            "steps_timed": {"bare": len(bare), "janus_train": len(framework)},
            "median_step_s": {"bare": round(mb, 5), "janus_train": round(mf, 5)},
            "ratio": round(mf / mb, 4),
        }, indent=2))


if __name__ == "__main__":
    main()
