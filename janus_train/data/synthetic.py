"""Small synthetic shards in every supported format (tests, the benchmark, the demo's layout).

Images are coloured shapes on a background, so captions such as "a red circle" are true.
``write_tar`` (``janus_train.data.tario``'s, webdataset's writer) writes any byte members,
including deliberately broken ones for bad-data tests.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from janus_train.data.tario import write_tar

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 30),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 40),
    "purple": (140, 40, 180),
    "orange": (240, 140, 20),
}
SHAPES = ("circle", "square", "triangle")


def shape_image(
    color: str, shape: str, size: tuple[int, int] = (48, 40), seed: int = 0, fmt: str = "JPEG"
) -> bytes:
    rng = random.Random(seed)
    w, h = size
    img = Image.new("RGB", size, (rng.randrange(200, 256),) * 3)
    d = ImageDraw.Draw(img)
    r = min(w, h) // 3
    cx, cy = w // 2 + rng.randint(-2, 2), h // 2 + rng.randint(-2, 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        d.rectangle(box, fill=COLORS[color])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _pick(i: int) -> tuple[str, str]:
    colors = list(COLORS)
    return colors[i % len(colors)], SHAPES[(i // len(colors)) % len(SHAPES)]


def caption_records(
    start: int, n: int, size=(48, 40), codes: int | None = None, codebook: int = 64
) -> list[tuple[str, dict[str, bytes]]]:
    """img2dataset-style ``jpg`` + ``txt`` + ``json``; ``codes``: add ``codes.npy`` of that length."""
    out = []
    for i in range(start, start + n):
        color, shape = _pick(i)
        cap = f"a {color} {shape}. there is one {shape} in the center."
        m = {
            "jpg": shape_image(color, shape, size, seed=i),
            "txt": cap.encode(),
            "json": json.dumps({"caption": cap, "key": f"{i:06d}"}).encode(),
        }
        if codes:
            buf = io.BytesIO()
            np.save(buf, np.random.default_rng(i).integers(0, codebook, codes).astype(np.int32))
            m["codes.npy"] = buf.getvalue()
        out.append((f"{i:06d}", m))
    return out


def conversation_records(start: int, n: int, size=(48, 40), with_image: bool = True):
    """LLaVA-style ``json`` conversations (two turns), with the image alongside when asked."""
    out = []
    for i in range(start, start + n):
        color, shape = _pick(i)
        q1 = "<image>\nwhat color is the shape?" if with_image else "what color is red?"
        conv = [
            {"from": "human", "value": q1},
            {"from": "gpt", "value": f"{color}"},
            {"from": "human", "value": "what shape is it?"},
            {"from": "gpt", "value": f"a {shape}"},
        ]
        m = {"json": json.dumps({"conversations": conv}).encode()}
        if with_image:
            m["jpg"] = shape_image(color, shape, size, seed=i)
        out.append((f"{i:06d}", m))
    return out


def text_records(start: int, n: int):
    out = []
    for i in range(start, start + n):
        color, shape = _pick(i)
        out.append((f"{i:06d}", {"txt": f"the {color} {shape} is on the left. {i}".encode()}))
    return out


def class_records(start: int, n: int, size=(48, 40)):
    """ImageNet-style: class name in ``txt`` (also ``cls`` index) beside the image."""
    out = []
    names = [f"{c} {s}" for s in SHAPES for c in COLORS]
    for i in range(start, start + n):
        color, shape = _pick(i)
        name = f"{color} {shape}"
        out.append(
            (
                f"{i:06d}",
                {
                    "jpg": shape_image(color, shape, size, seed=i),
                    "cls": str(names.index(name)).encode(),
                    "txt": name.encode(),
                },
            )
        )
    return out


def write_tiny_dataset(
    root: str | Path, n_shards: int = 2, per_shard: int = 16, size=(48, 40)
) -> dict[str, str]:
    """The layout the tiny recipes read (docs/data.md): returns name -> shard pattern."""
    root = Path(root)
    layout = {
        "caption": (caption_records, "caption/caption-{:06d}.tar"),
        "conversation": (conversation_records, "conversation/conversation-{:06d}.tar"),
        "text": (text_records, "text/text-{:06d}.tar"),
        "imagenet": (class_records, "imagenet/imagenet-{:06d}.tar"),
    }
    out = {}
    for name, (fn, pat) in layout.items():
        for s in range(n_shards):
            recs = (
                fn(s * per_shard, per_shard)
                if name == "text"
                else fn(s * per_shard, per_shard, size)
            )
            write_tar(root / pat.format(s), recs)
        out[name] = str(root / pat.replace("{:06d}", f"{{000000..{n_shards - 1:06d}}}"))
    # Text-only conversations for stage 3's text share.
    for s in range(n_shards):
        write_tar(
            root / f"chat/chat-{s:06d}.tar",
            conversation_records(s * per_shard, per_shard, with_image=False),
        )
    out["chat"] = str(root / f"chat/chat-{{000000..{n_shards - 1:06d}}}.tar")
    return out
