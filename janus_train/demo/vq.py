"""Fit the tiny model's VQ tokenizer on the demo images, then save the whole tiny model as the
HF-format directory stage 1 starts from (``model.init_from``); the VQ stays frozen afterwards.

The fitted module is HF's own ``JanusVQVAE`` (encoder, ``quant_conv``, codebook,
``post_quant_conv``, decoder). Its inference path ``decode`` looks codes up in the *L2-normalised*
codebook (LlamaGen VQ-16), and ``encode`` picks the nearest raw codebook vector; training here
therefore quantises L2-normalised latents against the normalised codebook (cosine nearest
neighbour) and stores the codebook normalised, so ``encode`` and ``decode`` agree with what was
trained. Loss: pixel MSE + codebook + beta * commitment (straight-through gradients); unused codes
are restarted on random latents so the small codebook is fully used.

    python -m janus_train.demo.vq --data DIR --out DIR [--steps N]
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

logger = logging.getLogger(__name__)


@dataclass
class VQFitConfig:
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    beta: float = 0.25
    restart_every: int = 50
    """Restart codes unused over this many steps on random latents of the current batch."""
    seed: int = 0


def images_to_tensor(images: list[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> (N, 3, size, size) float in [-1, 1] (already square: plain resize)."""
    arr = np.stack(
        [np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC)) for im in images]
    )
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] -> PIL images (clamped)."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1)
    return [Image.fromarray(a.numpy()) for a in arr]


def _latents(vq, x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, h, w, C) L2-normalised pre-quantisation latents."""
    h = vq.quant_conv(vq.encoder(x))
    return F.normalize(h.permute(0, 2, 3, 1), dim=-1)


@torch.no_grad()
def reconstruct(vq, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """HF's inference path: ``encode`` -> codes -> ``decode``."""
    outs = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size]
        codes = vq.encode(xb).image_tokens.view(xb.shape[0], -1)
        outs.append(vq.decode(codes))
    return torch.cat(outs)


def reconstruction_mse(vq, x: torch.Tensor) -> float:
    """Mean squared error in [-1, 1] pixel units of HF ``encode`` + ``decode``."""
    return float(F.mse_loss(reconstruct(vq, x), x))


def fit_vq(vq, images: torch.Tensor, cfg: VQFitConfig) -> dict[str, float]:
    """Train `vq` (a ``JanusVQVAE``) in place on `images` (N, 3, H, W) in [-1, 1]."""
    gen = torch.Generator().manual_seed(cfg.seed)
    codebook = vq.quantize.embedding.weight
    n_codes = codebook.shape[0]
    with torch.no_grad():
        # init the codebook on real latents: avoids codes that are never nearest from step 0
        idx = torch.randperm(images.shape[0], generator=gen)[: max(n_codes, cfg.batch_size)]
        z = _latents(vq, images[idx]).reshape(-1, codebook.shape[1])
        codebook.copy_(z[torch.randperm(z.shape[0], generator=gen)[:n_codes]])
    vq.train()
    opt = torch.optim.Adam(vq.parameters(), lr=cfg.lr)
    usage = torch.zeros(n_codes)
    t0 = time.time()
    rec_loss = torch.tensor(float("nan"))  # steps=0: codebook initialised on latents only
    for step in range(cfg.steps):
        idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=gen)
        x = images[idx]
        z = _latents(vq, x)
        e = F.normalize(codebook, dim=-1)
        codes = (z.reshape(-1, z.shape[-1]) @ e.t()).argmax(-1)
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
        usage += torch.bincount(codes, minlength=n_codes).float()
        if (step + 1) % cfg.restart_every == 0 and step + 1 < cfg.steps * 0.8:
            dead = (usage == 0).nonzero().flatten()
            if len(dead):
                with torch.no_grad():
                    flat = z.detach().reshape(-1, z.shape[-1])
                    pick = torch.randint(0, flat.shape[0], (len(dead),), generator=gen)
                    codebook[dead] = flat[pick]
            usage.zero_()
        if step % 100 == 0 or step == cfg.steps - 1:
            logger.info("vq step %d rec %.4f vq %.4f", step, rec_loss.item(), vq_loss.item())
    with torch.no_grad():
        codebook.copy_(F.normalize(codebook, dim=-1))
    vq.eval()
    for p in vq.parameters():
        p.requires_grad_(False)
    return {"train_rec_mse": float(rec_loss.detach()), "seconds": time.time() - t0}


def load_images(data_dir: str | Path, sources=("caption", "imagenet"), per_source: int = 2000):
    """Decode the PNGs of the train split's image sources (the VQ never sees held-out images)."""
    from janus_train.demo.synth import iter_samples

    images = []
    for source in sources:
        for i, s in enumerate(iter_samples(Path(data_dir) / "train" / source)):
            if i >= per_source:
                break
            images.append(Image.open(io.BytesIO(s["png"])).convert("RGB"))
    return images


def build_tiny(tokenizer_dir: str | Path, overrides: list[str] | None = None):
    """The tiny model (random init, ``conf/model/tiny.yaml``), tokenizer from `tokenizer_dir`."""
    from janus_train.config import compose, to_run_config
    from janus_train.model import build_model

    run = to_run_config(
        compose(["experiment=tiny", f"model.tokenizer={tokenizer_dir}"] + (overrides or []))
    )
    return build_model(run.model)


def prepare_init(data_dir: str | Path, out_dir: str | Path, cfg: VQFitConfig) -> dict:
    """Tokenizer on ``corpus.txt`` -> tiny model -> fitted VQ -> ``save_pretrained(out_dir)``."""
    from janus_train.model import train_tiny_tokenizer

    out = Path(out_dir)
    tok_dir = out.parent / (out.name + "_tokenizer")
    corpus = (Path(data_dir) / "corpus.txt").read_text().splitlines()
    size = json.loads((Path(data_dir) / "world.json").read_text())["config"]["image_size"]
    train_tiny_tokenizer(tok_dir, corpus=corpus, image_size=size, num_image_tokens=(size // 8) ** 2)
    model, processor = build_tiny(tok_dir)
    vq = model.model.vqmodel
    x = images_to_tensor(load_images(data_dir), size)
    before = reconstruction_mse(vq, x[:512])
    stats = fit_vq(vq, x, cfg)
    after = reconstruction_mse(vq, x[:512])
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n_used = len(torch.unique(vq.encode(x[:1024]).image_tokens))
    result = {
        "mse_random": before,
        "mse_fitted": after,
        "codes_used": n_used,
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
    torch.manual_seed(args["seed"])
    res = prepare_init(data, out, VQFitConfig(**args))
    print(json.dumps({k: v for k, v in res.items() if k != "fit"}))


if __name__ == "__main__":
    main()
