"""benchmarks/gpu_session.sh, the prepared GPU run, in its CPU dry mode (GPU_SESSION_DRY=1):
every variant runs bench_gpu.py on the tiny model for 2 steps, or is skipped with a reason;
the summary is one JSON line per part and variant."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_gpu_session_dry_run_on_cpu(tmp_path):
    env = dict(os.environ, GPU_SESSION_DRY="1", PYTHON=sys.executable, OUT=str(tmp_path))
    res = subprocess.run(
        ["bash", "benchmarks/gpu_session.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = (tmp_path / "session.log").read_text() if (tmp_path / "session.log").exists() else ""
    assert res.returncode == 0, res.stderr[-2000:] + log[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "summary.jsonl").read_text().splitlines()]
    by = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    assert list(by) == ["default", "compile", "liger", "full_ckpt", "flex", "compile_liger"]
    assert not [r for r in rows if "failed" in r], log[-3000:]
    parts = {v: [r.get("part") for r in rs] for v, rs in by.items()}
    assert parts["default"] == ["trainer", "reference_llm_alone", None]  # None: the ratio row
    for v in ("compile", "full_ckpt"):
        assert parts[v] == ["trainer"]  # --no-reference
        assert by[v][0]["tokens_per_s"] > 0 and by[v][0]["mfu"] is None  # CPU: no MFU
    assert by["compile"][0]["compile"] == "aot_eager"
    assert "model.compile=true" in by["compile"][0]["overrides"]
    assert by["full_ckpt"][0]["checkpointing"] == "full"
    # without CUDA / liger-kernel these are skipped, not failed
    for v in ("liger", "flex", "compile_liger"):
        assert by[v] == [{"variant": v, "skipped": by[v][0]["skipped"]}]
    assert "torch" in (tmp_path / "env.txt").read_text()
