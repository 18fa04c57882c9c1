"""Token fill and rank imbalance of real 2-process training on the demo's data with the demo's
stage-2 settings (global batch 16, und:text:gen 5:1:4, ZeRO-2, fp32, 1 loader worker per rank):
token-budget micro-batches (``train.tokens_per_micro``, the default) against the fixed
micro-batches they replace (``tokens_per_micro=0``, 8 padded rows per micro-batch), same run.

    python benchmarks/bench_fill.py --steps 40 [--out /tmp/bench_fill] [--tokens-per-micro 4096]

Writes the demo world (``janus_demo.synth``) and a tokenizer trained on its corpus
(as ``launch/demo.sh`` does; the model is random: fill and balance depend only on the data),
runs ``janus_train.train`` under ``torchrun --nproc_per_node 2`` for each mode with
``train.log_every=1``, and prints, per mode, the minimum ``data/token_fill`` and maximum
``data/rank_imbalance`` over all logged steps, with the step time. Targets (issue 10):
fill >= 0.95 and imbalance <= 0.05 at every logged step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def prepare(out: Path) -> Path:
    """Demo world + tokenizer (cached in ``out``); returns the tokenizer directory."""
    data, tok = out / "data", out / "tokenizer"
    if not (data / "world.json").exists():
        subprocess.run(
            [sys.executable, "-m", "janus_demo.synth", "--out", str(data)],
            check=True,
            cwd=REPO,
        )
    if not (tok / "tokenizer.json").exists():
        from janus_train.model import train_tiny_tokenizer

        corpus = (data / "corpus.txt").read_text().splitlines()
        size = json.loads((data / "world.json").read_text())["config"]["image_size"]
        train_tiny_tokenizer(tok, corpus=corpus, image_size=size, num_image_tokens=(size // 8) ** 2)
    return tok


def run_mode(out: Path, tok: Path, name: str, steps: int, extra: list[str]) -> dict:
    run_dir = out / "runs" / name
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    env = dict(
        os.environ,
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        JANUS_DATA_ROOT=str(out / "data" / "train"),
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "janus_train.train",
        "experiment=tiny",
        "stage=stage2",
        "deepspeed=zero2",
        "deepspeed.precision=fp32",
        f"model.tokenizer={tok}",
        "experiment.stage2.global_batch_size=16",
        "experiment.stage2.ratio.und=5",
        "experiment.stage2.ratio.text=1",
        "experiment.stage2.ratio.gen=4",
        f"experiment.stage2.steps={steps}",
        "train.log_every=1",
        "train.ckpt_every=0",
        "train.export_at_end=false",
        "train.progress_bar=false",
        "data.num_workers=1",
        f"train.run_dir={run_dir}",
        *extra,
    ]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"{name} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "data/token_fill" in r]
    tail = recs[len(recs) // 4 :]  # step time without the first quarter (start-up)
    return {
        "mode": name,
        "steps_logged": len(recs),
        "token_fill_min": min(r["data/token_fill"] for r in recs),
        "token_fill_mean": sum(r["data/token_fill"] for r in recs) / len(recs),
        "rank_imbalance_max": max(r["data/rank_imbalance"] for r in recs),
        "rank_imbalance_mean": sum(r["data/rank_imbalance"] for r in recs) / len(recs),
        "step_time_s": sum(r["speed/step_time_s"] for r in tail) / len(tail),
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default="/tmp/bench_fill")
    ap.add_argument("--tokens-per-micro", type=int, default=4096)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = prepare(out)
    rows = [
        run_mode(
            out,
            tok,
            "token_budget",
            args.steps,
            [f"train.tokens_per_micro={args.tokens_per_micro}"],
        ),
        run_mode(
            out,
            tok,
            "fixed_micro_8",
            args.steps,
            ["train.tokens_per_micro=0", "train.micro_batch_size=8"],
        ),
    ]
    for r in rows:
        print(json.dumps(r))
    ok = rows[0]["token_fill_min"] >= 0.95 and rows[0]["rank_imbalance_max"] <= 0.05
    print(
        f"token-budget targets (fill >= 0.95, imbalance <= 0.05 every step): "
        f"{'met' if ok else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
