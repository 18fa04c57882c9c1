"""A shortened demo end to end: generated world -> tiny init dir -> one stage of `janus-train`
(a real DeepSpeed run in a subprocess, the real loader) with in-training evaluation on the
held-out split -> the model is clearly better than chance on unseen combinations."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from janus_train.demo import synth
from janus_train.demo import vq as V
from janus_train.demo.report import majority_baseline

pytestmark = pytest.mark.slow
STEPS = 300


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    data = root / "data"
    synth.synthesize(
        synth.SynthConfig(
            out=str(data),
            n_caption=400,
            n_conversation=1200,
            n_chat=100,
            n_text=200,
            n_imagenet=200,
            n_heldout=48,
        )
    )
    # VQ codebook initialised on encoder latents only (no fit): the test is about the LLM
    V.prepare_init(data, root / "init", V.VQFitConfig(steps=0))
    run_dir = root / "run"
    env = {
        **os.environ,
        "JANUS_DATA_ROOT": str(data / "train"),
        "JANUS_EVAL_DATA_ROOT": str(data / "heldout"),
        "OMP_NUM_THREADS": "2",
    }
    cmd = [
        sys.executable,
        "-m",
        "janus_train.train",
        "experiment=tiny",
        "stage=stage3",
        f"model.init_from={root / 'init'}",
        "model.tokenizer=null",
        f"train.run_dir={run_dir}",
        f"train.steps={STEPS}",
        f"train.eval_every={STEPS}",
        "train.global_batch_size=16",
        "train.micro_batch_size=16",
        "train.log_every=50",
        "train.ckpt_every=0",
        "data.num_workers=1",
        "deepspeed.precision=fp32",
        "experiment.stage3.lr=2e-3",
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, recs


def test_short_demo_learns_beyond_chance(demo_run):
    run_dir, recs = demo_run
    ev = [r for r in recs if "eval/loss/und" in r][-1]
    assert ev["step"] == STEPS
    vocab = json.loads((run_dir / "hf" / "config.json").read_text())["text_config"]["vocab_size"]
    # held-out understanding loss far below a uniform guess over the vocabulary
    assert ev["eval/loss/und"] < 0.4 * math.log(vocab), ev
    # generated codes match the reference scene's codes far above chance and above the
    # "draw a blank image" baseline
    chance = max(ev["eval/gen/token_accuracy_blank_baseline"], 1 / 64)
    assert ev["eval/gen/token_accuracy"] > 2 * chance, ev
    # answers to held-out questions: above the best single answer for every question
    answers = [
        json.loads(x)
        for x in (run_dir / "eval" / f"step_{STEPS:08d}" / "answers.jsonl").read_text().splitlines()
    ]
    assert len(answers) >= 32
    majority = majority_baseline(run_dir / "eval" / f"step_{STEPS:08d}" / "answers.jsonl")
    assert ev["eval/und/accuracy"] > majority + 0.1, (ev, majority)
    assert Path(run_dir / "eval" / f"step_{STEPS:08d}" / "generated.png").exists()
