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
- ``param_MB``: bytes of the loaded parameters, and their dtypes.

    python benchmarks/bench_startup.py [--ranks 2] [--hidden 512] [--layers 8] [--vocab 32000]
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


def _count_reads() -> dict:
    """Wrap the ``safe_open`` HF's loader calls; returns the running byte count."""
    import transformers.modeling_utils as mu

    count = {"bytes": 0}
    real = mu.safe_open

    class _Slice:
        def __init__(self, s):
            self._s = s

        def __getitem__(self, idx):
            t = self._s[idx]
            count["bytes"] += t.numel() * t.element_size()
            return t

        def __getattr__(self, name):
            return getattr(self._s, name)

    class _File:
        def __init__(self, *a, **kw):
            self._f = real(*a, **kw)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def get_tensor(self, k):
            t = self._f.get_tensor(k)
            count["bytes"] += t.numel() * t.element_size()
            return t

        def get_slice(self, k):
            return _Slice(self._f.get_slice(k))

        def __getattr__(self, name):
            return getattr(self._f, name)

    mu.safe_open = _File
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
    count = _count_reads()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = {k: _status_kb(k) for k in ("VmRSS", "RssAnon")}
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
                "param_MB": sum(p.numel() * p.element_size() for p in params) / 2**20,
                "param_dtypes": sorted({str(p.dtype) for p in params}),
            }
        )
    )


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


def launch(args, dtype: str, ckpt: Path, workdir: Path) -> list[dict]:
    """``args.ranks`` workers started together (as a node's ranks are), their reports."""
    cmd = [sys.executable, __file__, "--worker", "--dtype", dtype, "--ckpt", str(ckpt)]
    cmd += ["--workdir", str(workdir), *_shape_args(args)]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
        for _ in range(args.ranks)
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
            for dtype, label in (
                ("float32", "before: fp32 read"),
                ("bfloat16", "after: bf16 read"),
            ):
                for rank, r in enumerate(launch(args, dtype, ckpt, Path(tmp))):
                    print(
                        f"  {label} rank {rank}: read {r['read_MB']:.0f} MB, peak RSS "
                        f"+{r['peak_MB']:.0f} MB, private (anon) +{r['anon_MB']:.0f} MB, params "
                        f"{r['param_MB']:.0f} MB {','.join(r['param_dtypes'])}"
                    )


if __name__ == "__main__":
    main()
