"""The trainer's parts, each one concern; ``janus_train/train.py`` wires them together.

config.py       TrainConfig, DeepSpeedConfig (typed, in the Hydra tree)
distributed.py  process group, batch arithmetic, DeepSpeed JSON + engine
optim.py        AdamW parameter groups, warmup + constant/cosine schedule
checkpoint.py   atomic checkpoints, auto-resume, SIGTERM/SIGUSR1 -> requeue (exit 75)
state.py        TrainState: step, skip counters, wandb id, loader + RNG, saved as one
guard.py        RunGuard: clean-up on every exit path, stuck-after-stop watchdog (exit 70)
metrics.py      metrics.jsonl (+ wandb) on rank 0, PaLM FLOPs and MFU
export.py       HF-format export (ZeRO-3 consolidated) for the next stage
"""
