"""benchmarks/gpu_session.sh, the prepared GPU run, in its CPU dry mode (GPU_SESSION_DRY=1):
the reference and every variant run bench_gpu.py on the tiny model for 2 steps, or are skipped
with a reason; the summary is one JSON line per part and variant, then the ratios."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.dist_utils import run_guarded

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_gpu_session_dry_run_on_cpu(tmp_path):
    env = dict(os.environ, GPU_SESSION_DRY="1", PYTHON=sys.executable, OUT=str(tmp_path))
    res = run_guarded(["bash", "benchmarks/gpu_session.sh"], silence=300, env=env, cwd=REPO)
    log = (tmp_path / "session.log").read_text() if (tmp_path / "session.log").exists() else ""
    assert res.returncode == 0, res.stdout[-2000:] + log[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "summary.jsonl").read_text().splitlines()]
    by = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    assert list(by) == ["reference", "default", "compile", "liger"]  # the session's order
    assert not [r for r in rows if "failed" in r], log[-3000:]
    parts = {v: [r.get("part") for r in rs] for v, rs in by.items()}
    # the reference alone in its own process, first; None: the ratio rows written at the end
    assert parts["reference"] == ["reference_llm_alone"]
    for v in ("default", "compile"):
        assert parts[v] == ["trainer", None]
        t, ratio = by[v]
        assert t["tokens_per_s"] > 0 and t["mfu"] is None  # CPU: no MFU
        assert "peak_mem_gib" in t and "host_syncs_per_step" in t  # (None on CPU)
        ref = by["reference"][0]["tokens_per_s"]
        assert ratio["tokens_per_s_ratio"] == pytest.approx(t["tokens_per_s"] / ref)
    assert by["default"][0]["attn"] == "sdpa"  # auto on CPU; torch_varlen on CUDA
    assert by["default"][0]["graph_breaks"] == 0 and by["default"][0]["dynamo_frames"] == 0
    assert by["compile"][0]["compile"] == "aot_eager"
    assert "model.compile=true" in by["compile"][0]["overrides"]
    assert by["compile"][0]["dynamo_frames"] >= 1 and by["compile"][0]["graph_breaks"] == 0
    # the default variant's profiler table (top ops by time)
    table = (tmp_path / "profile_default.txt").read_text()
    assert "Self CPU" in table and "aten::" in table
    assert not (tmp_path / "profile_compile.txt").exists()
    # without CUDA / liger-kernel: skipped, not failed
    assert by["liger"] == [{"variant": "liger", "skipped": by["liger"][0]["skipped"]}]
    assert "torch" in (tmp_path / "env.txt").read_text()
    assert "expandable_segments" in (REPO / "benchmarks/gpu_session.sh").read_text()
