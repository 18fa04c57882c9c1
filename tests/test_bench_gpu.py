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
            "--mfu-file",
            str(tmp_path / "mfu.json"),
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
    assert not (tmp_path / "mfu.json").exists()  # nothing measured, nothing recorded
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


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "benchmarks/bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_measured_mfu_is_appended_where_janus_plan_reads_it(tmp_path, monkeypatch, capsys):
    """bench_gpu.py appends the trainer part's MFU to --mfu-file as a record of the planner's
    format (the trainer part stood in for: CPU has no MFU); what was there stays, the newest
    record of the GPU family is the one ``janus-plan`` uses, with the recomputation of its
    checkpointing added by hand (every 2nd of 24 layers: 12 of 72 layer-passes more), and a
    file that is not the format is refused and left as it is."""
    from janus_train.plan.config import ClusterConfig, append_mfu_record, measured_mfu

    bench = _bench()
    f = tmp_path / "results" / "mfu.json"
    old = {"date": "2026-12-01T00:00:00Z", "gpu": "NVIDIA H200", "mfu": 0.2, "layers": 24,
           "checkpointing": "none", "model": "janus_pro_1b"}  # fmt: skip
    f.parent.mkdir()
    f.write_text(json.dumps({"records": [old]}))
    row = {"part": "trainer", "model": "janus_pro_1b", "layers": 24, "hidden": 2048,
           "checkpointing": "2",
           "attn": "torch_varlen", "kernels": "none", "compile": None, "tokens_per_micro": 8192,
           "mfu": 0.23, "tokens_per_s": 1e4}  # fmt: skip
    monkeypatch.setattr(bench, "trainer_part", lambda args, run_dir: dict(row))
    argv = ["bench_gpu.py", "--no-reference", "--out", str(tmp_path / "o"), "--mfu-file", str(f)]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    assert "MFU 0.230 recorded in" in capsys.readouterr().err
    recs = json.loads(f.read_text())["records"]
    assert recs[0] == old and len(recs) == 2 and recs[1]["mfu"] == 0.23
    assert recs[1]["checkpointing"] == "every 2" and recs[1]["layers"] == 24
    assert set(recs[1]) >= {"date", "gpu", "mfu", "model", "layers", "checkpointing", "commit"}
    assert recs[1]["hidden"] == 2048  # the planner's match by dimensions
    a100 = bench.mfu_record(row, "NVIDIA A100-SXM4-40GB")
    assert append_mfu_record(f, a100) == 3
    util, source = ClusterConfig(gpu="a100-40gb", mfu_file=str(f)).mfu_source
    assert util == pytest.approx(0.23 * (1 + 12 / 72)) and "measured 0.230" in source
    newer = dict(a100, date="2999-01-01T00:00:00Z", mfu=0.3, checkpointing="none")
    append_mfu_record(f, newer)
    assert measured_mfu(f, "a100-80gb")[0] == pytest.approx(0.3)  # the newest A100 record
    assert measured_mfu(f, "h200")[0] == pytest.approx(0.2)
    f.write_text("{not json")
    with pytest.raises(ValueError, match="mfu.json: not JSON"):
        append_mfu_record(f, a100)
    assert f.read_text() == "{not json"
    with pytest.raises(ValueError, match="mfu in"):
        append_mfu_record(tmp_path / "x.json", dict(a100, mfu=None))


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
