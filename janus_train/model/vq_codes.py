"""VQ code assignment as DeepSeek's tokenizer does it, on HF's ``JanusVQVAE`` modules.

DeepSeek's quantizer (``janus/models/vq_model.py`` ``VectorQuantizer`` with
``codebook_l2_norm=True``) L2-normalises the encoder's latents and the codebook and takes the
nearest code, i.e. the largest cosine similarity; its decoder reads the normalised codebook. HF's
``JanusVQVAEVectorQuantizer.forward`` (behind ``JanusVQVAE.encode``) compares *unnormalised*
latents and codebook rows by squared distance, which picks the same code only when every
codebook row has the same norm; HF's decode path (``get_codebook_entry``) does normalise. Every
place this project assigns codes (the in-step encode, ``janus-data vq-encode``, the demo's VQ fit
and evaluation) calls :func:`vq_codes`; transformers is not patched.

    pixels (N, 3, H, W) in [-1, 1] --encoder--> --quant_conv--> latents (N, C, h, w)
        --L2 normalise--> . normalised codebook (K, C) --argmax over K--> codes (N, h*w)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


@torch.no_grad()
def vq_codes(vq, pixel_values: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, h*w) long codes, DeepSeek's assignment (module doc)."""
    dtype = vq.quant_conv.weight.dtype
    z = normalized_latents(vq, pixel_values.to(dtype))
    return nearest_codes(z, normalized_codebook(vq)).reshape(pixel_values.shape[0], -1)
