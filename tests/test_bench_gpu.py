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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_step_probe_counts_host_syncs_per_step_and_inside_micro_steps(monkeypatch):
    """The sync counter's plumbing with torch's sync-debug mode stood in for (CPU): a
    synchronizing call warns; syncs inside ``forward_backward`` are counted there and in the
    step's total; the first step (warm-up) is left out of the means; the mode is restored."""
    import importlib.util
    import types
    import warnings

    import torch

    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "benchmarks/bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    mode = {"now": 0, "set": []}
    monkeypatch.setattr(bench, "_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: mode["now"])

    def set_mode(m):
        mode["set"].append(m)
        mode["now"] = m

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", set_mode)

    def sync(n):
        if mode["now"] == "warn":
            for _ in range(n):
                warnings.warn(bench.StepProbe.SYNC_MSG, stacklevel=2)

    fake = types.SimpleNamespace()
    fake.forward_backward = lambda k: sync(k)
    fake.train_step = lambda k, outside: (fake.forward_backward(k), sync(outside))
    probe = bench.StepProbe()
    probe.install(fake)
    for k, outside in ((9, 9), (0, 1), (2, 1)):
        fake.train_step(k, outside)
    assert [s["syncs_in_micro_steps"] for s in probe.steps] == [9, 0, 2]
    assert [s["syncs_per_step"] for s in probe.steps] == [18, 1, 3]
    assert probe.record() == {"host_syncs_per_step": 2.0, "host_syncs_in_micro_steps": 1.0}
    assert mode["now"] == 0 and mode["set"][:2] == ["warn", "warn"]  # restored after each
