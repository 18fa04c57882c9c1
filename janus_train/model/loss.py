"""Cross-entropy of the output heads (``lm_head``, the image head's last Linear) without holding
every supervised token's logits at once.

Unchunked (``chunk_tokens`` 0) is the plain computation: the head's module call in its own
dtype, ``.float()``, ``F.cross_entropy``; autograd keeps the (N, vocab) fp32 log-softmax for
backward. Chunked: the same three operations per chunk of ``chunk_tokens`` rows under
``torch.utils.checkpoint``, so a chunk's logits exist only while it is computed and are
recomputed in its backward: peak memory holds one (chunk, vocab) block, at the price of one more
head matmul. The head is called as a module (never through its ``weight``), so ZeRO-3's
parameter gathers and LoRA adapters on it keep working.

Liger Kernel's fused linear cross-entropy (``model.kernels=liger``, CUDA) computes logits,
loss and gradients chunk by chunk in Triton: one call per head and micro-step, every task's
tokens together (the text head per token, so that each task's step weight reaches its tokens'
gradients, at one more head matmul in backward; the image head summed, without recompute).
Liger's call itself reads its supervised-token count on the host (``.item()`` in 0.8.5's
``fused_linear_cross_entropy_forward``): one sync per head and micro-step that is Liger's. It reads ``weight`` and
``bias`` directly, so it is used only for a plain ``nn.Linear`` head whose parameters are not
partitioned (not ZeRO-3); elsewhere the chunked path above runs.

Every path returns per-group sums of the per-token CE, groups being the tasks (a text position's
task id; the image head's targets are all generation). Targets equal to ``IGNORE`` contribute 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from janus_train.batch import IGNORE


def _ce(head: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # fp32 logits for the loss, as the unchunked forward always computed it
    return F.cross_entropy(head(x).float(), target, reduction="none", ignore_index=IGNORE)


def _chunks_ce(forward, x: torch.Tensor, target: torch.Tensor, chunk: int) -> torch.Tensor:
    needs_grad = torch.is_grad_enabled()
    out = []
    for s in range(0, x.shape[0], chunk):
        xc, tc = x[s : s + chunk], target[s : s + chunk]
        if needs_grad:  # nothing of the chunk kept: its logits are recomputed in backward
            out.append(checkpoint(_ce, forward, xc, tc, use_reentrant=False))
        else:
            out.append(_ce(forward, xc, tc))
    return torch.cat(out)


def chunked_linear_ce(
    x: torch.Tensor, head: nn.Module, target: torch.Tensor, chunk_tokens: int = 0
) -> torch.Tensor:
    """Per-token CE (N,) float32 of ``head(x)`` against ``target``.

    ``x``: (N, d) head input; ``target``: (N,) long, ``IGNORE`` = no loss (0) and no gradient.
    ``chunk_tokens`` > 0 and < N: computed in chunks, each recomputed in backward, all inside
    ONE call of ``head`` (its forward temporarily the chunk loop): module hooks fire once per
    head and micro-step whatever the number of chunks, so ZeRO-3 gathers the weights for the
    whole loop (and for the recompute in the head's backward) and records the same module
    trace on every rank (ranks hold different numbers of supervised tokens)."""
    n = x.shape[0]
    if chunk_tokens <= 0 or n <= chunk_tokens:
        return _ce(head, x, target)
    own = head.__dict__.get("forward")  # an instance-level forward (patched) to restore
    forward = head.forward
    head.forward = lambda x_, t_: _chunks_ce(forward, x_, t_, chunk_tokens)
    try:
        return head(x, target)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def liger_linear_ce(
    x: torch.Tensor, head: nn.Linear, target: torch.Tensor, reduction: str
) -> torch.Tensor:
    """CE of ``head(x)`` by Liger's fused linear cross-entropy (CUDA; Triton's interpreter on
    CPU in the tests): logits in the head's dtype, the softmax in fp32, weight/bias gradients
    accumulated in fp32. ``reduction`` ``sum`` -> () (the gradients computed in the forward);
    ``none`` -> (N,) per token (Liger recomputes the logits in backward to fold in each token's
    upstream gradient)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    fn = LigerFusedLinearCrossEntropyLoss(
        ignore_index=IGNORE, reduction=reduction, accum_dtype=torch.float32
    )
    return fn(head.weight, x.contiguous(), target, head.bias).float()


@dataclass(frozen=True)
class HeadLoss:
    """How the heads' cross-entropy is computed (``model.loss_chunk_tokens``, ``model.kernels``)."""

    chunk_tokens: int = 0
    """> 0: chunks of this many tokens, recomputed in backward (:func:`chunked_linear_ce`)."""
    liger: bool = False
    """Liger's fused linear cross-entropy where it applies (module docstring)."""
    params_partitioned: bool = False
    """ZeRO-3: head weights are only whole inside the module's forward (no Liger)."""

    def uses_liger(self, head: nn.Module) -> bool:
        return self.liger and not self.params_partitioned and type(head) is nn.Linear

    def group_sums(
        self,
        x: torch.Tensor,
        head: nn.Module,
        target: torch.Tensor,
        group: torch.Tensor,
        num_groups: int,
    ) -> torch.Tensor:
        """Summed CE per group, (num_groups,) float32. ``x``: (N, d); ``target``, ``group``:
        (N,) long, ``group`` in [0, num_groups)."""
        if self.uses_liger(head):
            # one fused call for every task's tokens; per-task sums stay on the device
            if num_groups == 1:  # the image head: all generation, no per-token weights
                return liger_linear_ce(x, head, target, "sum").view(1)
            ce = liger_linear_ce(x, head, target, "none")
            return ce.new_zeros(num_groups).index_add(0, group, ce)
        chunk = self.chunk_tokens
        if self.params_partitioned and next(head.children(), None) is not None:
            chunk = 0  # e.g. LoRA: its sub-modules would run once per chunk, not once per rank
        ce = chunked_linear_ce(x, head, target, chunk)
        if num_groups == 1:  # the image head: a plain sum, as F.cross_entropy(reduction="sum")
            return ce.sum().view(1)
        return ce.new_zeros(num_groups).index_add(0, group, ce)
