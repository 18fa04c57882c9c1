"""A small deterministic world of scenes for the demo: coloured shapes in the four quadrants of a
square image, with captions, questions and answers, class names and plain text about it.

A scene holds 1-3 objects, each a ``(colour, shape, position)`` triple, at most one per quadrant.
Each quadrant covers exactly 2x2 VQ tokens of the tiny model (32 px image, 8 px tokens), and an
object is always drawn with the same pixels in every quadrant, so the world has 61 distinct 8x8
blocks; the demo's VQ fit (``janus_demo.vq``) gives each block its own code, so an object
has the same codes in every quadrant and context.

Held-out split: for every ``(colour, shape)`` pair one position is held out (a Latin-square style
rotation), so each pair, colour, shape and position is seen in training, but a held-out scene
contains at least one triple never seen in any training image, caption or question.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 30),
    "blue": (40, 60, 240),
    "yellow": (240, 220, 30),
    "purple": (170, 40, 200),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four")
BACKGROUND = (0, 0, 0)


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    position: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


Scene = tuple[Obj, ...]
"""Objects sorted by position (top left, top right, bottom left, bottom right)."""


def all_triples() -> list[Obj]:
    return [Obj(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]


def heldout_triples() -> set[Obj]:
    """One position per (colour, shape) pair, rotating so every position is held out equally."""
    out = set()
    for i, c in enumerate(COLOURS):
        for j, s in enumerate(SHAPES):
            out.add(Obj(c, s, POSITIONS[(i + j) % len(POSITIONS)]))
    return out


def is_heldout(scene: Scene) -> bool:
    held = heldout_triples()
    return any(o in held for o in scene)


def random_scene(rng: random.Random, heldout: bool, max_objects: int = 3) -> Scene:
    """A scene from the train split (no held-out triple) or the held-out split (at least one)."""
    held = sorted(heldout_triples(), key=lambda o: (o.colour, o.shape, o.position))
    while True:
        n = rng.randint(1, max_objects)
        positions = rng.sample(POSITIONS, n)
        objs = [Obj(rng.choice(list(COLOURS)), rng.choice(SHAPES), p) for p in positions]
        if heldout:
            # force one held-out triple so the held-out split is not mostly empty
            h = rng.choice(held)
            objs = [o for o in objs if o.position != h.position][: n - 1] + [h]
        scene = tuple(sorted(objs, key=lambda o: POSITIONS.index(o.position)))
        if is_heldout(scene) == heldout:
            return scene


def quadrant_box(position: str, size: int) -> tuple[int, int, int, int]:
    half = size // 2
    row, col = (0 if position.startswith("top") else 1), (0 if position.endswith("left") else 1)
    return col * half, row * half, (col + 1) * half, (row + 1) * half


def render(scene: Scene, size: int = 32) -> Image.Image:
    """Draw the scene (no anti-aliasing: the same object gives the same pixels everywhere)."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    margin = max(1, size // 16)
    for o in scene:
        x0, y0, x1, y1 = quadrant_box(o.position, size)
        box = (x0 + margin, y0 + margin, x1 - margin - 1, y1 - margin - 1)
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon(
                [((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill
            )
    return img


def caption(scene: Scene) -> str:
    parts = [f"a {o.name} at the {o.position}" for o in scene]
    return " and ".join(parts) + "."


def long_caption(scene: Scene) -> str:
    """Several sentences (the first is the short caption) for first-sentence truncation."""
    n = NUMBERS[len(scene)]
    noun = "shape" if len(scene) == 1 else "shapes"
    return f"{caption(scene).capitalize()} There {'is' if len(scene) == 1 else 'are'} {n} {noun}."


def questions(scene: Scene, rng: random.Random, k: int) -> list[tuple[str, str]]:
    """``k`` distinct (question, answer) pairs about the scene; answers are one or two words."""
    pool: list[tuple[str, str]] = [("How many shapes are there?", NUMBERS[len(scene)])]
    for o in scene:
        pool.append((f"What color is the shape at the {o.position}?", o.colour))
        pool.append((f"What shape is at the {o.position}?", o.shape))
        if sum(x.name == o.name for x in scene) == 1:
            pool.append((f"Where is the {o.name}?", o.position))
    empty = [p for p in POSITIONS if p not in {o.position for o in scene}]
    for p in empty:
        pool.append((f"Is there a shape at the {p}?", "no"))
    for o in scene:
        pool.append((f"Is there a shape at the {o.position}?", "yes"))
    rng.shuffle(pool)
    return pool[:k]


def class_names() -> list[str]:
    """ImageNet-style classes: one per (colour, shape) pair."""
    return [f"{c} {s}" for c, s in itertools.product(COLOURS, SHAPES)]


def text_sentences(rng: random.Random, n: int, heldout: bool = False) -> list[str]:
    """Plain text about the world (facts and scene descriptions) for the text-only task."""
    facts = [
        "a circle is round.",
        "a square has four equal sides.",
        "a triangle has three sides.",
        "the image has four parts: top left, top right, bottom left and bottom right.",
        "each shape has one color.",
    ] + [f"{c} is a color." for c in COLOURS]
    out = []
    for _ in range(n):
        if rng.random() < 0.3:
            out.append(" ".join(rng.sample(facts, 3)))
        else:
            out.append(long_caption(random_scene(rng, heldout)))
    return out


def chat_pairs() -> list[tuple[str, str]]:
    """Text-only questions about the world and their answers."""
    sides = {"circle": "zero", "square": "four", "triangle": "three"}
    pairs = [(f"How many sides does a {s} have?", n) for s, n in sides.items()]
    pairs += [(f"Is {c} a color?", "yes") for c in COLOURS]
    pairs += [(f"Is {s} a color?", "no") for s in SHAPES]
    pairs += [(f"Is a {s} a shape?", "yes") for s in SHAPES]
    pairs += [(f"Is {c} a shape?", "no") for c in COLOURS]
    pairs.append(("Which colors are there?", ", ".join(COLOURS) + "."))
    pairs.append(("Which shapes are there?", ", ".join(SHAPES) + "."))
    return pairs


def vocabulary_corpus() -> list[str]:
    """Every word the world uses, for training the tiny tokenizer."""
    rng = random.Random(0)
    lines = [caption(random_scene(rng, False)) for _ in range(200)]
    lines += [long_caption(random_scene(rng, True)) for _ in range(50)]
    for _ in range(200):
        scene = random_scene(rng, False)
        lines += [f"{q} {a}" for q, a in questions(scene, rng, 4)]
    lines += text_sentences(rng, 50)
    lines += class_names()
    lines += [f"{q} {a}" for q, a in chat_pairs()]
    lines += [
        "<|User|>: <|Assistant|>: User: Assistant:",
        "You are a helpful language and vision assistant. You are able to understand the visual "
        "content that the user provides, and assist the user with a variety of tasks using "
        "natural language.",
        "Describe the image in detail.",
        "Draw an image of this.",
    ]
    return lines
