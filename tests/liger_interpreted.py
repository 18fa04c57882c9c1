"""Real Liger Kernel on CPU through Triton's interpreter (run by tests/test_kernels.py in its own
process with ``TRITON_INTERPRET=1``, which must be set before Triton compiles anything).

Prints one JSON object: the largest differences between

- the heads' loss through ``HeadLoss(liger=True)`` (one fused linear-CE call per head: the text
  head per token, grouped by task; the image head summed) and plain full-logits
  ``F.cross_entropy`` written here, in losses and in the gradients of input, weight and bias
  under per-task upstream weights;
- a Llama attention layer whose RoPE is Liger's, bound by ``set_attention_rope``, and the same
  layer unpatched (outputs and input gradients);

and the installed signatures the tests' stand-ins must match. Liger's RMSNorm and SwiGLU
kernels do not run in the interpreter; tests/test_kernels.py covers them with its stand-in.
"""

from __future__ import annotations

import inspect
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

IGN = -100


def _sig(fn) -> list:
    return [[p.name, repr(p.default)] for p in inspect.signature(fn).parameters.values()]


def head_loss_case(kind: str) -> dict:
    from janus_train.model.loss import HeadLoss

    g = torch.Generator().manual_seed(1)
    n, d, vocab = 37, 16, (257 if kind == "text" else 96)
    head = nn.Linear(d, vocab, bias=kind == "image")
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, d, generator=g) * 0.3)
        if head.bias is not None:
            head.bias.copy_(torch.randn(vocab, generator=g))
    x = torch.randn(n, d, generator=g, requires_grad=True)
    target = torch.randint(0, vocab, (n,), generator=g)
    target[[2, 11, 30]] = IGN
    k = 3 if kind == "text" else 1
    group = torch.randint(0, k, (n,), generator=g)
    upstream = torch.tensor([0.7, 1.3, 0.2])[:k]
    params = [x, *head.parameters()]

    got = HeadLoss(liger=True).group_sums(x, head, target, group, k)
    got_g = torch.autograd.grad((got * upstream).sum(), params)
    logits = x @ head.weight.t() + (head.bias if head.bias is not None else 0)
    ref = torch.stack(
        [
            F.cross_entropy(logits[(group == j) & (target != IGN)], target[
                (group == j) & (target != IGN)], reduction="sum")
            for j in range(k)
        ]
    )  # fmt: skip
    ref_g = torch.autograd.grad((ref * upstream).sum(), params)
    return {
        "loss": (got - ref).abs().max().item(),
        "loss_scale": ref.abs().max().item(),
        "grad": max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got_g, ref_g)),
    }


def rope_case() -> dict:
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaModel

    from janus_train.model.kernels import set_attention_rope

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    ref, lm = LlamaModel(cfg), LlamaModel(cfg)
    lm.load_state_dict(ref.state_dict())
    calls = []

    def counted(*a, **k):  # Liger's kernel really runs in the patched layer
        calls.append(a[0].shape)
        return liger_rotary_pos_emb(*a, **k)

    set_attention_rope(lm, counted)
    x = torch.randn(2, 9, 32)
    outs, grads, n_calls = [], [], []
    for m in (ref, lm):
        n_calls.append(len(calls))
        xi = x.clone().requires_grad_()
        out = m(inputs_embeds=xi, use_cache=False).last_hidden_state
        (gx,) = torch.autograd.grad((out * torch.linspace(-1, 1, 32)).sum(), xi)
        outs.append(out.detach())
        grads.append(gx)
    return {
        "out": (outs[0] - outs[1]).abs().max().item(),
        "grad": (grads[0] - grads[1]).abs().max().item(),
        "liger_calls": [n_calls[1] - n_calls[0], len(calls) - n_calls[1]],  # ref, patched
        "ref_has_own_forward": "forward" in ref.layers[0].self_attn.__dict__,
    }


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    from liger_kernel.transformers import (
        LigerFusedLinearCrossEntropyLoss,
        apply_liger_kernel_to_llama,
    )

    print(
        json.dumps(
            {
                "text": head_loss_case("text"),
                "image": head_loss_case("image"),
                "rope": rope_case(),
                "signatures": {
                    "apply_liger_kernel_to_llama": _sig(apply_liger_kernel_to_llama),
                    "loss_init": _sig(LigerFusedLinearCrossEntropyLoss.__init__),
                    "loss_forward": _sig(LigerFusedLinearCrossEntropyLoss.forward),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
