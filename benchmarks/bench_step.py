"""Trainer overhead: ``janus-train``'s step time vs a bare DeepSpeed loop (issue 4, item 10).

Both run in the same process on the same tiny model (random init, same seed), the same
DeepSpeed config and the same synthetic batches (``SyntheticStepLoader``, called inside both
timed loops so data generation costs the same on each side):

- bare: ``for mb in loader.next_step(): engine.backward(engine(mb)["loss_sum"].sum()/n);
  engine.step()`` and nothing else;
- janus-train: ``janus_train.train.run`` (token-count all-reduce, exact loss weights, LR set,
  non-finite check, CE sums all-reduced at log steps, FLOP accounting, metrics.jsonl every step, loader
  counters gathered every step); its step time is the gap between consecutive log calls.

Step times are means over windows of ``--log-every`` steps (the first window is warm-up);
rounds alternate (bare, janus-train, bare, ...) and the medians of those are compared, in wall time and in this process's CPU time (robust when
other jobs share the cores; meaningful on CPU only). Target: ratio <= 1.05.

    python benchmarks/bench_step.py [--steps 60] [--log-every 10] [--rounds 2] [--global-batch 4]
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
    return [
        f"stage={args.stage}",
        f"deepspeed=zero{args.zero}",
        "train.synthetic_data=true",
        f"train.synthetic_seq_len={args.seq_len}",
        f"experiment.{args.stage}.steps={args.steps}",
        f"experiment.{args.stage}.global_batch_size={args.global_batch}",
        "train.micro_batch_size=1",
        "train.tokens_per_micro=0",  # the bare loop below runs fixed micro-batches
        f"train.log_every={args.log_every}",
        "train.ckpt_every=0",
        "train.export_at_end=false",
        "train.progress_bar=false",
        f"train.run_dir={run_dir}",
    ]


def bare_step_times(run, args) -> list[float]:
    """The same model, DeepSpeed config and batches in the plainest DeepSpeed loop."""
    from janus_train.config import resolve_stage
    from janus_train.data.synthetic_loader import SyntheticStepLoader
    from janus_train.train import build_engine
    from janus_train.trainer.distributed import (
        build_deepspeed_config,
        resolve_precision,
        setup_distributed,
    )

    info = setup_distributed()
    spec = resolve_stage(run, info.world_size)
    plan = spec.plan
    ds = build_deepspeed_config(
        run.deepspeed, plan, resolve_precision(run.deepspeed.precision), spec.weight_decay, spec.lr
    )
    t = build_engine(run, spec, info, ds, run.train.run_dir)  # the trainer's own set-up
    engine, proc = t.engine, t.processor
    loader = SyntheticStepLoader(
        proc, run.model, plan, spec.ratio, rank=info.rank, seq_len=args.seq_len
    )
    stamps = [_now()]
    for _ in range(spec.steps):
        for mb in loader.next_step():
            mb = {k: v.to(engine.device) for k, v in mb.items()}
            out = engine(mb)
            engine.backward(out["loss_sum"].sum() / out["n_tokens"].sum().clamp(min=1))
            engine.step()
        stamps.append(_now())
    # Windows of log_every steps, like the trainer's log calls.
    return _gaps(stamps[:: args.log_every], args.log_every)


def _now() -> tuple[float, float]:
    """(wall, this process's CPU) seconds: CPU time is robust on a shared machine."""
    return time.perf_counter(), time.process_time()


def _gaps(stamps, per: int):
    """Per-step (wall, CPU) means over consecutive stamps ``per`` steps apart."""
    return [((b[0] - a[0]) / per, (b[1] - a[1]) / per) for a, b in zip(stamps, stamps[1:])]


def trainer_step_times(run, args) -> list[tuple[float, float]]:
    """Per-step (wall, CPU) of janus_train.train.run: gaps between its per-step log calls."""
    from janus_train import train
    from janus_train.trainer.metrics import MetricsLogger

    stamps, orig = [], MetricsLogger.log

    def log(self, metrics):
        orig(self, metrics)
        stamps.append(_now())

    MetricsLogger.log = log
    try:
        assert train.run(run) == 0
    finally:
        MetricsLogger.log = orig
    return _gaps(stamps, args.log_every)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument(
        "--log-every",
        type=int,
        default=10,
        help="trainer log interval = timing window (loader counters are gathered "
        "over ranks at every log step)",
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--stage", default="stage2")
    ap.add_argument("--zero", type=int, default=2)
    args = ap.parse_args()
    if args.steps % args.log_every or args.steps < 2 * args.log_every:
        ap.error("--steps must be a multiple of --log-every, at least two windows")
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
        bare += bare_step_times(run, args)[1:]  # window 1 = warm-up
        run = to_run_config(compose(overrides(args, f"{root}/train{r}")))
        framework += trainer_step_times(run, args)  # its first gap starts after window 1
    if info.is_main:
        med = {
            name: [statistics.median(t[i] for t in times) for i in (0, 1)]
            for name, times in (("bare", bare), ("janus_train", framework))
        }
        print(
            json.dumps(
                {
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "world_size": info.world_size,
                    "stage": args.stage,
                    "zero": args.zero,
                    "global_batch": args.global_batch,
                    "seq_len": args.seq_len,
                    "windows_timed": {"bare": len(bare), "janus_train": len(framework)},
                    "median_step_wall_s": {k: round(v[0], 5) for k, v in med.items()},
                    "median_step_cpu_s": {k: round(v[1], 5) for k, v in med.items()},
                    "ratio_wall": round(med["janus_train"][0] / med["bare"][0], 4),
                    "ratio_cpu": round(med["janus_train"][1] / med["bare"][1], 4),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
