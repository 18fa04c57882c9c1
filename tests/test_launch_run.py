"""Real runs of the launch scripts on CPU (gloo, real DeepSpeed, tiny model, synthetic batches):
``launch/pipeline.sh`` through all three stages with ``launch/torchrun.sh`` and 2 processes, each
stage initialised from the previous stage's HF export; ``launch/deepspeed.sh`` through the
DeepSpeed launcher. The preemption path (SIGUSR1 -> checkpoint -> exit 75 -> requeue -> resume)
runs for real through the Slurm job and torchrun.sh in test_launch_slurm.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.dist_utils import run_guarded

REPO = Path(__file__).resolve().parent.parent
SMOKE = [
    "model=tiny",
    "train.synthetic_data=true",
    *(f"experiment.stage{i}.global_batch_size=4" for i in (1, 2, 3)),
    "train.micro_batch_size=1",
    "train.progress_bar=false",
]

STEPS2 = [f"experiment.stage{i}.steps=2" for i in (1, 2, 3)]
pytestmark = [pytest.mark.dist, pytest.mark.slow]


def launch_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "RDZV_", "NNODES", "DRY_RUN", "WANDB_"))
    }
    # PYTHON: the scripts would run `python` from PATH, which need not be this interpreter (CI
    # runs .venv/bin/python -m pytest without activating the venv).
    env.update(WANDB_MODE="disabled", PYTHON=sys.executable, **extra)
    return env


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _group(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in sd.items() if k.startswith(prefix)}
    assert out, prefix
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pipeline_sh_runs_three_tiny_stages_through_exports(tmp_path):
    # Stages 2 and 3 freeze a module the previous stage trained: it must come out of the next
    # stage's export bit-identical to the previous export, which holds only if the stage started
    # from that export (a fresh init would give the untrained values).
    env = launch_env(
        EXPERIMENT="tiny",
        RUN_ROOT=str(tmp_path / "runs"),
        NPROC_PER_NODE="2",
        STAGE2_ARGS="stage.trainable=[llm,gen_head]",
        STAGE3_ARGS="stage.trainable=[und_adaptor]",
    )
    res = run_guarded(
        ["bash", str(REPO / "launch/pipeline.sh"), *SMOKE, *STEPS2],
        silence=300,
        env=env,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout[-4000:]
    root = tmp_path / "runs/tiny"
    sd = {s: load_file(root / s / "hf/model.safetensors") for s in ("stage1", "stage2", "stage3")}
    for stage in ("stage1", "stage2", "stage3"):
        assert [r["step"] for r in read_metrics(root / stage)] == [2]
    cfg2 = (root / "stage2/config.yaml").read_text()
    assert f"init_from: {root / 'stage1/hf'}" in cfg2
    assert f"init_from: {root / 'stage2/hf'}" in (root / "stage3/config.yaml").read_text()

    und1, und2 = (_group(sd[s], "model.aligner.") for s in ("stage1", "stage2"))
    assert _same(und1, und2)  # trained in stage 1, frozen in stage 2
    llm2, llm3 = (_group(sd[s], "model.language_model.") for s in ("stage2", "stage3"))
    assert _same(llm2, llm3)  # trained in stage 2, frozen in stage 3
    # ...and each really was trained in the stage before (so equality is not a coincidence).
    assert not _same(_group(sd["stage1"], "model.language_model."), llm2)
    assert not _same(und2, _group(sd["stage3"], "model.aligner."))

    # Re-running the finished pipeline skips every stage.
    res = subprocess.run(
        ["bash", str(REPO / "launch/pipeline.sh"), *SMOKE, *STEPS2],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0 and res.stdout.count("skipping") == 3, res.stdout + res.stderr


def test_deepspeed_sh_trains_tiny_through_the_deepspeed_launcher(tmp_path):
    # The CPU accelerator exposes one device, so one rank; what is checked is that the launcher's
    # `--no_local_rank --module janus_train.train <overrides>` starts the Hydra app correctly.
    # MASTER_PORT=0: a single rank's store may take any free port (tests run in parallel).
    run_dir = tmp_path / "run"
    res = run_guarded(
        [
            "bash",
            str(REPO / "launch/deepspeed.sh"),
            "experiment=tiny",
            *SMOKE,
            "experiment.stage1.steps=2",
            f"train.run_dir={run_dir}",
        ],
        silence=180,
        env=launch_env(NUM_GPUS="1", MASTER_PORT="0"),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout[-3000:]
    assert [r["step"] for r in read_metrics(run_dir)] == [2]
    assert (run_dir / "hf/config.json").is_file()
