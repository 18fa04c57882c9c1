"""Fused GPU kernels for the LLM inside HF's Janus model (``model.kernels``).

``liger``: Liger Kernel (Triton, CUDA only; the optional ``gpu`` extra) replaces the Llama
language model's RMSNorm, SwiGLU MLP and rotary embedding with fused kernels, through its own
``apply_liger_kernel_to_llama(model=<the LlamaModel>)``; its fused linear cross-entropy for the
heads is applied by ``janus_train.model.loss`` (not by Liger's ``forward`` patch: the Janus loss
is ours). What the patch replaces, in liger-kernel 0.8.5: the module-level
``modeling_llama.apply_rotary_pos_emb`` (called by name from ``LlamaAttention.forward``), and on
the instance the ``forward`` of ``norm``, of every layer's ``input_layernorm`` /
``post_attention_layernorm`` (reading ``weight``, ``variance_epsilon``) and of every layer's
``mlp`` (``gate_proj``, ``up_proj``, ``down_proj``, SiLU). tests/test_kernels.py checks that the
Janus language model still has exactly these, so a transformers rename fails CI, not a GPU run.
The vision tower (SigLIP) and the VQ are not Llama and stay as they are.
"""

from __future__ import annotations

import importlib.util
import logging

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


def apply_kernels(model, cfg: ModelConfig) -> None:
    """Patch ``model`` (a ``JanusForConditionalGeneration``) in place for ``cfg.kernels``."""
    check_kernels_available(cfg)
    if cfg.kernels != "liger":
        return
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,  # the heads' loss: janus_train.model.loss
        model=model.model.language_model,
    )
    logger.info("model.kernels=liger: fused RMSNorm, SwiGLU, RoPE in the LLM")


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
