"""VQ code assignment as DeepSeek's tokenizer does it, on HF's ``JanusVQVAE`` modules.

DeepSeek's quantizer (``janus/models/vq_model.py`` ``VectorQuantizer`` with
``codebook_l2_norm=True``) L2-normalises the encoder's latents and the codebook and takes the
nearest code, i.e. the largest cosine similarity; its decoder reads the normalised codebook. HF's
``JanusVQVAEVectorQuantizer.forward`` (behind ``JanusVQVAE.encode``) compares *unnormalised*
latents and codebook rows by squared distance, which picks the same code only when every
codebook row has the same norm; HF's decode path (``get_codebook_entry``) does normalise. Every
place this project assigns codes (the in-step encode, ``janus-data vq-encode``, the demo's VQ fit
and evaluation) calls :func:`vq_codes`; transformers is not patched.

The codes are generation targets, so they must not depend on the training precision: they are
computed in float32 whatever the VQ's dtype, from float32 weights. ``build_model`` reads the VQ
of a checkpoint in float32 in a bf16 run too, and the trainer holds the frozen VQ outside the
module DeepSpeed wraps (:func:`detach_vq`), which would otherwise cast it to bf16 (and, under
ZeRO-3, partition it).

    pixels (N, 3, H, W) in [-1, 1] --encoder--> --quant_conv--> latents (N, C, h, w)
        --L2 normalise--> . normalised codebook (K, C) --argmax over K--> codes (N, h*w)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VQ_PATH = "model.vqmodel"
"""Where the VQ sits in ``JanusForConditionalGeneration`` (state-dict prefix)."""


def normalized_latents(vq, pixel_values: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, h, w, C) L2-normalised pre-quantisation latents (differentiable)."""
    h = vq.quant_conv(vq.encoder(pixel_values))
    return F.normalize(h.permute(0, 2, 3, 1), dim=-1)


def normalized_codebook(vq) -> torch.Tensor:
    """(K, C) L2-normalised codebook, read by *calling* the quantizer's ``nn.Embedding`` (as HF's
    ``get_codebook_entry`` does): under ZeRO-3 the call gathers the partitioned weight, which a
    plain ``.weight`` read outside a forward would see as an empty shard."""
    emb = vq.quantize.embedding
    idx = torch.arange(emb.num_embeddings, device=emb.weight.device)
    return F.normalize(emb(idx), dim=-1)


def nearest_codes(latents: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Cosine argmax: (..., C) normalised latents x (K, C) normalised codebook -> (...) long.
    Computed in float32 so a bf16 VQ does not turn near ties into different codes."""
    sim = latents.float().reshape(-1, latents.shape[-1]) @ codebook.float().t()
    return sim.argmax(-1).view(latents.shape[:-1])


def _codes_fp32(vq, pixel_values: torch.Tensor) -> torch.Tensor:
    z = normalized_latents(vq, pixel_values.float())
    return nearest_codes(z, normalized_codebook(vq)).reshape(pixel_values.shape[0], -1)


class _Codes(nn.Module):
    """``vq`` as a module whose forward assigns codes (for ``torch.func.functional_call``)."""

    def __init__(self, vq):
        super().__init__()
        self.vq = vq

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _codes_fp32(self.vq, pixel_values)


@torch.no_grad()
def vq_codes(vq, pixel_values: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, h*w) long codes, DeepSeek's assignment (module doc),
    computed in float32: a VQ held in another dtype runs on float32 copies of its tensors (the
    trainer's is float32 already: no copy)."""
    state = {**dict(vq.named_parameters()), **dict(vq.named_buffers())}
    if all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point()):
        return _codes_fp32(vq, pixel_values)
    up = {f"vq.{k}": t.float() if t.is_floating_point() else t for k, t in state.items()}
    return torch.func.functional_call(_Codes(vq), up, (pixel_values,))


def detach_vq(janus: nn.Module) -> nn.Module:
    """Hold the frozen VQ of ``janus`` outside its module tree, in float32; returns it.

    Afterwards ``parameters()``, ``state_dict()``, ``.to()``, ``.train()`` of ``janus`` (and of
    any module wrapping it: the DeepSpeed engine) no longer see the VQ, so DeepSpeed neither
    casts it to bf16 nor partitions it (ZeRO-3); ``janus.model.vqmodel`` still reads it, so HF's
    image decode and every caller of :func:`vq_codes` work unchanged. :func:`vq_state_dict`
    gives its tensors for an export. The caller moves it to the training device. Idempotent."""
    parent = janus.get_submodule(VQ_PATH.rpartition(".")[0])
    name = VQ_PATH.rpartition(".")[2]
    vq = getattr(parent, name)
    if name in dict(parent.named_children()):
        delattr(parent, name)
        object.__setattr__(parent, name, vq)  # a plain attribute, not a registered child
    for p in vq.parameters():
        p.requires_grad_(False)
    return vq.float().eval()


def vq_state_dict(janus: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a VQ held outside ``janus``'s tree (:func:`detach_vq`), keyed as
    ``janus.state_dict()`` would key them; empty when the VQ is a registered child."""
    if VQ_PATH in dict(janus.named_modules()):
        return {}
    vq = janus.get_submodule(VQ_PATH)  # get_submodule reads attributes: finds it detached too
    return {f"{VQ_PATH}.{k}": v for k, v in vq.state_dict().items()}
