"""Loader throughput vs a bare decode loop (issue 3, item 10).

Writes JPEG caption shards (photo-like 640x480 images by default), then measures in the same run:

- bare: one process reading the same tar members, doing only PIL decode + RGB conversion + the
  same resize/pad (understanding) or resize/crop (generation) at the model's image size;
- loader: ``build_train_loader`` with ``--workers`` dataloader workers on a recipe with only
  understanding (or only generation) samples: decode, preprocess, normalise, tokenise, build
  masks, collate, ship to the main process.

Reports samples/s per worker for each and their ratio (target >= 0.8), by wall clock and by CPU
time (worker processes' user+sys from /proc, plus the main process), which stays meaningful on a
machine shared with other jobs or with fewer cores than workers + 1.

    python benchmarks/bench_loader.py [--records 512] [--workers 2] [--image-size 384]
                                      [--pixels-uint8]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def photo_like(i: int, w: int, h: int) -> bytes:
    """A smooth-gradient image with shapes and mild noise: JPEG size/decode cost like photos."""
    import io

    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([(x / w) * 255, (y / h) * 255, ((x + y) / (w + h)) * 255], -1)
    base = base * rng.uniform(0.5, 1.0, 3) + rng.normal(0, 12, (h, w, 3))
    for _ in range(6):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(10, h // 3)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        base[mask] = rng.uniform(0, 255, 3)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(root: Path, records: int, shards: int, w: int, h: int) -> list[str]:
    from janus_train.data.tario import write_tar

    per = records // shards
    paths = []
    for s in range(shards):
        recs = [
            (
                f"{s * per + i:06d}",
                {
                    "jpg": photo_like(s * per + i, w, h),
                    "txt": b"a photo of red circles on a gradient.",
                },
            )
            for i in range(per)
        ]
        paths.append(write_tar(root / f"img-{s:06d}.tar", recs))
    return paths


def bare_loop(paths: list[str], task: str, size: int, repeats: int) -> float:
    from janus_train.data.preprocess import decode_image, resize_long_pad, resize_short_crop
    from janus_train.data.shards import ShardCursor

    fn = resize_long_pad if task == "und" else resize_short_crop
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    for _ in range(repeats):
        for p in paths:
            for _, rec in ShardCursor(p, None).iterate(0, lambda q: True):
                fn(decode_image(rec.members["jpg"]), size)
                n += 1
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def _cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def loader_rate(
    root: Path,
    n_shards: int,
    task: str,
    size: int,
    workers: int,
    steps: int,
    batch: int,
    pixels_uint8: bool = False,
) -> dict:
    import yaml

    from janus_train.config import compose, resolve_stage, to_run_config
    from janus_train.data.loader import build_train_loader
    from janus_train.model.tokenizer import train_tiny_tokenizer

    recipe = root / f"{task}.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": f"bench_{task}",
                "sources": [
                    {
                        "name": task,
                        "task": "understanding" if task == "und" else "generation",
                        "format": "caption",
                        "shards": str(root / f"img-{{000000..{n_shards - 1:06d}}}.tar"),
                    }
                ],
            }
        )
    )
    ratio = "{und:1,text:0,gen:0}" if task == "und" else "{und:0,text:0,gen:1}"
    run = to_run_config(
        compose(
            [
                "experiment=tiny",
                "stage=stage2",
                f"model.image_size={size}",
                "model.vision.patch_size=16",
                f"experiment.stage2.ratio={ratio}",
                f"experiment.stage2.global_batch_size={batch}",
            ]
        )
    )
    run.hparams.data_recipe = str(recipe)
    run.data.num_workers = workers
    run.data.pixels_uint8 = pixels_uint8
    n_tok = (size // 16) ** 2
    tok_dir = root / f"tok{n_tok}"
    proc = train_tiny_tokenizer(tok_dir, image_size=size, num_image_tokens=n_tok)
    run.train.tokens_per_micro, run.train.micro_batch_size = 0, batch // 4  # 4 micro-steps
    spec = resolve_stage(run, with_recipe=True)
    ctx = spec.context(proc, run.model, run.data)
    L = build_train_loader(spec.recipe, ctx, run.data, spec.ratio, spec.plan, rank=0)
    for _ in range(max(2, workers)):  # warm-up: worker start, shard indexing
        L.next_step()
    pids = L.worker_steps.worker_pids()
    t0, c0, w0 = time.perf_counter(), time.process_time(), _cpu_seconds(pids)
    for _ in range(steps):
        L.next_step()
    wall = time.perf_counter() - t0
    main_cpu, worker_cpu = time.process_time() - c0, _cpu_seconds(pids) - w0
    n = steps * batch
    L.close()
    return {
        "wall": n / wall,
        "cpu": n / (main_cpu + worker_cpu),
        "worker_cpu": n / worker_cpu if pids else n / main_cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=512)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="samples per step")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument(
        "--pixels-uint8",
        action="store_true",
        help="data.pixels_uint8: ship uint8 pixels, normalise on the device",
    )
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = write_shards(root, args.records, args.shards, args.width, args.height)
        results = {
            "cpu_count": os.cpu_count(),
            "workers": args.workers,
            "pixels_uint8": args.pixels_uint8,
            "image": f"{args.width}x{args.height} JPEG -> {args.image_size}",
        }
        for task in ("und", "gen"):
            b1 = bare_loop(paths, task, args.image_size, repeats=1)
            r = loader_rate(
                root,
                args.shards,
                task,
                args.image_size,
                args.workers,
                args.steps,
                args.batch,
                args.pixels_uint8,
            )
            b2 = bare_loop(paths, task, args.image_size, repeats=1)  # bracket the loader run
            bare_wall, bare_cpu = (b1[0] + b2[0]) / 2, (b1[1] + b2[1]) / 2
            per_worker = r["wall"] / max(1, args.workers)
            results[task] = {
                "bare_samples_per_s": round(bare_wall, 1),
                "loader_samples_per_s": round(r["wall"], 1),
                "loader_samples_per_s_per_worker": round(per_worker, 1),
                "ratio_per_worker_wall": round(per_worker / bare_wall, 3),
                "bare_samples_per_cpu_s": round(bare_cpu, 1),
                "loader_samples_per_cpu_s": round(r["cpu"], 1),
                "ratio_cpu": round(r["cpu"] / bare_cpu, 3),
                "ratio_cpu_workers_only": round(r["worker_cpu"] / bare_cpu, 3),
            }
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
