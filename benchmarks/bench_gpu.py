"""One-GPU throughput of the shipped stage-2 configuration against the LLM alone, same run.

    python benchmarks/bench_gpu.py                         # janus_pro_1b on the GPU (CPU: tiny)
    python benchmarks/bench_gpu.py --model janus_pro_7b --checkpointing full
    python benchmarks/bench_gpu.py --checkpointing 2 --tokens-per-micro 16384 --attn sdpa
    python benchmarks/bench_gpu.py --kernels liger             # Liger's fused kernels (CUDA)
    python benchmarks/bench_gpu.py --loss-chunk-tokens 4096    # heads' CE in chunks (any device)
    python benchmarks/bench_gpu.py --compile                   # torch.compile of decoder layers
    python benchmarks/bench_gpu.py --mfu-file ''                # measure without recording

1. **Trainer**: ``janus_train.train.run`` (one process, DeepSpeed ZeRO-2, bf16 where
   supported) on the shipped ``experiment=<model> stage=stage2`` configuration, random init,
   on synthetic samples with the papers' length mix (``train.synthetic_length_mix=janus``:
   understanding 576 image + 20-300 text tokens, generation 10-80 prompt + 576 codes, text
   documents 100-4096 tokens) in token-budget micro-batches; MFU, tokens/s and token fill are
   the trainer's own ``metrics.jsonl`` figures (first logged window dropped: warm-up).
2. **Reference**: the LLM alone (HF ``LlamaForCausalLM`` of the same dimensions and vocabulary)
   in a plain PyTorch loop: full rows of ``--ref-seq-len`` tokens, bf16 autocast over fp32
   weights, fused AdamW, sdpa (its causal FlashAttention path: full rows need no varlen);
   MFU by the same PaLM formula. ``--reference-only`` runs it alone (its own process).

``--kernels``, ``--loss-chunk-tokens`` and ``--compile`` set ``model.kernels`` /
``model.loss_chunk_tokens`` / ``model.compile`` of the trainer part only; the reference stays
plain PyTorch (the baseline). Prints one JSON line per part: peak memory (allocated and
reserved), on CUDA the host syncs per optimizer step and inside its micro-steps
(``torch.cuda.set_sync_debug_mode``), dynamo's compilations and graph breaks, and with
``--profile-step k`` a ``torch.profiler`` table of step k (top kernels by time) in
``<out>/trainer/profile.txt``; then the trainer/reference MFU ratio. A measured trainer MFU is
appended, as one record, to ``--mfu-file`` (default ``benchmarks/results/mfu.json``, the file
``janus-plan`` reads its utilisation from: ``janus_train.plan.config.measured_mfu``). On a
machine without CUDA it runs the tiny model (rows of 512 tokens) so the script and the trainer
path stay tested, and reports no MFU (no peak FLOP/s to divide by).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from janus_train import compat


def _cuda() -> bool:
    return torch.cuda.is_available()


def _attn(requested: str) -> str:
    """The trainer's ``model.attn_implementation`` resolved as the trainer resolves it."""
    from janus_train.model.attention import resolve_attn_implementation

    return resolve_attn_implementation(requested)


def _ref_attn(attn: str) -> str:
    """The LLM-alone reference trains full rows (no packing): HF's own implementations only;
    PyTorch's varlen kernel there is sdpa's causal FlashAttention path."""
    return "sdpa" if attn == "torch_varlen" else attn


