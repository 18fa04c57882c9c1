"""Stage hand-off: an HF-format directory (``save_pretrained`` model + processor) that
``JanusForConditionalGeneration.from_pretrained`` loads as-is; the next stage's
``model.init_from``. A complete Hugging Face model repo: sharded safetensors, the processor with
the run's chat template (``janus_train.model.chat_template``), a model card
(``janus_train.trainer.model_card``).

Weights come from the fp32 master copies (DeepSpeed's optimizer partitions for trainable
parameters, gathered under ZeRO-3; the module's own tensors for frozen ones) and are written in
``train.export_dtype``: by default the training dtype, so a bf16 run exports bf16 like DeepSeek's
released checkpoints (half the bytes; the next stage, which reads ``model.init_from`` in its
training dtype, would round fp32 weights to bf16 anyway, and now maps the files without a
private cast copy). The frozen VQ stays fp32 whatever the dtype (its codes are the generation
targets: ``janus_train.model.vq_codes``; 72M parameters, +144 MB on Janus-Pro). The directory is
written to ``<out>.tmp`` and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from janus_train.model.lora import export_lora
from janus_train.model.vq_codes import VQ_PATH, vq_state_dict
from janus_train.trainer.distributed import DistInfo, barrier

COMPLETE = "export_complete"
EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
"""``train.export_dtype`` values besides ``auto``."""


def export_dtype(choice: str, janus: torch.nn.Module) -> torch.dtype:
    """``train.export_dtype`` -> the dtype of the exported weights; ``auto``: the dtype the
    model trained in (its parameters' in the engine: bf16 under ``deepspeed.precision=bf16``
    where the device has it, fp32 otherwise)."""
    if choice == "auto":
        return next(p.dtype for p in janus.parameters() if p.is_floating_point())
    if choice not in EXPORT_DTYPES:
        raise ValueError(f"train.export_dtype={choice!r}: auto | {' | '.join(EXPORT_DTYPES)}")
    return EXPORT_DTYPES[choice]


def _cast(sd: dict, dtype: torch.dtype) -> dict:
    """Floating tensors to ``dtype``, except the VQ's (fp32: its codes are the targets)."""
    vq = f"{VQ_PATH}."
    return {
        k: v.to(dtype) if v.is_floating_point() and not k.startswith(vq) else v
        for k, v in sd.items()
    }


def _write_config_dtype(config_json: Path, dtype: torch.dtype) -> None:
    """``save_pretrained`` records the module's dtype, not the files': record ``dtype`` (the
    VQ's sub-config: float32), which ``from_pretrained(dtype="auto")`` loads in."""
    name = str(dtype).removeprefix("torch.")
    cfg = json.loads(config_json.read_text())
    cfg["dtype"] = name
    for key, sub in cfg.items():
        if isinstance(sub, dict) and "dtype" in sub:
            sub["dtype"] = "float32" if key == "vq_config" else name
    config_json.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


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
    model_card: str | Callable[[torch.dtype], str] | None = None,
    dtype: str = "auto",
) -> Path:
    """Collective: write ``out_dir`` atomically: model safetensors in ``dtype``
    (``train.export_dtype``: :func:`export_dtype`; the VQ in fp32), in shards of at most
    ``max_shard_size`` plus ``model.safetensors.index.json`` so large models load shard by
    shard; config (its ``dtype`` that of the files), generation config, processor with its chat
    template, ``model_card`` as ``README.md`` (a callable: called on rank 0 only, with the
    weights' dtype); the marker
    file records ``step``. Returns the path."""
    out = Path(out_dir)
    dt = export_dtype(dtype, janus)
    sd = consolidated_state_dict(janus, zero_stage, info)
    if info.is_main:
        # LoRA: merged from the consolidated fp32 weights into hf/; unmerged to adapter/
        sd = _cast(export_lora(janus, sd, out.with_name("adapter")), dt)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        janus.save_pretrained(
            str(tmp), state_dict=sd, safe_serialization=True, max_shard_size=max_shard_size
        )
        _write_config_dtype(tmp / "config.json", dt)
        processor.save_pretrained(str(tmp))
        if callable(model_card):
            model_card = model_card(dt)
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
