"""Stage hand-off: an HF-format directory (``save_pretrained`` model + processor) that
``JanusForConditionalGeneration.from_pretrained`` loads as-is; the next stage's
``model.init_from``. A complete Hugging Face model repo: sharded safetensors, the processor with
the run's chat template (``janus_train.model.chat_template``), a model card
(``janus_train.trainer.model_card``).

Weights are the fp32 master copies (DeepSpeed's optimizer partitions for trainable parameters,
gathered under ZeRO-3; the module's own tensors for frozen ones, the VQ from outside the
engine), so a bf16 run hands off without rounding. The directory is written to ``<out>.tmp`` and renamed when complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from janus_train.model.lora import export_lora
from janus_train.model.vq_codes import vq_state_dict
from janus_train.trainer.distributed import DistInfo, barrier

COMPLETE = "export_complete"


def _full_param(p: torch.nn.Parameter, zero_stage: int) -> torch.Tensor:
    """Collective under ZeRO-3: the full fp32 value of one parameter (on every rank)."""
    from deepspeed.utils import safe_get_full_fp32_param

    if p.requires_grad:
        full = safe_get_full_fp32_param(p)
        if full is not None:
            return full.detach().float().cpu()
    if zero_stage == 3 and hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return p.data.detach().float().cpu().clone()
    return p.data.detach().float().cpu()


def consolidated_state_dict(janus: torch.nn.Module, zero_stage: int, info: DistInfo) -> dict:
    """Collective: full fp32 state dict of ``janus`` on rank 0 (empty dict elsewhere)."""
    params = dict(janus.named_parameters(remove_duplicate=False))
    sd = {}
    # + the VQ the trainer holds outside the engine (whole, fp32, on every rank)
    for name, value in {**janus.state_dict(), **vq_state_dict(janus)}.items():
        if name in params:
            value = _full_param(params[name], zero_stage)
        if info.is_main:
            sd[name] = value.detach().cpu()
    return sd


def export_hf(
    janus: torch.nn.Module,
    processor,
    out_dir: str | os.PathLike,
    zero_stage: int,
    info: DistInfo,
    step: int,
    max_shard_size: int | str = "5GB",
    model_card: str | None = None,
) -> Path:
    """Collective: write ``out_dir`` atomically: model safetensors (in shards of at most
    ``max_shard_size`` plus ``model.safetensors.index.json``, so large models load shard by
    shard), config, generation config, processor with its chat template, ``model_card`` as
    ``README.md``; the marker file records ``step``. Returns the path."""
    out = Path(out_dir)
    sd = consolidated_state_dict(janus, zero_stage, info)
    if info.is_main:
        # LoRA: merged from the consolidated weights into hf/; unmerged to adapter/ beside it
        sd = export_lora(janus, sd, out.with_name("adapter"))
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        janus.save_pretrained(
            str(tmp), state_dict=sd, safe_serialization=True, max_shard_size=max_shard_size
        )
        processor.save_pretrained(str(tmp))
        if model_card is not None:
            (tmp / "README.md").write_text(model_card)
        (tmp / COMPLETE).write_text(f"{step}\n")
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    barrier()
    return out


def is_exported(out_dir: str | os.PathLike, step: int) -> bool:
    """True when ``out_dir`` holds a complete export of ``step``."""
    marker = Path(out_dir) / COMPLETE
    return marker.is_file() and marker.read_text().strip() == str(step)
