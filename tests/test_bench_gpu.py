"""benchmarks/bench_gpu.py runs on CPU (tiny model through janus_train.train.run and the
LLM-alone reference) and reports no MFU there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_bench_gpu_runs_on_cpu_without_mfu(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    res = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_gpu.py",
            "--steps",
            "2",
            "--log-every",
            "1",
            "--ref-steps",
            "2",
            "--ref-accum",
            "1",
            "--checkpointing",
            "2",
            "--loss-chunk-tokens",
            "64",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    trainer, ref, ratio = rows
    assert trainer["part"] == "trainer" and ref["part"] == "reference_llm_alone"
    assert trainer["mfu"] is None and ref["mfu"] is None  # CPU: no peak FLOP/s
    assert trainer["tokens_per_s"] > 0 and ref["tokens_per_s"] > 0
    assert trainer["token_fill"] == 1.0  # packed rows, no padding
    assert "model.checkpoint_every=2" in trainer["overrides"]
    assert "model.loss_chunk_tokens=64" in trainer["overrides"]
    cfg = (tmp_path / "trainer" / "config.yaml").read_text()
    assert "loss_chunk_tokens: 64" in cfg and "kernels: none" in cfg
    assert ratio["mfu_ratio_trainer_over_reference"] is None
    metrics = (tmp_path / "trainer" / "metrics.jsonl").read_text()
    assert "data/rank_imbalance" in metrics


def test_bench_gpu_refuses_liger_without_cuda(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    res = subprocess.run(
        [sys.executable, "benchmarks/bench_gpu.py", "--kernels", "liger", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert (
        res.stderr.strip()
        .splitlines()[-1]
        .startswith("bench_gpu.py: model.kernels=liger needs CUDA")
    )
    assert not (tmp_path / "trainer").exists()
