"""``python -m janus_demo.synth``: write the demo world (``janus_demo.world``) as WebDataset shards in
the formats real data uses, deterministically (same arguments -> byte-identical tar files).

Layout under ``--out``: each split is a ``JANUS_DATA_ROOT`` for the tiny recipes
(``data_recipes/tiny_stage*.yaml``, docs/data.md); every source is split into ``--shards`` tar
files ``SOURCE/SOURCE-NNNNNN.tar``::

    world.json                  attributes, held-out triples, counts, image size
    corpus.txt                  every word of the world (tiny tokenizer training)
    train/caption/              img2dataset layout: KEY.png + KEY.txt (caption) + KEY.json
    train/conversation/         LLaVA: KEY.json {"conversations": [{from, value}]} + KEY.png
    train/chat/                 text-only conversations: KEY.json {"conversations": [...]}
    train/text/                 plain text: KEY.txt
    train/imagenet/             ImageNet style: KEY.png + KEY.cls (index) + KEY.txt (class name)
    heldout/{caption,conversation,text,imagenet}/   same formats, scenes with unseen triples

``KEY.json`` of image sources also carries ``"scene"``: the objects as
``[{"colour", "shape", "position"}]``, which the evaluation uses as ground truth.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from janus_demo import world
from janus_train import cli_help
from janus_train.data.tario import iter_shard, write_tar


@dataclass
class SynthConfig:
    """Sizes of the generated data set."""

    out: str = "demo_out/data"
    """Output directory (its train/ and heldout/ are JANUS_DATA_ROOTs of the tiny recipes)."""
    seed: int = 0
    """Seed of every draw: same arguments, byte-identical tar files."""
    image_size: int = 32
    """Image side in pixels (the tiny model's model.image_size)."""
    shards: int = 2
    """Tar files per source (the tiny recipes read ``{000000..000001}``)."""
    n_caption: int = 3000
    """Caption samples (img2dataset layout)."""
    n_conversation: int = 3000
    """LLaVA-style conversations about an image."""
    n_chat: int = 500
    """Text-only conversations."""
    n_text: int = 1000
    """Plain-text documents about the world."""
    n_imagenet: int = 1500
    """Class-labelled images (ImageNet layout)."""
    n_heldout: int = 200
    """Samples per held-out source."""

    def train_sizes(self) -> dict[str, int]:
        """Samples per training source, in writing order: the one list of the sources."""
        return {
            "caption": self.n_caption,
            "conversation": self.n_conversation,
            "chat": self.n_chat,
            "text": self.n_text,
            "imagenet": self.n_imagenet,
        }


SOURCES = tuple(SynthConfig().train_sizes())
HELDOUT_SOURCES = ("caption", "conversation", "text", "imagenet")


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _scene_json(scene: world.Scene) -> list[dict]:
    return [asdict(o) for o in scene]


def scene_from_json(objs: list[dict]) -> world.Scene:
    return tuple(world.Obj(**o) for o in objs)


def _caption_sample(scene, rng, size, long: bool) -> dict[str, bytes | str]:
    text = world.long_caption(scene) if long else world.caption(scene)
    meta = {"caption": text, "width": size, "height": size, "scene": _scene_json(scene)}
    return {"png": _png(world.render(scene, size)), "txt": text, "json": json.dumps(meta)}


def _conversation_sample(scene, rng, size, max_turns: int) -> dict[str, bytes | str]:
    qa = world.questions(scene, rng, rng.randint(1, max_turns))
    # held-out (single-turn) items keep short answers: they score exact-match accuracy
    if max_turns > 1 and rng.random() < 0.2:
        qa[-1] = ("Describe the image in detail.", world.caption(scene))
    conv = []
    for i, (q, a) in enumerate(qa):
        conv.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + q})
        conv.append({"from": "gpt", "value": a})
    meta = {"conversations": conv, "scene": _scene_json(scene)}
    return {"png": _png(world.render(scene, size)), "json": json.dumps(meta)}


def _class_sample(scene, rng, size) -> dict[str, bytes | str]:
    names = world.class_names()
    name = scene[0].name
    meta = {"label": names.index(name), "class_name": name, "scene": _scene_json(scene)}
    return {
        "png": _png(world.render(scene, size)),
        "cls": str(names.index(name)),
        "txt": name,
        "json": json.dumps(meta),
    }


def _chat_sample(rng: random.Random) -> dict[str, str]:
    qa = rng.sample(world.chat_pairs(), rng.randint(1, 3))
    conv = []
    for q, a in qa:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"json": json.dumps({"conversations": conv})}


