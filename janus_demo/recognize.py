"""Recognise the demo world's objects in an image (generated or real): per quadrant, empty or
the nearest palette colour and the shape whose rendered mask overlaps the foreground best.

This is the attribute check behind ``gen/scene_accuracy``: it judges decoded images
independently of the VQ codes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from janus_demo import world

FOREGROUND = 80
"""A pixel is foreground when its brightest channel exceeds this (background is black)."""
MIN_FILL = 0.12
"""Quadrant fraction of foreground pixels below which the quadrant counts as empty."""


def _templates(size: int) -> dict[tuple[str, str], np.ndarray]:
    out = {}
    for p in world.POSITIONS:
        x0, y0, x1, y1 = world.quadrant_box(p, size)
        for s in world.SHAPES:
            img = np.asarray(world.render((world.Obj("red", s, p),), size))
            out[(p, s)] = img[y0:y1, x0:x1].max(-1) > FOREGROUND
    return out


_CACHE: dict[int, dict] = {}


def scene_set(objs: list[dict]) -> set[tuple[str, str, str]]:
    """A scene as stored in the shards' ``json`` (``[{colour, shape, position}]``) in the form
    ``recognize_scene`` returns."""
    return {(o["position"], o["colour"], o["shape"]) for o in objs}


def recognize_scene(img: Image.Image) -> set[tuple[str, str, str]]:
    """``{(position, colour, shape)}`` of the objects visible in `img` (square RGB)."""
    arr = np.asarray(img.convert("RGB")).astype(np.float32)
    size = arr.shape[0]
    tmpl = _CACHE.setdefault(size, _templates(size))
    palette = np.array(list(world.COLOURS.values()), dtype=np.float32)
    names = list(world.COLOURS)
    found = set()
    for p in world.POSITIONS:
        x0, y0, x1, y1 = world.quadrant_box(p, size)
        q = arr[y0:y1, x0:x1]
        fg = q.max(-1) > FOREGROUND
        if fg.mean() < MIN_FILL:
            continue
        mean = q[fg].mean(0)
        colour = names[int(np.argmin(((palette - mean) ** 2).sum(-1)))]
        iou = {
            s: (fg & tmpl[(p, s)]).sum() / max(1, (fg | tmpl[(p, s)]).sum()) for s in world.SHAPES
        }
        found.add((p, colour, max(iou, key=iou.get)))
    return found
