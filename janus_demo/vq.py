"""Fit the tiny model's VQ tokenizer on the demo images, then save the whole tiny model as the
HF-format directory stage 1 starts from (``model.init_from``); the VQ stays frozen afterwards.

The fitted module is HF's own ``JanusVQVAE`` (encoder, ``quant_conv``, codebook,
``post_quant_conv``, decoder). Codes are assigned as DeepSeek's quantizer does and as the whole
project does (``janus_train.model.vq_codes``: L2-normalised latents against the L2-normalised
codebook, cosine nearest neighbour), and ``decode`` looks codes up in the normalised codebook;
training here quantises the same way. The codebook is stored normalised, so HF's own ``encode``
(nearest raw codebook vector) also returns these codes. Loss: pixel MSE + codebook + beta * commitment (straight-through gradients); unused codes
are restarted on random latents so the small codebook is fully used.

Local codes (the default, ``local_codes``). The demo world is made of independent cells (its
quadrants): the same object is drawn with the same pixels in every cell. For the codes to be a
language the transformer can learn compositionally, a token's code should depend on its own 8x8
pixel block only, not on the rest of the image. HF's encoder has global self-attention and
GroupNorm statistics, so the plain fit above gives context-dependent codes. The local fit instead
fixes every token's code beforehand from its pixel block (``patch_codes``), trains the encoder to
predict it (cross-entropy over the cosine similarities to the codebook, so the cosine assignment
returns it) and the decoder to reconstruct the image from those codes; the encoder's
attention output projections are set to zero and kept there (each block is then the identity;
the module structure is unchanged). ``prepare_init`` reports the fraction of tokens whose code
survives shuffling the cells across images and positions (``code_consistency``) next to the
reconstruction error.

    python -m janus_demo.vq --data DIR --out DIR [--steps N]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from janus_train.data.preprocess import normalize_batch, to_uint8
from janus_train.model.vq_codes import normalized_latents, vq_codes

logger = logging.getLogger(__name__)


@dataclass
class VQFitConfig:
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    beta: float = 0.25
    restart_every: int = 50
    """Restart codes unused over this many steps on random latents of the current batch."""
    local_codes: bool = True
    """Codes fixed by each token's pixel block (``patch_codes``), else a plain VQ-VAE fit."""
    temperature: float = 0.1
    """Softmax temperature of the encoder's code prediction (``local_codes``)."""
    cell_size: int = 0
    """Pixels per cell of ``code_consistency`` (0: half the image, the world's quadrants)."""
    seed: int = 0


