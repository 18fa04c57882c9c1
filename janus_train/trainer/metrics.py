"""One metrics path: rank 0 appends a JSON line per log step to ``run_dir/metrics.jsonl`` and
mirrors it to wandb when enabled; plus the FLOP accounting behind ``speed/mfu``.

MFU follows PaLM (appendix B): per LLM token ``6 N + 12 L d T`` (N: LLM non-embedding
parameters plus ``lm_head``, L layers, d width, T sequence length), plus the forward FLOPs of
the encoders that ran (SigLIP + understanding adaptor per understanding image, VQ encoder per
generation image encoded in the step), divided by wall time x world size x the GPU's dense bf16
peak. Not reported on CPU or on an unknown GPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from janus_train.model.freeze import full_numel

logger = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s by GPU model (substring of torch.cuda.get_device_name, first match).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("H20", 148e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 125e12),
    ("A6000", 155e12),
    ("4090", 165e12),
    ("V100", 125e12),
)


def peak_flops(device_name: str | None = None) -> float | None:
    """Dense bf16 peak of the current GPU; None on CPU or an unknown model."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


def _forward_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def encoder_flops(janus_config) -> tuple[float, float]:
    """Forward FLOPs of (SigLIP + aligner) on one understanding image and of the VQ encoder on
    one generation image, counted on meta-device copies built from the config (no memory)."""
    from transformers.models.janus import modeling_janus as mj

    vc = janus_config.vision_config
    size = vc.image_size
    with torch.device("meta"):
        vision = mj.JanusVisionModel(vc)
        aligner = mj.JanusVisionAlignerMLP(vc)
        vq = mj.JanusVQVAE(janus_config.vq_config)
        img = torch.zeros(1, 3, size, size)

    def und():
        aligner(vision(pixel_values=img).last_hidden_state)

    return _forward_flops(und), _forward_flops(lambda: vq.encode(img))


class FlopCounter:
    """Model FLOPs of a micro-batch (PaLM accounting, module docstring) and MFU."""

    def __init__(self, janus) -> None:
        lm = janus.model.language_model
        tc = janus.config.text_config
        # full sizes, also of parameters built partitioned (ZeRO-3)
        n = sum(full_numel(p) for name, p in lm.named_parameters() if "embed_tokens" not in name)
        n += sum(full_numel(p) for p in janus.lm_head.parameters())
        self.n_params = n
        self.layers, self.width = tc.num_hidden_layers, tc.hidden_size
        self.und_image, self.gen_image = encoder_flops(janus.config)
        self.peak = peak_flops()

    def per_token(self, seq_len: int) -> float:
        return 6.0 * self.n_params + 12.0 * self.layers * self.width * seq_len

    def batch_flops(self, batch: dict) -> float:
        """Padded rows: every real token attends over the row length T (PaLM). Packed rows
        (``position_ids``): a token's attention term uses its own sample's length."""
        tokens = float(batch["attention_mask"].sum())
        if "position_ids" in batch:
            n = sample_lengths(batch).double()
            flops = self.per_token(0) * tokens + 12.0 * self.layers * self.width * float(
                (n * n).sum()
            )
        else:
            flops = self.per_token(batch["input_ids"].shape[1]) * tokens
        if "pixel_values" in batch:
            flops += self.und_image * batch["pixel_values"].shape[0]
        if "gen_pixel_values" in batch:
            flops += self.gen_image * batch["gen_pixel_values"].shape[0]
        return flops

    def mfu(self, flops: float, seconds: float, world_size: int) -> float | None:
        if self.peak is None or seconds <= 0:
            return None
        return flops / (seconds * world_size * self.peak)


class MetricsLogger:
    """Rank-0 JSONL (+ wandb) logger; a no-op on other ranks.

    ``resume_step``: the step the run (re)starts from; rows of later steps, written before an
    interruption and about to be replayed, are dropped so each step appears once.
    ``total_steps`` with ``console``: each training row is also one log line (step, losses,
    learning rate, tokens/s, ETA), for logs that are not a terminal (Slurm, ``nohup``).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        enabled: bool,
        wandb_cfg: dict | None = None,
        resume_step: int = 0,
        total_steps: int | None = None,
        console: bool = False,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb_run = None
        self.wandb_id: str | None = None
        self.total_steps, self.console = total_steps, console
        if enabled:
            drop_rows_after(self.path, resume_step)
        if enabled and wandb_cfg is not None:
            self._init_wandb(**wandb_cfg)

    def _init_wandb(
        self, project: str, name: str, config: dict, run_id: str | None, run_dir: str
    ) -> None:
        try:
            import wandb
        except ImportError as e:
            raise RuntimeError(
                "train.wandb=true but wandb is not installed (pip install wandb)"
            ) from e
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        self.wandb_run = wandb.init(
            project=project,
            name=name,
            config=config,
            id=run_id,
            resume="allow",
            mode=mode,
            dir=run_dir,
        )
        self.wandb_id = self.wandb_run.id

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        # Strict JSON: a non-finite value (a skipped step's loss) is written as null.
        clean = {
            k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in metrics.items()
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")
        if self.console and "loss" in metrics:
            logger.info("%s", format_row(metrics, self.total_steps))
        if self.wandb_run is not None:
            self.wandb_run.log(
                {k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"]
            )

    def log_eval_media(self, step: int, eval_dir: str | os.PathLike) -> None:
        """wandb only: the evaluation's image grid and understanding answers (both are also
        files in ``eval_dir``)."""
        if self.wandb_run is None:
            return
        import wandb

        eval_dir = Path(eval_dir)
        media: dict = {}
        if (eval_dir / "generated.png").is_file():
            media["eval/generated"] = wandb.Image(str(eval_dir / "generated.png"))
        if (eval_dir / "answers.jsonl").is_file():
            rows = [
                json.loads(line)
                for line in (eval_dir / "answers.jsonl").read_text().splitlines()
                if line.strip()
            ]
            if rows:
                cols = sorted({k for r in rows for k in r})
                media["eval/answers"] = wandb.Table(
                    columns=cols, data=[[str(r.get(c, "")) for c in cols] for r in rows]
                )
        if media:
            self.wandb_run.log(media, step=step)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def drop_rows_after(path: Path, step: int) -> int:
    """Remove the rows of ``path`` (JSONL) whose ``step`` is above ``step`` (atomic rewrite);
    returns how many were dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
    dropped = len([ln for ln in lines if ln.strip()]) - len(keep)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, path)
        logger.info("%s: dropped %d rows after step %d (replayed on resume)", path, dropped, step)
    return dropped


