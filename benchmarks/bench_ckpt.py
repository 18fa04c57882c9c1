"""Checkpoint stall: how long a save stops the step loop, against the step time (issue 12, 6).

The trainer's own set-up (``janus_train.train.build_engine``) and save
(``janus_train.trainer.state.save_train_state``: DeepSpeed files + per-rank loader/RNG state,
written under ``.tmp-`` and committed by rename) on synthetic batches. Reports the median step
time, the median save time (the stall: saving is synchronous, every rank waits for the commit),
the checkpoint's bytes, bytes per model parameter, and the write rate this machine reached, from
which a 7B estimate follows (bytes per parameter x 7e9 / write rate, per rank sharing the writes).

    python benchmarks/bench_ckpt.py [--zero 2] [--steps 6] [--saves 3] [--stage stage2]
    torchrun --nproc_per_node 2 benchmarks/bench_ckpt.py ...
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--stage", default="stage2")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch.distributed as dist

    from janus_train.batch import count_supervised
    from janus_train.config import compose, to_run_config
    from janus_train.data.synthetic_loader import SyntheticStepLoader
    from janus_train.train import build_engine, forward_backward, step_weights
    from janus_train.trainer.distributed import (
        all_reduce_sum,
        build_deepspeed_config,
        plan_batch,
        resolve_precision,
        setup_distributed,
    )
    from janus_train.trainer.state import TrainState, save_train_state

    info = setup_distributed()
    holder = [tempfile.mkdtemp(prefix="bench_ckpt_") if info.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    root = Path(holder[0])
    run = to_run_config(
        compose(
            [
                f"stage={args.stage}",
                f"deepspeed=zero{args.zero}",
                "train.synthetic_data=true",
                f"train.synthetic_seq_len={args.seq_len}",
                f"experiment.{args.stage}.global_batch_size={args.global_batch}",
                "train.tokens_per_micro=0",
                f"train.run_dir={root}",
            ]
        )
    )
    hp = run.hparams
    plan = plan_batch(hp.global_batch_size, 1, info.world_size)
    ds = build_deepspeed_config(
        run.deepspeed, plan, resolve_precision(run.deepspeed.precision), hp.weight_decay, hp.lr
    )
    t = build_engine(run, info, ds, root)
    n_params = sum(
        p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in t.janus.parameters()
    )
    loader = SyntheticStepLoader(
        run,
        t.processor,
        rank=info.rank,
        world_size=info.world_size,
        micro_batch_size=1,
        grad_accum=plan.grad_accum,
    )
    step_times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        micro = [{k: v.to(t.engine.device) for k, v in b.items()} for b in loader.next_step()]
        n = all_reduce_sum(torch.stack([count_supervised(b) for b in micro]).sum(0))
        forward_backward(t.engine, micro, step_weights(n, "token_mean"), plan.loss_scale)
        t.engine.step()
        step_times.append(time.perf_counter() - t0)
    save_times = []
    for i in range(args.saves):
        dist.barrier()
        t0 = time.perf_counter()
        save_train_state(
            t.engine,
            root / "checkpoints",
            TrainState(step=args.steps + i),
            loader,
            info,
            keep_last=2,
        )
        save_times.append(time.perf_counter() - t0)
    ck = root / "checkpoints" / f"step_{args.steps + args.saves - 1:08d}"
    nbytes = sum(f.stat().st_size for f in ck.rglob("*") if f.is_file())
    if info.is_main:
        step, save = statistics.median(step_times[1:]), statistics.median(save_times)
        per_param = nbytes / n_params
        rate = nbytes / save
        print(
            json.dumps(
                {
                    "world_size": info.world_size,
                    "zero": args.zero,
                    "stage": args.stage,
                    "params": n_params,
                    "median_step_s": round(step, 4),
                    "median_save_s": round(save, 4),
                    "stall_in_steps": round(save / step, 2),
                    "checkpoint_bytes": nbytes,
                    "bytes_per_param": round(per_param, 2),
                    "write_rate_MB_s": round(rate / 1e6, 1),
                    "est_7b_save_s_at_this_rate": round(per_param * 7e9 / rate, 1),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