def images_to_tensor(images: list[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> (N, 3, size, size) float in [-1, 1] (already square: plain resize)."""
    return normalize_batch(
        [np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC)) for im in images]
    )


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] -> PIL images (clamped)."""
    return [Image.fromarray(a.numpy()) for a in to_uint8(x.detach()).permute(0, 2, 3, 1)]


@torch.no_grad()
def reconstruct(vq, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The project's path: ``vq_codes`` (cosine assignment) -> codes -> HF ``decode``."""
    outs = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size]
        codes = vq_codes(vq, xb)
        outs.append(vq.decode(codes))
    return torch.cat(outs)


def reconstruction_mse(vq, x: torch.Tensor) -> float:
    """Mean squared error in [-1, 1] pixel units of ``vq_codes`` + HF ``decode``."""
    return float(F.mse_loss(reconstruct(vq, x), x))


def _cells(x: torch.Tensor, cell: int) -> torch.Tensor:
    """(N, C, H, W) -> (N * H/cell * W/cell, C, cell, cell), cells in raster order per image."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // cell, cell, w // cell, cell).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, c, cell, cell)


def _uncells(cells: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``_cells``."""
    c, cell = cells.shape[1], cells.shape[-1]
    x = cells.reshape(n, h // cell, w // cell, c, cell, cell).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, c, h, w)


def shuffle_cells(x: torch.Tensor, cell: int, gen: torch.Generator):
    """Reassemble the batch's cells, shuffled across images and positions, into new images.
    Returns ``(x2, perm)``: cell ``i`` of ``x2`` (in ``_cells`` order) is cell ``perm[i]`` of x."""
    cells = _cells(x, cell)
    perm = torch.randperm(cells.shape[0], generator=gen)
    return _uncells(cells[perm], *x.shape[:1], *x.shape[2:]), perm


def _token_cells(z: torch.Tensor, tokens_per_cell: int) -> torch.Tensor:
    """(N, h, w, C) latents -> cells of tokens, matching ``_cells`` of the pixels."""
    return _cells(z.permute(0, 3, 1, 2), tokens_per_cell)


def _zero_encoder_attention(vq) -> None:
    """Make every encoder self-attention block the identity (``x + proj_out(...)`` with a zero
    ``proj_out``) and keep it so: tokens then see a bounded neighbourhood only."""
    for mod in vq.encoder.modules():
        if type(mod).__name__ == "JanusVQVAEAttnBlock":
            with torch.no_grad():
                mod.proj_out.weight.zero_()
                mod.proj_out.bias.zero_()
            for p in mod.parameters():
                p.requires_grad_(False)


@torch.no_grad()
def code_consistency(vq, x: torch.Tensor, cell: int, seed: int = 1) -> float:
    """Fraction of tokens whose code (``vq_codes``) is the same after the cells are shuffled into
    other images and positions (1.0: codes depend on the cell's content only)."""
    gen = torch.Generator().manual_seed(seed)
    x2, perm = shuffle_cells(x, cell, gen)
    tpc = cell // (x.shape[-1] // vq.quantize.quant_state_dims[0])
    c1 = vq_codes(vq, x).view(x.shape[0], *vq.quantize.quant_state_dims)
    c2 = vq_codes(vq, x2).view_as(c1)
    a = _token_cells(c1.unsqueeze(-1), tpc)[perm]
    b = _token_cells(c2.unsqueeze(-1), tpc)
    return float((a == b).float().mean())


def patch_codes(images: torch.Tensor, patch: int, k: int) -> torch.Tensor:
    """Target code of every token: the raw ``patch`` x ``patch`` pixel blocks clustered into `k`
    codes. Exact when the images hold at most `k` distinct blocks (the demo world: 15 objects x 4
    quarter blocks + black = 61), else k-means (Lloyd, 20 iterations) on the distinct blocks
    weighted by their counts. Returns (N, H/patch, W/patch) long."""
    n, c, h, w = images.shape
    blocks = _cells(images, patch).reshape(n * (h // patch) * (w // patch), -1)
    uniq, inverse, counts = torch.unique(blocks, dim=0, return_inverse=True, return_counts=True)
    if len(uniq) <= k:
        order = torch.argsort(counts, descending=True)  # code 0 = the most frequent block
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order))
        codes = rank[inverse]
    else:
        cent = uniq[torch.argsort(counts, descending=True)[:k]].clone()
        wts = counts.float()
        for _ in range(20):
            assign = torch.cdist(uniq, cent).argmin(1)
            for j in range(k):
                m = assign == j
                if m.any():
                    cent[j] = (uniq[m] * wts[m, None]).sum(0) / wts[m].sum()
        codes = torch.cdist(uniq, cent).argmin(1)[inverse]
    return codes.view(n, h // patch, w // patch)


def _restart_dead_codes(codebook, usage, codes, z, step: int, cfg: VQFitConfig, gen) -> None:
    """Plain fit: count code use; every ``restart_every`` steps (until 80% of the fit) move the
    codes no latent picked onto random latents of the current batch."""
    usage += torch.bincount(codes, minlength=codebook.shape[0]).float()
    if (step + 1) % cfg.restart_every or step + 1 >= cfg.steps * 0.8:
        return
    dead = (usage == 0).nonzero().flatten()
    if len(dead):
        with torch.no_grad():
            flat = z.detach().reshape(-1, z.shape[-1])
            pick = torch.randint(0, flat.shape[0], (len(dead),), generator=gen)
            codebook[dead] = flat[pick]
    usage.zero_()


def fit_vq(vq, images: torch.Tensor, cfg: VQFitConfig) -> dict[str, float]:
    """``_fit_vq`` with denormal floats flushed to zero on CPU: the local-code fit's tiny
    activations and gradients otherwise run x86 arithmetic on its slow path (several times
    slower per step, same results to float precision)."""
    torch.set_flush_denormal(True)
    try:
        return _fit_vq(vq, images, cfg)
    finally:
        torch.set_flush_denormal(False)  # torch's default (it has no getter to restore from)


def _fit_vq(vq, images: torch.Tensor, cfg: VQFitConfig) -> dict[str, float]:
    """Train `vq` (a ``JanusVQVAE``) in place on `images` (N, 3, H, W) in [-1, 1].

    ``cfg.local_codes``: each token's code is fixed beforehand by its pixel block
    (``patch_codes``); the encoder learns to predict it (cross-entropy over the cosine
    similarities to the codebook, so the cosine assignment ``vq_codes`` returns it) and the
    decoder to
    reconstruct the image from those codes. Otherwise: a plain VQ-VAE fit (nearest code,
    straight-through, commitment loss, dead-code restarts), whose codes depend on context."""
    gen = torch.Generator().manual_seed(cfg.seed)
    codebook = vq.quantize.embedding.weight
    n_codes = codebook.shape[0]
    patch = images.shape[-1] // vq.quantize.quant_state_dims[0]
    targets = patch_codes(images, patch, n_codes) if cfg.local_codes else None
    with torch.no_grad():
        # init the codebook on real latents: avoids codes that are never nearest from step 0
        idx = torch.randperm(images.shape[0], generator=gen)[: max(n_codes, cfg.batch_size)]
        z = normalized_latents(vq, images[idx]).reshape(-1, codebook.shape[1])
        codebook.copy_(z[torch.randperm(z.shape[0], generator=gen)[:n_codes]])
    if cfg.local_codes:
        _zero_encoder_attention(vq)
    vq.train()
    opt = torch.optim.Adam([p for p in vq.parameters() if p.requires_grad], lr=cfg.lr)
    usage = torch.zeros(n_codes)
    t0 = time.time()
    rec_loss = torch.tensor(float("nan"))  # steps=0: codebook initialised on latents only
    for step in range(cfg.steps):
        idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=gen)
        x = images[idx]
        z = normalized_latents(vq, x)
        e = F.normalize(codebook, dim=-1)
        logits = z.reshape(-1, z.shape[-1]) @ e.t()
        if targets is not None:
            codes = targets[idx].reshape(-1)
            # the encoder predicts the block's code; the decoder reconstructs from those codes
            vq_loss = F.cross_entropy(logits / cfg.temperature, codes)
            zq_st = e[codes].view_as(z).permute(0, 3, 1, 2)
        else:
            codes = logits.argmax(-1)
            zq = e[codes].view_as(z)
            vq_loss = F.mse_loss(zq, z.detach()) + cfg.beta * F.mse_loss(z, zq.detach())
            zq_st = (z + (zq - z).detach()).permute(0, 3, 1, 2)
        rec = vq.decoder(vq.post_quant_conv(zq_st))
        rec_loss = F.mse_loss(rec, x)
        loss = rec_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for g in opt.param_groups:
            g["lr"] = cfg.lr * 0.5 * (1 + np.cos(np.pi * (step + 1) / cfg.steps))
        if targets is None:  # plain fit: restart codes no latent picked lately
            _restart_dead_codes(codebook, usage, codes, z, step, cfg, gen)
        if step % 100 == 0 or step == cfg.steps - 1:
            logger.info("vq step %d rec %.4f vq %.4f", step, rec_loss.item(), vq_loss.item())
    with torch.no_grad():
        # stored normalised: HF's encode (raw nearest vector) then agrees with vq_codes too
        codebook.copy_(F.normalize(codebook, dim=-1))
    vq.eval()
    for p in vq.parameters():
        p.requires_grad_(False)
    out = {"train_rec_mse": float(rec_loss.detach()), "seconds": time.time() - t0}
    if targets is not None:
        n = min(1024, len(images))
        got = vq_codes(vq, images[:n])
        out["code_agreement"] = float((got == targets[:n].reshape(n, -1)).float().mean())
        out["distinct_blocks"] = int(targets.max()) + 1
    return out


def load_images(data_dir: str | Path, sources=("caption", "imagenet"), per_source: int = 2000):
    """Decode the PNGs of the train split's image sources (the VQ never sees held-out images)."""
    from janus_demo.synth import iter_samples

    images = []
    for source in sources:
        for i, s in enumerate(iter_samples(Path(data_dir) / "train" / source)):
            if i >= per_source:
                break
            images.append(Image.open(io.BytesIO(s["png"])).convert("RGB"))
    return images


def recognized_reconstructions(vq, source_dir: Path, size: int, n: int = 256) -> float | None:
    """Fraction of a source's scenes (held-out captions) whose ``vq_codes`` -> ``decode``
    reconstruction ``recognize_scene`` reads exactly: the VQ's ceiling for scene accuracy."""
    from janus_demo.recognize import recognize_scene, scene_set
    from janus_demo.synth import iter_samples

    if not source_dir.is_dir():
        return None
    items = []
    for s in iter_samples(source_dir):
        if len(items) >= n:
            break
        scene = json.loads(s["json"])["scene"]
        items.append((Image.open(io.BytesIO(s["png"])).convert("RGB"), scene))
    rec = tensor_to_images(reconstruct(vq, images_to_tensor([im for im, _ in items], size)))
    return float(np.mean([recognize_scene(r) == scene_set(sc) for r, (_, sc) in zip(rec, items)]))


def build_tiny(tokenizer_dir: str | Path, overrides: list[str] | None = None):
    """The tiny model (random init, ``conf/model/tiny.yaml``), tokenizer from `tokenizer_dir`."""
    from janus_train.config import compose, to_run_config
    from janus_train.model import build_model

    run = to_run_config(
        compose(["experiment=tiny", f"model.tokenizer={tokenizer_dir}"] + (overrides or []))
    )
    return build_model(run.model)


def prepare_init(data_dir: str | Path, out_dir: str | Path, cfg: VQFitConfig) -> dict:
    """Tokenizer on ``corpus.txt`` -> tiny model -> fitted VQ -> ``save_pretrained(out_dir)``.

    The tiny model's random weights are drawn after ``torch.manual_seed(cfg.seed)``, so the
    init dir depends on ``cfg`` alone, not on what the calling process drew before."""
    from janus_train.model import train_tiny_tokenizer

    out = Path(out_dir)
    tok_dir = out.parent / (out.name + "_tokenizer")
    corpus = (Path(data_dir) / "corpus.txt").read_text().splitlines()
    size = json.loads((Path(data_dir) / "world.json").read_text())["config"]["image_size"]
    train_tiny_tokenizer(tok_dir, corpus=corpus, image_size=size, num_image_tokens=(size // 8) ** 2)
    torch.manual_seed(cfg.seed)
    model, processor = build_tiny(tok_dir)
    vq = model.model.vqmodel
    x = images_to_tensor(load_images(data_dir), size)
    before = reconstruction_mse(vq, x[:512])
    stats = fit_vq(vq, x, cfg)
    after = reconstruction_mse(vq, x[:512])
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n_used = len(torch.unique(vq_codes(vq, x[:1024])))
    recognized = recognized_reconstructions(vq, Path(data_dir) / "heldout" / "caption", size)
    result = {
        "mse_random": before,
        "mse_fitted": after,
        "codes_used": n_used,
        "code_consistency": code_consistency(vq, x[:1024], cfg.cell_size or size // 2),
        "recognized_reconstructions": recognized,
        **stats,
        "fit": asdict(cfg),
    }
    (out / "vq_fit.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    d = VQFitConfig()
    ap = argparse.ArgumentParser(description="fit the tiny VQ and save the stage-1 init dir")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    for name, val in asdict(d).items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(val), default=val)
    args = vars(ap.parse_args(argv))
    data, out = args.pop("data"), args.pop("out")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = prepare_init(data, out, VQFitConfig(**args))
    print(json.dumps({k: v for k, v in res.items() if k != "fit"}))


if __name__ == "__main__":
    main()
