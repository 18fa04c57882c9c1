"""Fused GPU kernels for the LLM inside HF's Janus model (``model.kernels``).

``liger``: Liger Kernel (Triton, CUDA only; the optional ``gpu`` extra) replaces the Llama
language model's RMSNorm, SwiGLU MLP and rotary embedding with fused kernels, through its own
``apply_liger_kernel_to_llama(model=<the LlamaModel>)``; its fused linear cross-entropy for the
heads is applied by ``janus_train.model.loss`` (not by Liger's ``forward`` patch: the Janus loss
is ours). What the patch replaces, in liger-kernel 0.8.5: the module-level
``modeling_llama.apply_rotary_pos_emb`` (called by name from ``LlamaAttention.forward``;
swapped back here and bound to this model's attention layers only, :func:`apply_liger`), and on
the instance the ``forward`` of ``norm``, of every layer's ``input_layernorm`` /
``post_attention_layernorm`` (reading ``weight``, ``variance_epsilon``) and of every layer's
``mlp`` (``gate_proj``, ``up_proj``, ``down_proj``, SiLU). tests/test_kernels.py checks that the
Janus language model still has exactly these, so a transformers rename fails CI, not a GPU run.
The vision tower (SigLIP) and the VQ are not Llama and stay as they are.
"""

from __future__ import annotations

import importlib.util
import logging
import types

import torch

from janus_train.model.config import ModelConfig
from janus_train.model.loss import HeadLoss

logger = logging.getLogger(__name__)

KERNELS = ("none", "liger")


def check_kernels_config(cfg: ModelConfig) -> None:
    """Values only (any machine: also the planner's and dry runs' check)."""
    if cfg.kernels not in KERNELS:
        raise ValueError(f"model.kernels={cfg.kernels!r}: one of {', '.join(KERNELS)}")
    if cfg.loss_chunk_tokens < 0:
        raise ValueError(
            f"model.loss_chunk_tokens={cfg.loss_chunk_tokens}: must be >= 0 (0 = unchunked)"
        )


def check_kernels_available(cfg: ModelConfig, cuda: bool | None = None) -> None:
    """Refuse kernels this machine cannot run, before a model is built."""
    check_kernels_config(cfg)
    if cfg.kernels != "liger":
        return
    if not (torch.cuda.is_available() if cuda is None else cuda):
        raise ValueError(
            "model.kernels=liger needs CUDA (Liger's Triton kernels); use model.kernels=none "
            "(model.loss_chunk_tokens > 0 chunks the heads' cross-entropy on any device)"
        )
    if importlib.util.find_spec("liger_kernel") is None:
        raise ValueError(
            "model.kernels=liger needs liger-kernel, which is not installed: "
            "pip install 'janus-train[gpu]'"
        )


# What apply_liger_kernel_to_llama swaps process-wide in modeling_llama (liger-kernel 0.8.5)
_LIGER_MODULE_LEVEL = ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")
LIGER_FLAGS = dict(
    rope=True,
    rms_norm=True,
    swiglu=True,
    cross_entropy=False,
    fused_linear_cross_entropy=False,  # the heads' loss: janus_train.model.loss
)


def with_globals(fn, **overrides):
    """A copy of function ``fn`` whose global names ``overrides`` resolve differently (the
    original untouched); a ``functools.wraps`` wrapper is copied around the copied function."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        new = types.FunctionType(
            fn.__code__, {**fn.__globals__, **overrides}, fn.__name__, fn.__defaults__,
            fn.__closure__,
        )  # fmt: skip
        new.__kwdefaults__ = fn.__kwdefaults__
        new.__qualname__ = fn.__qualname__
        return new
    new_inner = with_globals(inner, **overrides)
    cells = fn.__closure__ or ()
    hits = [i for i, c in enumerate(cells) if c.cell_contents is inner]
    if len(hits) != 1:
        raise RuntimeError(f"cannot re-wrap {fn.__qualname__}: its wrapper does not close over it")
    cells = tuple(types.CellType(new_inner) if i == hits[0] else c for i, c in enumerate(cells))
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, cells)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    new.__wrapped__ = new_inner
    new.__qualname__ = fn.__qualname__
    return new


def set_attention_rope(lm, rope) -> None:
    """Every decoder layer's attention of ``lm`` (a ``LlamaModel``) calls ``rope`` instead of
    ``modeling_llama.apply_rotary_pos_emb``: its ``forward`` becomes a copy of the class's
    whose global name resolves to ``rope``, bound to that instance only."""
    for layer in lm.layers:
        attn = layer.self_attn
        fwd = with_globals(type(attn).forward, apply_rotary_pos_emb=rope)
        attn.forward = types.MethodType(fwd, attn)


def apply_liger(lm) -> None:
    """Liger's RMSNorm, SwiGLU and RoPE on ``lm`` (the Janus language model) and nothing else.
    ``apply_liger_kernel_to_llama(model=lm)`` patches the instance's norms and MLPs, but also
    swaps modeling_llama's classes and RoPE function for the whole process (a Llama built later,
    e.g. bench_gpu's reference, would get Liger too): those swaps are undone, and the RoPE it
    installed is bound to ``lm``'s attention layers instead."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from transformers.models.llama import modeling_llama

    saved = {n: getattr(modeling_llama, n) for n in _LIGER_MODULE_LEVEL}
    try:
        apply_liger_kernel_to_llama(**LIGER_FLAGS, model=lm)
        rope = modeling_llama.apply_rotary_pos_emb
    finally:
        for n, v in saved.items():
            setattr(modeling_llama, n, v)
    if rope is saved["apply_rotary_pos_emb"]:
        raise RuntimeError("liger-kernel did not replace modeling_llama.apply_rotary_pos_emb")
    set_attention_rope(lm, rope)


def apply_kernels(model, cfg: ModelConfig) -> None:
    """Patch ``model`` (a ``JanusForConditionalGeneration``) in place for ``cfg.kernels``."""
    check_kernels_available(cfg)
    if cfg.kernels != "liger":
        return
    apply_liger(model.model.language_model)
    logger.info("model.kernels=liger: fused RMSNorm, SwiGLU, RoPE in the LLM (this model only)")


def build_head_loss(cfg: ModelConfig, params_partitioned: bool = False) -> HeadLoss:
    """The heads' cross-entropy settings of ``cfg`` (``JanusTrainModel(head_loss=...)``)."""
    check_kernels_config(cfg)
    if cfg.kernels == "liger" and params_partitioned:
        logger.warning(
            "model.kernels=liger under ZeRO-3: the heads' cross-entropy runs %s, not Liger's "
            "fused kernel (it reads the partitioned head weights outside their modules)",
            f"in chunks of model.loss_chunk_tokens={cfg.loss_chunk_tokens}"
            if cfg.loss_chunk_tokens
            else "on all logits at once (set model.loss_chunk_tokens to chunk it)",
        )
    return HeadLoss(
        chunk_tokens=cfg.loss_chunk_tokens,
        liger=cfg.kernels == "liger",
        params_partitioned=params_partitioned,
    )
