"""Image decoding and the Janus preprocessing (spec §3) as pure functions.

Decoding never unpickles: images go through PIL, captions through utf-8, metadata through json,
codes through ``numpy.load(allow_pickle=False)``. Any other member is ignored.

- understanding: long side -> ``size`` (bicubic), pad to a centred square with (127,127,127),
  then ``(x / 255 - mean) / std`` with the processor's mean/std.
- generation: short side -> ``size`` (bicubic), centre crop to ``size``, then ``x / 127.5 - 1``.
- both normalisations are ``normalize_pixels_`` (one arithmetic, so the same bits everywhere);
  ``to_uint8`` maps decoded [-1, 1] images back.
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
PAD_RGB = (127, 127, 127)


class BadSample(Exception):
    """A sample that must be skipped; ``reason`` becomes the counter name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> RGB PIL image with EXIF orientation applied; palette/RGBA/LA/L/CMYK/I;16 -> RGB
    (transparency composited on white)."""
    try:
        img = Image.open(io.BytesIO(data))
        img = ImageOps.exif_transpose(img)
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode in ("RGBA", "LA", "PA"):
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, rgba)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float64)
            img = Image.fromarray((arr / max(arr.max(), 1) * 255).astype(np.uint8))
        if img.mode != "RGB":
            img = img.convert("RGB")
        img.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure is bad data, not a crash
        raise BadSample("bad_image", f"{type(e).__name__}: {e}") from None
    if img.width < 1 or img.height < 1:
        raise BadSample("bad_image", "empty image")
    return img


def decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample("bad_text", str(e)) from None


def decode_json(data: bytes) -> object:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSample("bad_json", str(e).splitlines()[0]) from None


def decode_npy(data: bytes) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise BadSample("bad_codes", f"{type(e).__name__}: {e}") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iu":
        raise BadSample("bad_codes", "codes must be an integer array")
    return arr


def resize_long_pad(img: Image.Image, size: int) -> Image.Image:
    """Long side to `size` (bicubic), centred on a (127,127,127) square (official Janus)."""
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    if nw == nh == size:
        return img
    out = Image.new("RGB", (size, size), PAD_RGB)
    out.paste(img, ((size - nw) // 2, (size - nh) // 2))
    return out


def resize_short_crop(img: Image.Image, size: int) -> Image.Image:
    """Short side to `size` (bicubic), centre crop of the long side to `size`."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def und_uint8(img: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8 padded understanding image; normalised per batch in collate."""
    return np.asarray(resize_long_pad(img, size), dtype=np.uint8)


def gen_uint8(img: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8 cropped generation image; scaled to [-1, 1] per batch in collate."""
    return np.asarray(resize_short_crop(img, size), dtype=np.uint8)


GEN_MEAN = GEN_STD = (0.5, 0.5, 0.5)
"""Generation images' mean/std: ``x / 127.5 - 1``, the VQ's [-1, 1] (the understanding encoder
takes the processor's mean/std; Janus ships 0.5 there too)."""


def normalize_pixels_(x, mean=GEN_MEAN, std=GEN_STD):
    """The one pixel normalisation, in place: float32 (..., 3, H, W) holding 0..255 ->
    ``(x / 255 - mean) / std`` per channel, computed as one multiply and one add with the float32
    constants ``1 / (255 std)`` and ``-mean / std``. Every path (loader, device-side finish,
    eval references, the demo's VQ) goes through here, so an image gives the same bits
    everywhere: ``x / 127.5 - 1`` written out differs in the last bit for 111 of the 256
    levels."""
    import torch

    m = np.asarray(mean, np.float64)
    s = np.asarray(std, np.float64)
    scale = torch.tensor(1.0 / (255.0 * s), dtype=torch.float32, device=x.device).view(3, 1, 1)
    shift = torch.tensor(-m / s, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return x.mul_(scale).add_(shift)


def normalize_batch(xs: list[np.ndarray], mean=GEN_MEAN, std=GEN_STD):
    """(H, W, 3) uint8 images -> (N, 3, H, W) float32 ``normalize_pixels_``, batched: one
    converting copy and one in-place affine pass. In a dataloader worker the output is allocated
    in shared memory, so sending it to the trainer process needs no extra copy."""
    import torch
    from torch.utils.data import get_worker_info

    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2)
    out = torch.empty(x.shape, dtype=torch.float32)
    if get_worker_info() is not None:
        out.share_memory_()
    out.copy_(x)
    return normalize_pixels_(out, mean, std)


def to_uint8(x):
    """[-1, 1] float pixels (any layout) -> uint8 0..255 (clamped, rounded): the inverse of the
    generation normalisation, for decoded images."""
    import torch

    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def stack_uint8(xs: list[np.ndarray]):
    """(H, W, 3) uint8 images -> (N, 3, H, W) uint8 torch view, stacked straight into shared
    memory inside a dataloader worker (no copy when the batch is sent to the trainer)."""
    import torch
    from torch.utils.data import get_worker_info

    out = torch.empty((len(xs), *xs[0].shape), dtype=torch.uint8)
    if get_worker_info() is not None:
        out.share_memory_()
    np.stack(xs, out=out.numpy())
    return out.permute(0, 3, 1, 2)


def und_pixels(img: Image.Image, size: int, mean, std) -> np.ndarray:
    """(3, size, size) float32 normalised understanding input of one image."""
    return normalize_batch([und_uint8(img, size)], mean, std)[0].numpy()


def gen_pixels(img: Image.Image, size: int) -> np.ndarray:
    """(3, size, size) float32 generation target in [-1, 1] of one image."""
    return normalize_batch([gen_uint8(img, size)])[0].numpy()
