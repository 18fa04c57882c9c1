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
from pathlib import Path

import torch

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
        # Built before DeepSpeed partitions anything, so numel() is the full size.
        n = sum(p.numel() for name, p in lm.named_parameters() if "embed_tokens" not in name)
        n += sum(p.numel() for p in janus.lm_head.parameters())
        self.n_params = n
        self.layers, self.width = tc.num_hidden_layers, tc.hidden_size
        self.und_image, self.gen_image = encoder_flops(janus.config)
        self.peak = peak_flops()

    def per_token(self, seq_len: int) -> float:
        return 6.0 * self.n_params + 12.0 * self.layers * self.width * seq_len

    def batch_flops(self, batch: dict) -> float:
        tokens = float(batch["attention_mask"].sum())
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
    """Rank-0 JSONL (+ wandb) logger; a no-op on other ranks."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool, wandb_cfg: dict | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb_run = None
        self.wandb_id: str | None = None
        if enabled and wandb_cfg is not None:
            self._init_wandb(**wandb_cfg)

    def _init_wandb(self, project: str, name: str, config: dict, run_id: str | None,
                    run_dir: str) -> None:
        try:
            import wandb
        except ImportError as e:
            raise RuntimeError("train.wandb=true but wandb is not installed (pip install wandb)") from e
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        self.wandb_run = wandb.init(
            project=project, name=name, config=config, id=run_id, resume="allow", mode=mode,
            dir=run_dir,
        )
        self.wandb_id = self.wandb_run.id

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        # Strict JSON: a non-finite value (a skipped step's loss) is written as null.
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                 for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in metrics.items() if k != "step"},
                               step=metrics["step"])

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
            rows = [json.loads(line) for line in (eval_dir / "answers.jsonl").read_text().splitlines()
                    if line.strip()]
            if rows:
                cols = sorted({k for r in rows for k in r})
                media["eval/answers"] = wandb.Table(
                    columns=cols, data=[[str(r.get(c, "")) for c in cols] for r in rows])
        if media:
            self.wandb_run.log(media, step=step)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