def _single_object_scene(rng: random.Random, heldout: bool) -> world.Scene:
    held = world.heldout_triples()
    while True:
        o = rng.choice(world.all_triples())
        if (o in held) == heldout:
            return (o,)


def _write_tar(path: Path, samples: list[tuple[str, dict]]) -> None:
    """A tar whose bytes depend only on the samples (the writer's fixed mtime, owner, mode and
    member order)."""
    write_tar(
        path,
        [
            (key, {ext: v.encode("utf-8") if isinstance(v, str) else v for ext, v in s.items()})
            for key, s in samples
        ],
    )


def _write_source(out: Path, split: str, source: str, samples: list[dict], shards: int) -> None:
    shards = max(1, min(shards, len(samples)))
    keyed = [(f"{split}-{source}-{i:06d}", s) for i, s in enumerate(samples)]
    for k in range(shards):
        _write_tar(out / split / source / f"{source}-{k:06d}.tar", keyed[k::shards])


def make_samples(cfg: SynthConfig, split: str, source: str) -> list[dict]:
    """The samples of one source; each (split, source) has its own seeded stream."""
    heldout = split == "heldout"
    rng = random.Random(f"{cfg.seed}/{split}/{source}")
    size = cfg.image_size
    sizes = cfg.train_sizes()
    if source not in sizes:
        raise ValueError(f"unknown source {source!r}")
    n = cfg.n_heldout if heldout else sizes[source]
    if source == "caption":
        return [
            _caption_sample(world.random_scene(rng, heldout), rng, size, long=rng.random() < 0.5)
            for _ in range(n)
        ]
    if source == "conversation":
        # held-out questions are single-turn so each one is an evaluation item
        turns = 1 if heldout else 3
        return [
            _conversation_sample(world.random_scene(rng, heldout), rng, size, turns)
            for _ in range(n)
        ]
    if source == "chat":
        return [_chat_sample(rng) for _ in range(n)]
    if source == "imagenet":
        return [_class_sample(_single_object_scene(rng, heldout), rng, size) for _ in range(n)]
    return [{"txt": t} for t in world.text_sentences(rng, n, heldout)]


def synthesize(cfg: SynthConfig) -> dict:
    """Write every source of both splits under ``cfg.out``; return the world summary."""
    out = Path(cfg.out)
    counts: dict[str, dict[str, int]] = {"train": {}, "heldout": {}}
    for split, sources in (("train", SOURCES), ("heldout", HELDOUT_SOURCES)):
        for source in sources:
            samples = make_samples(cfg, split, source)
            _write_source(out, split, source, samples, cfg.shards)
            counts[split][source] = len(samples)
    summary = {
        "config": asdict(cfg),
        "colours": list(world.COLOURS),
        "shapes": list(world.SHAPES),
        "positions": list(world.POSITIONS),
        "heldout_triples": sorted(
            (asdict(o) for o in world.heldout_triples()),
            key=lambda d: (d["colour"], d["shape"], d["position"]),
        ),
        "counts": counts,
    }
    (out / "world.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "corpus.txt").write_text("\n".join(world.vocabulary_corpus()) + "\n")
    return summary


def iter_samples(paths: list[str | Path] | str | Path) -> Iterator[dict[str, bytes | str]]:
    """Samples of tar files (or of every ``*.tar`` in a directory) as ``{"__key__", ext: bytes}``,
    in order. Only reads bytes: nothing is decoded or unpickled."""
    if isinstance(paths, (str, Path)):
        p = Path(paths)
        paths = sorted(p.glob("*.tar")) if p.is_dir() else [p]
    for path in paths:
        for rec in iter_shard(str(path)):
            yield {"__key__": rec.key, **rec.members}


def build_parser() -> argparse.ArgumentParser:
    """``python -m janus_demo.synth``'s options: one per ``SynthConfig`` field, its docstring as help."""
    d = SynthConfig()
    ap = argparse.ArgumentParser(
        prog="python -m janus_demo.synth",
        description=cli_help.summary(__doc__),
        formatter_class=cli_help.HelpFormatter,
    )
    docs = cli_help.field_docs(SynthConfig)
    for name, val in asdict(d).items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(val), default=val, help=docs[name])
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    cfg = SynthConfig(**vars(args))
    summary = synthesize(cfg)
    print(f"wrote {cfg.out}: " + json.dumps(summary["counts"]))


if __name__ == "__main__":
    main()
