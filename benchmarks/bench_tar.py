"""Tar reader cost per record (janus_train.data.tario) vs bare reads, and vs decoding the image.

Writes one shard of caption records (photo-like JPEG + txt + json, as bench_loader.py), then
measures in the same run, per record, best of ``--repeats``:

- bare: ``seek`` + ``read`` of each member at its data offset (offsets from this script's own
  header walk), records in a seeded order: the floor of any local reader;
- local: tario's ``read_record`` at ``index_tar``'s entries in the same order (what a training
  worker does with a local shard);
- tar_iteration: the same records each read by webdataset's ``tar_file_iterator`` +
  ``group_by_keys`` started at the record's first header (the design not taken for local
  shards: every member header parsed again on every read);
- stream: ``iter_shard("pipe:cat SHARD")``, records in tar order (remote shards);
- index: ``index_tar`` once, per record; decode: PIL decode + RGB conversion of the record's
  JPEG (the builders' first step), for scale.

    python benchmarks/bench_tar.py [--records 256] [--width 640] [--height 480] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loader import photo_like  # noqa: E402

from janus_train.data.tario import index_tar, iter_shard, read_record, write_tar  # noqa: E402


def best_us(fn, n: int, repeats: int) -> float:
    """Best per-record microseconds of ``fn()`` (which handles ``n`` records) over repeats."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=256)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    n = args.records
    with tempfile.TemporaryDirectory() as tmp:
        recs = [
            (
                f"{i:06d}",
                {
                    "jpg": photo_like(i, args.width, args.height),
                    "txt": b"a photo of red circles on a gradient.",
                    "json": json.dumps({"key": f"{i:06d}"}).encode(),
                },
            )
            for i in range(n)
        ]
        path = write_tar(Path(tmp) / "img-000000.tar", recs)
        order = np.random.default_rng(0).permutation(n)

        members: list[list[tuple[str, int, int]]] = [[] for _ in range(n)]
        first_header = [-1] * n
        with tarfile.open(path) as tf:  # the baseline's own offsets, not tario's index
            for ti in tf:
                key, ext = ti.name.split(".", 1)
                members[int(key)].append((ext, ti.offset_data, ti.size))
                if first_header[int(key)] < 0:
                    first_header[int(key)] = ti.offset

        def bare():
            with open(path, "rb") as f:
                for i in order:
                    out = {}
                    for ext, off, size in members[int(i)]:
                        f.seek(off)
                        out[ext] = f.read(size)

        entries, _ = index_tar(path)

        def local():
            with open(path, "rb") as f:
                for i in order:
                    read_record(f, path, entries[int(i)])

        def tar_iteration():
            with open(path, "rb") as f:
                for i in order:
                    f.seek(first_header[int(i)])
                    files = itertools.islice(tar_file_iterator(f), len(members[int(i)]))
                    (rec,) = group_by_keys({**x, "__url__": path} for x in files)

        def stream():
            assert sum(1 for _ in iter_shard(f"pipe:cat {path}")) == n

        def decode():
            for _, m in recs:
                Image.open(io.BytesIO(m["jpg"])).convert("RGB")

        t0 = time.perf_counter()
        index_tar(path)
        index_us = (time.perf_counter() - t0) / n * 1e6
        res = {
            "records": n,
            "image": f"{args.width}x{args.height} JPEG",
            "bare_us": best_us(bare, n, args.repeats),
            "local_us": best_us(local, n, args.repeats),
            "tar_iteration_us": best_us(tar_iteration, n, args.repeats),
            "stream_us": best_us(stream, n, args.repeats),
            "index_us": index_us,
            "decode_us": best_us(decode, n, args.repeats),
        }
        res["local_over_bare"] = res["local_us"] / res["bare_us"]
        res["tar_iteration_over_local"] = res["tar_iteration_us"] / res["local_us"]
        res["tar_iteration_extra_vs_decode"] = (res["tar_iteration_us"] - res["local_us"]) / res[
            "decode_us"
        ]
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()