class StepProbe:
    """Wraps ``janus_train.train.train_step`` (and ``forward_backward`` inside it) during the
    trainer part: host syncs per optimizer step and inside its micro-steps on CUDA
    (``torch.cuda.set_sync_debug_mode``: a warning per synchronizing call, counted), and a
    ``torch.profiler`` table of step ``profile_step`` (top kernels by time)."""

    SYNC_MSG = "called a synchronizing CUDA operation"

    def __init__(self, profile_step: int = -1, profile_rows: int = 15):
        self.steps: list[dict] = []
        self.profile_step = profile_step
        self.profile_rows = profile_rows
        self.table: str | None = None

    def _count(self, fn, *args, **kwargs):
        import warnings

        if not _cuda():
            return fn(*args, **kwargs), None
        prev = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(prev)
        return out, sum(self.SYNC_MSG in str(w.message) for w in got)

    def install(self, train_module) -> None:
        real_step, real_fb = train_module.train_step, train_module.forward_backward
        probe = self

        def forward_backward(*args, **kwargs):
            out, n = probe._count(real_fb, *args, **kwargs)
            probe.steps[-1]["syncs_in_micro_steps"] = n
            return out

        def train_step(*args, **kwargs):
            probe.steps.append({})
            if len(probe.steps) - 1 != probe.profile_step:
                out, n = probe._count(real_step, *args, **kwargs)
            else:
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if _cuda() else [])
                with profile(activities=acts) as prof:
                    out, n = probe._count(real_step, *args, **kwargs)
                    if _cuda():
                        torch.cuda.synchronize()
                key = "cuda_time_total" if _cuda() else "cpu_time_total"
                probe.table = prof.key_averages().table(sort_by=key, row_limit=probe.profile_rows)
            if n is not None:  # the micro-steps' warnings went to their own (inner) record
                n += probe.steps[-1].get("syncs_in_micro_steps") or 0
            probe.steps[-1]["syncs_per_step"] = n
            return out

        train_module.train_step = train_step
        train_module.forward_backward = forward_backward

    def record(self) -> dict:
        """Mean syncs per step after the first step (warm-up), None off CUDA."""
        rows = self.steps[1:] or self.steps

        def mean(k):
            vals = [r[k] for r in rows if r.get(k) is not None]
            return sum(vals) / len(vals) if vals else None

        return {
            "host_syncs_per_step": mean("syncs_per_step"),
            "host_syncs_in_micro_steps": mean("syncs_in_micro_steps"),
        }


def _checkpointing(spec: str) -> list[str]:
    """``none`` | ``full`` | k (every k-th decoder layer)."""
    if spec == "none":
        return ["model.gradient_checkpointing=false"]
    k = 1 if spec == "full" else int(spec)
    return ["model.gradient_checkpointing=true", f"model.checkpoint_every={k}"]


def _commit() -> str:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def mfu_record(trainer: dict, device: str) -> dict:
    """The trainer part as a record of ``janus_train.plan.config.measured_mfu``'s format."""
    from datetime import UTC, datetime

    ck = trainer["checkpointing"]
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "gpu": device,
        "mfu": trainer["mfu"],
        "model": trainer["model"],
        "layers": trainer["layers"],
        "hidden": trainer["hidden"],
        "checkpointing": ck if ck in ("none", "full") else f"every {int(ck)}",
        "commit": _commit(),
        **{k: trainer[k] for k in ("attn", "kernels", "compile", "tokens_per_micro")},
        "tokens_per_s": trainer["tokens_per_s"],
    }