def format_row(rec: dict, total_steps: int | None) -> str:
    """One line per logged step: ``step 40/100 loss 5.1234 (und 6.0 text - gen 4.1) lr 1.0e-03
    grad 2.31 tok/s 1234 eta 0:01:10``."""

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    step = rec["step"]
    parts = [
        f"step {step}" + (f"/{total_steps}" if total_steps else ""),
        f"loss {num(rec.get('loss'), '.4f')}",
    ]
    tasks = [k.split("/", 1)[1] for k in rec if k.startswith("loss/")]
    if tasks:
        parts.append("(" + " ".join(f"{t} {num(rec[f'loss/{t}'], '.3f')}" for t in tasks) + ")")
    parts += [
        f"lr {num(rec.get('optim/lr'), '.2e')}",
        f"grad {num(rec.get('optim/grad_norm'), '.3g')}",
        f"tok/s {num(rec.get('speed/tokens_per_s'), '.0f')}",
    ]
    step_time = rec.get("speed/step_time_s")
    if total_steps and step_time is not None:
        eta = int(round(step_time * max(0, total_steps - step)))
        parts.append(f"eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
    return " ".join(parts)


def count_samples(batch: dict) -> int:
    """Samples in a (packed or padded) batch: starts of ``position_ids`` runs on real tokens,
    or rows with a real token when there are no ``position_ids``."""
    mask = batch["attention_mask"].bool()
    if "position_ids" in batch:
        return int(((batch["position_ids"] == 0) & mask).sum())
    return int(mask.any(1).sum())


def sample_lengths(batch: dict) -> torch.Tensor:
    """(n_samples,) real-token lengths of the batch's samples (packed rows split at the
    ``position_ids`` restarts)."""
    mask = batch["attention_mask"].bool()
    if "position_ids" not in batch:
        return mask.sum(1)[mask.any(1)]
    pos = batch["position_ids"][mask]  # real tokens, row-major: each row starts a sample
    starts = (pos == 0).nonzero().view(-1)
    return torch.diff(torch.cat([starts, starts.new_tensor([pos.numel()])]))


def fill_metrics(per_rank: list[list[tuple[int, int]]]) -> dict[str, float]:
    """``data/token_fill``: real (non-pad) tokens / token slots (B x T of every micro-batch;
    an empty micro-step is one pad slot) over all ranks and the window's steps;
    ``data/rank_imbalance``:
    the worst step's max/mean - 1 of real tokens per rank. ``per_rank[rank][step]`` = that
    rank's ``Throughput.fill``."""
    from janus_train.data.packing import imbalance

    steps = list(zip(*per_rank))  # [step][rank] -> (real, slots)
    real = sum(r for st in steps for r, _ in st)
    slots = sum(n for st in steps for _, n in st)
    return {
        "data/token_fill": real / slots if slots else 0.0,
        "data/rank_imbalance": max((imbalance([r for r, _ in st]) for st in steps), default=0.0),
    }


class Throughput:
    """Per-rank counters of the steps since the last log (tokens, samples, model FLOPs, steps)
    and the training time they took (evaluation and checkpoint time excluded)."""

    def __init__(self, flops: FlopCounter) -> None:
        self.flops = flops
        self.local = torch.zeros(4, dtype=torch.float64)
        self.t0 = time.perf_counter()
        self.fill: list[tuple[int, int]] = []
        """This rank's (real tokens, token slots) per step since the last log."""

    def add_step(self, host_batches: list[dict]) -> None:
        """Counted on the host copies: no device synchronisation inside the step."""
        real = sum(int(b["attention_mask"].sum()) for b in host_batches)
        self.fill.append((real, sum(b["attention_mask"].numel() for b in host_batches)))
        self.local += torch.tensor(
            [
                real,
                sum(count_samples(b) for b in host_batches),
                sum(self.flops.batch_flops(b) for b in host_batches),
                1.0,
            ],
            dtype=torch.float64,
        )

    def exclude(self, seconds: float) -> None:
        """Time spent outside training (evaluation, checkpoint) does not count."""
        self.t0 += seconds

    def record(self, summed: torch.Tensor, world_size: int) -> dict:
        """``speed/*`` of the window from ``summed`` = every rank's (tokens, samples, FLOPs);
        then starts a new window."""
        elapsed = time.perf_counter() - self.t0
        steps = float(self.local[3])
        rec = {
            "speed/tokens_per_s": float(summed[0]) / elapsed,
            "speed/samples_per_s": float(summed[1]) / elapsed,
            "speed/step_time_s": elapsed / steps,
        }
        mfu = self.flops.mfu(float(summed[2]), elapsed, world_size)
        if mfu is not None:
            rec["speed/mfu"] = mfu
        self.local.zero_()
        self.t0 = time.perf_counter()
        return rec
