"""Checkpoint stall: how long a save stops the step loop, synchronous against asynchronous
(issue 12 item 6, issue 23 item 4).

The trainer's own set-up (``janus_train.train.build_engine``) and saves
(``janus_train.trainer.state.Checkpointer``: DeepSpeed files + per-rank loader/RNG state,
written under ``.tmp-``, fsynced, summed into the manifest and committed by rename) on
synthetic batches, in the loop's order: a save every ``--every`` steps, and with
``train.ckpt_async`` its two phases advanced at step boundaries where every rank's thread is done
(the flag rides in the step's all-reduce, as in ``train_step``). The stall of a save is the
time the loop's thread spends in ``save`` and ``advance`` for it (the wait for the last
save's commit when the run ends is reported apart); the median over ``--saves`` saves is
reported per mode with the median step time with and without a write in flight, the
checkpoint's bytes and the synchronous write rate (a 7B estimate follows from it).

    python benchmarks/bench_ckpt.py [--zero 2] [--steps 6] [--saves 3] [--every 3]
    torchrun --nproc_per_node 2 benchmarks/bench_ckpt.py ...
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
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
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--every", type=int, default=3, help="steps between saves")
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        help="print rank 0's cProfile of the asynchronous saves' stall (the top N by cumtime)",
    )
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch.distributed as dist

    from janus_train.batch import count_supervised
    from janus_train.config import compose, resolve_stage, to_run_config
    from janus_train.data.synthetic_loader import SyntheticStepLoader
    from janus_train.train import build_engine, forward_backward, step_weights
    from janus_train.trainer.distributed import (
        all_reduce_sum,
        build_deepspeed_config,
        resolve_precision,
        setup_distributed,
    )
    from janus_train.trainer.state import Checkpointer, TrainState

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
    spec = resolve_stage(run, info.world_size)
    plan = spec.plan
    ds = build_deepspeed_config(
        run.deepspeed, plan, resolve_precision(run.deepspeed.precision), spec.weight_decay, spec.lr
    )
    t = build_engine(run, spec, info, ds, root)
    n_params = sum(
        p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in t.janus.parameters()
    )
    loader = SyntheticStepLoader(
        t.processor, run.model, plan, spec.ratio, rank=info.rank, seq_len=args.seq_len
    )

    def step(saver=None) -> tuple[bool, bool]:
        """One optimizer step; returns whether every rank's checkpoint thread was done, and
        whether some rank's failed (``train_step``'s flags; its release of the writes)."""
        micro = [{k: v.to(t.engine.device) for k, v in b.items()} for b in loader.next_step()]
        counts = torch.stack([count_supervised(b) for b in micro]).sum(0).to(torch.float64)
        save_flags = (1.0, 0.0) if saver is None else saver.flags()
        red = all_reduce_sum(torch.cat([counts, torch.tensor(save_flags, dtype=torch.float64)]))
        if saver is not None:
            saver.release()
        forward_backward(t.engine, micro, step_weights(red[:3], "token_mean"), plan.loss_scale)
        t.engine.step()
        return int(red[3]) == info.world_size, bool(red[4] > 0)

    for _ in range(args.steps):  # warm-up
        step()
    n_step = args.steps
    res = {}
    profiler = cProfile.Profile() if args.profile and info.is_main else None
    for mode in ("sync", "async"):
        saver = Checkpointer(t.engine, root / f"ckpt_{mode}", info, 2, mode == "async")
        stalls, busy, idle = [], [], []  # stalls[i]: save i's time in save() and commit()
        for _ in range(args.saves):
            for _ in range(args.every):
                writing = not saver.flags()[0]
                t0 = time.perf_counter()
                ready, failed = step(saver)
                (busy if writing else idle).append(time.perf_counter() - t0)
                n_step += 1
                if saver.pending is not None and ready:
                    t0 = time.perf_counter()
                    saver.advance(not failed)  # the previous save's next phase
                    stalls[-1] += time.perf_counter() - t0
            dist.barrier()
            prof = profiler if mode == "async" else None
            t0 = time.perf_counter()
            if prof is not None:
                prof.enable()
            saver.save(TrainState(step=n_step), loader)
            if prof is not None:
                prof.disable()
            stalls.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        saver.commit()  # the end of the run: the last save's remaining phases, waited for
        final = time.perf_counter() - t0
        res[mode] = {
            "median_stall_s": round(statistics.median(stalls), 4),
            "stalls_s": [round(x, 4) for x in stalls],
            "final_commit_wait_s": round(final, 4),
            "median_step_s": round(statistics.median(idle), 4),
            "median_step_writing_s": round(statistics.median(busy), 4) if busy else None,
        }
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile)
    ck = sorted((root / "ckpt_sync").glob("step_*"))[-1]
    nbytes = sum(f.stat().st_size for f in ck.rglob("*") if f.is_file())
    if info.is_main:
        sync = res["sync"]["median_stall_s"]
        per_param = nbytes / n_params
        rate = nbytes / sync
        print(
            json.dumps(
                {
                    "world_size": info.world_size,
                    "zero": args.zero,
                    "stage": args.stage,
                    "params": n_params,
                    **res,
                    "async_stall_over_sync": round(res["async"]["median_stall_s"] / sync, 3),
                    "checkpoint_bytes": nbytes,
                    "bytes_per_param": round(per_param, 2),
                    "sync_write_rate_MB_s": round(rate / 1e6, 1),
                    "est_7b_sync_save_s_at_this_rate": round(per_param * 7e9 / rate, 1),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
