"""Start-up at scale (issue 22 item 4): what each rank reads and holds while loading
``model.init_from``.

A small Janus (``model=tiny`` widened, default 68M parameters) is saved with ``save_pretrained``. Then ``--ranks`` fresh processes load
it *at the same time* through ``janus_train.model.build_model``, as every rank does at start-up,
once reading in fp32 (before: the trainer's only behaviour until issue 22) and once in bf16 (after:
a bf16 run reads in its training dtype), each followed by the cast to bf16 that DeepSpeed's bf16
engine applies to every parameter. Both an fp32 checkpoint (the trainer's exports) and a bf16 one
(DeepSeek's releases) are measured. Each rank reports:

- ``read_MB``: bytes of tensors fetched from the checkpoint's safetensors files (counted by
  wrapping ``safetensors.safe_open`` in HF's loader: every ``get_tensor`` and materialised
  ``get_slice``, at the stored dtype);
- ``peak_MB``: the rank's resident-set high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before loading) minus its RSS at that moment, i.e. the host memory
  the load itself took at its peak, file-backed mapped pages included (those are the page
  cache's, shared by every rank of a node that maps the same file);
- ``anon_MB``: the rank's private (anonymous) memory after the load, which no other rank shares;
- ``param_MB``: bytes of the loaded parameters, and their dtypes;
- with the node copy (``train.init_from_node_copy``, ``janus_train.trainer.startup``; the
  ranks form a gloo process group, one node): ``shared_MB``, bytes the rank fetched from the
  checkpoint's own directory (the shared file system: the copy it made, plus tensors read there)
  and ``local_MB``, tensor bytes it read from the node's copy; ``shmem_MB``: its shared-memory
  RSS growth (the tmpfs copy's pages it maps, shared by the node's ranks).

ZeRO-3 (``--zero3-only`` runs just these): the ranks form a gloo process group and end with the
model partitioned as ``deepspeed.initialize`` leaves it, the frozen VQ whole outside it
(``detach_vq``). "whole" (before): ``build_model`` loads the whole model on every rank, then
DeepSpeed partitions it (``zero.Init(module=...)``, what the engine does to a model built
outside ``zero.Init``). "partitioned" (after): ``build_model(partitioned=partitioned_load(ds))``,
built under ``zero.Init`` and loaded into the partitions (rank 0 reads, each module gathered,
filled, re-partitioned), the VQ read whole in fp32. ``held_MB``: parameter bytes the rank holds
at the end (its shards, plus the whole VQ); ``anon_trimmed_MB``: private memory after
``malloc_trim(0)`` (what glibc kept of the freed transient buffers returned to the system).

    python benchmarks/bench_startup.py [--ranks 2] [--hidden 512] [--layers 8] [--vocab 32000]
        [--zero3-only]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _model_overrides(args) -> list[str]:
    return [
        f"model.text.hidden_size={args.hidden}",
        f"model.text.intermediate_size={4 * args.hidden}",
        f"model.text.num_hidden_layers={args.layers}",
        f"model.text.num_attention_heads={max(4, args.hidden // 64)}",
        f"model.text.num_key_value_heads={max(4, args.hidden // 64)}",
        f"model.text.vocab_size={args.vocab}",
    ]


def _count_reads(shared: str) -> dict:
    """Wrap the ``safe_open`` HF's loader calls; returns the running byte counts: all, and of
    files under ``shared``."""
    import transformers.modeling_utils as mu

    count = {"bytes": 0, "shared": 0}
    real = mu.safe_open

    def _add(is_shared: bool, t) -> None:
        n = t.numel() * t.element_size()
        count["bytes"] += n
        count["shared"] += n if is_shared else 0

    class _Slice:
        def __init__(self, s, is_shared):
            self._s, self._shared = s, is_shared

        def __getitem__(self, idx):
            t = self._s[idx]
            _add(self._shared, t)
            return t

        def __getattr__(self, name):
            return getattr(self._s, name)

    class _File:
        def __init__(self, *a, **kw):
            self._f = real(*a, **kw)
            self._shared = str(a[0]).startswith(shared)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def get_tensor(self, k):
            t = self._f.get_tensor(k)
            _add(self._shared, t)
            return t

        def get_slice(self, k):
            return _Slice(self._f.get_slice(k), self._shared)

        def __getattr__(self, name):
            return getattr(self._f, name)

    import safetensors

    mu.safe_open = _File
    safetensors.safe_open = _File  # janus_train.model.build.load_whole_vq reads through it
    return count


def worker(args) -> None:
    import torch

    from janus_train.config import compose, to_run_config
    from janus_train.model import build_model

    cfg = to_run_config(
        compose(
            [
                "experiment=tiny",
                "model=tiny",
                *_model_overrides(args),
                f"model.init_from={args.ckpt}",
                "model.tokenizer=null",
            ]
        )
    ).model
    count = _count_reads(str(Path(args.ckpt).resolve()))
    copied = {"bytes": 0}
    exchange, rank = None, int(os.environ.get("RANK", 0))
    if args.node_copy:
        import dataclasses

        import torch.distributed as dist

        from janus_train.trainer import startup
        from janus_train.trainer.distributed import all_gather_objects

        dist.init_process_group("gloo")
        exchange = all_gather_objects
        real_copy = startup._copy

        def counted_copy(src, root):
            out = real_copy(src, root)
            if out[0]:
                copied["bytes"] += startup._size(src)
            return out

        startup._copy = counted_copy
    if args.zero3:
        zero3_load(args, cfg, count)
        return
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = {k: _status_kb(k) for k in ("VmRSS", "RssAnon", "RssShmem")}
    if exchange:
        with startup.node_local_init_from(
            str(Path(args.ckpt).resolve()), args.node_copy, rank, exchange
        ) as src:
            model, _ = build_model(
                dataclasses.replace(cfg, init_from=src),
                workdir=args.workdir,
                dtype=getattr(torch, args.dtype),
            )
    else:
        model, _ = build_model(cfg, workdir=args.workdir, dtype=getattr(torch, args.dtype))
    # what DeepSpeed's bf16 engine then does to every parameter (engine._configure_distributed_model)
    for p in model.parameters():
        if p.dtype != torch.bfloat16:
            p.data = p.data.to(torch.bfloat16)
    params = list(model.parameters())
    print(
        json.dumps(
            {
                "dtype": args.dtype,
                "read_MB": count["bytes"] / 2**20,
                "peak_MB": (_status_kb("VmHWM") - base["VmRSS"]) / 1024,
                "anon_MB": (_status_kb("RssAnon") - base["RssAnon"]) / 1024,
                "shmem_MB": (_status_kb("RssShmem") - base["RssShmem"]) / 1024,
                "shared_MB": (copied["bytes"] + count["shared"]) / 2**20,
                "local_MB": (count["bytes"] - count["shared"]) / 2**20,
                "param_MB": sum(p.numel() * p.element_size() for p in params) / 2**20,
                "param_dtypes": sorted({str(p.dtype) for p in params}),
            }
        )
    )


def zero3_load(args, cfg, count: dict) -> None:
    """One rank of a ZeRO-3 start-up, ``args.zero3`` "whole" or "partitioned" (module doc)."""
    import ctypes

    import deepspeed
    import torch

    from janus_train.model import build_model
    from janus_train.model.vq_codes import detach_vq
    from janus_train.trainer.distributed import partitioned_load, setup_distributed

    info = setup_distributed()
    bf16 = args.dtype == "bfloat16"
    ds = {
        "train_batch_size": info.world_size,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": bf16},
    }
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = {k: _status_kb(k) for k in ("VmRSS", "RssAnon")}
    dtype = getattr(torch, args.dtype)
    if args.zero3 == "partitioned":
        model, _ = build_model(
            cfg, workdir=args.workdir, dtype=dtype, partitioned=partitioned_load(ds)
        )
        vq = detach_vq(model)
    else:
        model, _ = build_model(cfg, workdir=args.workdir, dtype=dtype)
        vq = detach_vq(model)
        deepspeed.zero.Init(module=model, config_dict_or_path=ds, dtype=dtype)
    params = [*model.parameters(), *vq.parameters()]
    assert all(hasattr(p, "ds_tensor") for p in model.parameters())
    held = [getattr(p, "ds_tensor", p) for p in params]
    anon = _status_kb("RssAnon")
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap memory glibc kept: back to the system
    print(
        json.dumps(
            {
                "rank": info.rank,
                "read_MB": count["bytes"] / 2**20,
                "peak_MB": (_status_kb("VmHWM") - base["VmRSS"]) / 1024,
                "anon_MB": (anon - base["RssAnon"]) / 1024,
                "anon_trimmed_MB": (_status_kb("RssAnon") - base["RssAnon"]) / 1024,
                "held_MB": sum(t.numel() * t.element_size() for t in held) / 2**20,
                "vq_MB": sum(p.numel() * p.element_size() for p in vq.parameters()) / 2**20,
                "param_dtypes": sorted({str(t.dtype) for t in held}),
            }
        ),
        flush=True,
    )
    from janus_train.trainer.distributed import exit_finished

    exit_finished(0)


def save_checkpoint(args, out: Path, dtype: str) -> int:
    """The widened tiny model, random init, saved in `dtype` with its processor; its parameter
    count."""
    import torch

    from janus_train.config import compose, to_run_config
    from janus_train.model import build_model

    cfg = to_run_config(compose(["experiment=tiny", "model=tiny", *_model_overrides(args)])).model
    model, processor = build_model(cfg, workdir=out.parent)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    processor.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def launch(
    args, dtype: str, ckpt: Path, workdir: Path, node_copy: str = "", zero3: str = ""
) -> list[dict]:
    """``args.ranks`` workers started together (as a node's ranks are), their reports; with
    ``node_copy`` they form a process group (torchrun's environment variables) and load
    through the node copy under that directory."""
    import socket

    cmd = [sys.executable, __file__, "--worker", "--dtype", dtype, "--ckpt", str(ckpt)]
    cmd += ["--workdir", str(workdir), "--node-copy", node_copy, "--zero3", zero3]
    cmd += _shape_args(args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(args.ranks))
    env["LOCAL_WORLD_SIZE"] = str(args.ranks)
    procs = [
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, text=True, env=dict(env, RANK=str(r), LOCAL_RANK=str(r))
        )
        for r in range(args.ranks)
    ]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise RuntimeError(f"worker exited {p.returncode}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def _shape_args(args) -> list[str]:
    return ["--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--node-copy", default="", help=argparse.SUPPRESS)
    ap.add_argument("--zero3", default="", help=argparse.SUPPRESS)
    ap.add_argument("--zero3-only", action="store_true", help="only the ZeRO-3 start-ups")
    ap.add_argument(
        "--copy-root",
        default="/dev/shm",
        help="node-local directory of the node-copy runs (train.init_from_node_copy)",
    )
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for ck_dtype in ("float32", "bfloat16"):
            ckpt = Path(tmp) / ck_dtype
            n = save_checkpoint(args, ckpt, ck_dtype)
            size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**20
            print(f"{n / 1e6:.1f}M parameters, {ck_dtype} checkpoint: {size:.0f} MB of safetensors")
            for mode in ("whole", "partitioned"):
                for r in launch(args, ck_dtype, ckpt, Path(tmp), zero3=mode):
                    print(
                        f"  ZeRO-3, {ck_dtype} read, {mode}, rank {r['rank']}: read "
                        f"{r['read_MB']:.0f} MB, peak RSS +{r['peak_MB']:.0f} MB, private (anon) "
                        f"+{r['anon_MB']:.0f} MB (+{r['anon_trimmed_MB']:.0f} MB after malloc_trim), "
                        f"params held {r['held_MB']:.0f} MB (VQ "
                        f"{r['vq_MB']:.0f} MB) {','.join(r['param_dtypes'])}"
                    )
            if args.zero3_only:
                continue
            for dtype, label, copy in (
                ("float32", "fp32 read, every rank from the checkpoint", ""),
                ("bfloat16", "bf16 read, every rank from the checkpoint", ""),
                ("bfloat16", "bf16 read through the node copy", args.copy_root),
            ):
                for rank, r in enumerate(launch(args, dtype, ckpt, Path(tmp), copy)):
                    print(
                        f"  {label}, rank {rank}: read {r['read_MB']:.0f} MB (from the "
                        f"checkpoint's directory {r['shared_MB']:.0f} MB, node copy "
                        f"{r['local_MB']:.0f} MB), peak RSS +{r['peak_MB']:.0f} MB, private (anon) "
                        f"+{r['anon_MB']:.0f} MB, shared memory +{r['shmem_MB']:.0f} MB, params "
                        f"{r['param_MB']:.0f} MB {','.join(r['param_dtypes'])}"
                    )


if __name__ == "__main__":
    main()