def trainer_part(args, run_dir: Path) -> dict:
    from janus_train.config import compose, to_run_config
    from janus_train.train import run

    attn = args.attn
    ov = [
        f"experiment={args.model}",
        "stage=stage2",
        "deepspeed=zero2",
        "model.init_from=null",
        "model.tokenizer=tiny",
        f"model.attn_implementation={attn}",
        *_checkpointing(args.checkpointing),
        f"model.kernels={args.kernels}",
        f"model.loss_chunk_tokens={args.loss_chunk_tokens}",
        f"model.compile={str(args.compile).lower()}",
        f"model.compile_backend={args.compile_backend}",
        "train.synthetic_data=true",
        "train.synthetic_length_mix=janus",
        f"train.synthetic_seq_len={args.seq_len}",
        f"train.tokens_per_micro={args.tokens_per_micro}",
        f"experiment.stage2.global_batch_size={args.global_batch}",
        f"experiment.stage2.steps={args.steps}",
        f"train.log_every={args.log_every}",
        "train.ckpt_every=0",
        "train.export_at_end=false",
        "train.progress_bar=false",
        f"train.run_dir={run_dir}",
    ]
    if _cuda():
        torch.cuda.reset_peak_memory_stats()
    from janus_train import train

    probe = StepProbe(profile_step=args.profile_step)
    probe.install(train)
    t0 = time.perf_counter()
    cfg = to_run_config(compose(ov))
    assert run(cfg) == 0
    wall = time.perf_counter() - t0
    if probe.table is not None:
        (run_dir / "profile.txt").write_text(probe.table)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "speed/tokens_per_s" in r][1:] or recs[-1:]

    def mean(key):
        vals = [r[key] for r in recs if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    return {
        "part": "trainer",
        "model": args.model,
        "layers": cfg.model.text.num_hidden_layers,
        "hidden": cfg.model.text.hidden_size,
        "attn": _attn(args.attn),
        "checkpointing": args.checkpointing,
        "kernels": args.kernels,
        "loss_chunk_tokens": args.loss_chunk_tokens,
        "compile": args.compile_backend if args.compile else None,
        "tokens_per_micro": args.tokens_per_micro,
        "global_batch": args.global_batch,
        "mfu": mean("speed/mfu"),
        "tokens_per_s": mean("speed/tokens_per_s"),
        "step_time_s": mean("speed/step_time_s"),
        "token_fill": mean("data/token_fill"),
        "rank_imbalance": mean("data/rank_imbalance"),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if _cuda() else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if _cuda() else None,
        **probe.record(),
        **compat.dynamo_counters(),  # model.compile's (zeros without it)
        "profile": str(run_dir / "profile.txt") if probe.table is not None else None,
        "wall_s": wall,
        "overrides": ov,
    }


def reference_part(args, workdir: Path) -> dict:
    """The LLM alone on full rows in plain PyTorch (the ceiling the trainer is compared with)."""
    from transformers import LlamaForCausalLM

    from janus_train.config import compose, to_run_config
    from janus_train.model.build import build_janus_config, get_processor
    from janus_train.trainer.metrics import peak_flops

    run = to_run_config(
        compose([f"experiment={args.model}", "model.init_from=null", "model.tokenizer=tiny"])
    )
    tok = get_processor(run.model, workdir).tokenizer
    tcfg = build_janus_config(run.model, tok).text_config
    compat.set_attn_implementation(tcfg, _ref_attn(_attn(args.attn)))
    dev = torch.device("cuda" if _cuda() else "cpu")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tcfg).to(dev)
    model.train()
    if args.checkpointing != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        k = 1 if args.checkpointing == "full" else int(args.checkpointing)
        for i, layer in enumerate(model.model.layers):
            layer.gradient_checkpointing = i % k == 0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=_cuda())
    T = args.ref_seq_len
    rows = max(1, args.tokens_per_micro // T)
    n = sum(p.numel() for name, p in model.model.named_parameters() if "embed_tokens" not in name)
    n += model.lm_head.weight.numel()
    flops_per_row = T * (6.0 * n + 12.0 * tcfg.num_hidden_layers * tcfg.hidden_size * T)
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if _cuda()
        else torch.autocast("cpu", enabled=False)
    )
    g = torch.Generator().manual_seed(1)
    if _cuda():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.ref_steps):
        t0 = time.perf_counter()
        for _ in range(args.ref_accum):
            ids = torch.randint(0, tcfg.vocab_size, (rows, T), generator=g).to(dev)
            with amp:
                loss = model(input_ids=ids, labels=ids).loss / args.ref_accum
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if _cuda():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    dt = sum(times[1:]) / max(1, len(times) - 1)  # first step: warm-up
    peak = peak_flops()
    step_flops = flops_per_row * rows * args.ref_accum
    return {
        "part": "reference_llm_alone",
        "attn": compat.get_attn_implementation(tcfg),
        "rows_per_micro": rows,
        "seq_len": T,
        "accum": args.ref_accum,
        "mfu": step_flops / (dt * peak) if peak else None,
        "tokens_per_s": rows * T * args.ref_accum / dt,
        "step_time_s": dt,
        "token_fill": 1.0,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if _cuda() else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if _cuda() else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        default=None,
        help="janus_pro_1b (GPU default) | janus_pro_7b | janus_1.3b | tiny (CPU default)",
    )
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--log-every", type=int, default=None)
    ap.add_argument("--global-batch", type=int, default=None)
    ap.add_argument("--tokens-per-micro", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None, help="longest sample (4096)")
    ap.add_argument("--checkpointing", default="none", help="none | full | k (every k-th layer)")
    ap.add_argument(
        "--attn",
        default="auto",
        help="model.attn_implementation (auto: PyTorch's varlen attention on CUDA, sdpa on CPU)",
    )
    ap.add_argument(
        "--kernels",
        default="none",
        help="model.kernels of the trainer part: none | liger (CUDA, pip install '.[gpu]')",
    )
    ap.add_argument(
        "--loss-chunk-tokens",
        type=int,
        default=0,
        help="model.loss_chunk_tokens of the trainer part (0: heads' logits all at once)",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="model.compile=true for the trainer part: torch.compile of each decoder layer",
    )
    ap.add_argument(
        "--compile-backend",
        default="inductor",
        help="model.compile_backend: inductor | aot_eager (traces only: CPU dry runs) | eager",
    )
    ap.add_argument(
        "--no-reference",
        action="store_true",
        help="trainer part only (the reference does not depend on the trainer's options)",
    )
    ap.add_argument(
        "--reference-only",
        action="store_true",
        help="the LLM-alone reference only (its own process: no DeepSpeed engine beside it)",
    )
    ap.add_argument(
        "--profile-step",
        type=int,
        default=-1,
        help="torch.profiler table (top kernels by time) of this optimizer step (0-based) into "
        "<out>/trainer/profile.txt; -1: none",
    )
    ap.add_argument("--ref-seq-len", type=int, default=None)
    ap.add_argument("--ref-steps", type=int, default=None)
    ap.add_argument("--ref-accum", type=int, default=None)
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    ap.add_argument(
        "--mfu-file",
        default=str(Path(__file__).resolve().parent / "results" / "mfu.json"),
        help="append the trainer's measured MFU here as a janus-plan record (never rewritten; "
        "'' = do not record; nothing is recorded without a measured MFU, e.g. on CPU)",
    )
    args = ap.parse_args()
    gpu = _cuda()
    defaults = (
        dict(
            model="janus_pro_1b",
            steps=30,
            log_every=5,
            global_batch=64,
            tokens_per_micro=8192,
            seq_len=4096,
            ref_seq_len=4096,
            ref_steps=6,
            ref_accum=4,
        )
        if gpu
        else dict(
            model="tiny",
            steps=6,
            log_every=2,
            global_batch=16,
            tokens_per_micro=1024,
            seq_len=512,
            ref_seq_len=512,
            ref_steps=4,
            ref_accum=2,
        )
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    from janus_train.model.attention import check_attn_available
    from janus_train.model.config import ModelConfig
    from janus_train.model.kernels import check_kernels_available

    try:  # before any model: liger needs CUDA and the package; flex/flash need CUDA
        check_attn_available(args.attn)
        check_kernels_available(
            ModelConfig(kernels=args.kernels, loss_chunk_tokens=args.loss_chunk_tokens)
        )
    except ValueError as e:
        raise SystemExit(f"bench_gpu.py: {e}") from None
    device = torch.cuda.get_device_name() if gpu else "cpu (no MFU: no peak FLOP/s)"
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_gpu_"))
    if args.reference_only:
        ref = reference_part(args, out)
        print(json.dumps({"device": device, **ref}), flush=True)
        return
    trainer = trainer_part(args, out / "trainer")
    # each part printed as soon as it is measured: a run stopped later keeps it
    print(json.dumps({"device": device, **trainer}), flush=True)
    if trainer["mfu"] and args.mfu_file:
        from janus_train.plan.config import append_mfu_record

        n = append_mfu_record(args.mfu_file, mfu_record(trainer, device))
        print(
            f"bench_gpu.py: MFU {trainer['mfu']:.3f} recorded in {args.mfu_file} ({n} records)",
            file=sys.stderr,
        )
    if args.no_reference:
        return
    ref = reference_part(args, out)
    print(json.dumps({"device": device, **ref}), flush=True)
    ratio = (trainer["mfu"] / ref["mfu"]) if trainer["mfu"] and ref["mfu"] else None
    print(
        json.dumps(
            {
                "device": device,
                "mfu_ratio_trainer_over_reference": ratio,
                "tokens_per_s_ratio": trainer["tokens_per_s"] / ref["tokens_per_s"],
            }
        )
    )


if __name__ == "__main__":
    main()
