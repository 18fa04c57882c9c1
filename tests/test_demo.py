"""The demo world: deterministic shards in the real formats, a held-out split of unseen
combinations, the recogniser, and the tiny VQ fit."""

from __future__ import annotations

import copy
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from janus_demo import synth, world
from janus_demo.recognize import recognize_scene

SMALL = dict(n_caption=40, n_conversation=40, n_chat=10, n_text=10, n_imagenet=20, n_heldout=30)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    synth.synthesize(synth.SynthConfig(out=str(out), **SMALL))
    return out


def _tars(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.tar"))}


def test_synth_is_deterministic_and_seeded(data_dir, tmp_path):
    again = tmp_path / "again"
    synth.main(["--out", str(again)] + [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()])
    a, b = _tars(data_dir), _tars(again)
    assert a.keys() == b.keys() and len(a) == 2 * (len(synth.SOURCES) + len(synth.HELDOUT_SOURCES))
    assert a == b  # byte-identical tar files
    other = tmp_path / "other"
    synth.synthesize(synth.SynthConfig(out=str(other), seed=1, **SMALL))
    assert _tars(other)["train/caption/caption-000000.tar"] != a["train/caption/caption-000000.tar"]


def test_every_source_writes_the_count_its_own_field_sets(data_dir):
    """``n_<source>`` sets that source's training samples, ``n_heldout`` each held-out one's
    (``SynthConfig.train_sizes`` maps the sources to the fields); an unknown source is refused."""
    counts = json.loads((data_dir / "world.json").read_text())["counts"]
    train = ("caption", "conversation", "chat", "text", "imagenet")
    assert counts["train"] == {s: SMALL[f"n_{s}"] for s in train}
    assert counts["heldout"] == dict.fromkeys(("caption", "conversation", "text", "imagenet"), 30)
    for split in ("train", "heldout"):
        with pytest.raises(ValueError, match="unknown source 'video'"):
            synth.make_samples(synth.SynthConfig(), split, "video")


def test_formats_match_the_tiny_recipes_and_build(data_dir, tiny_model_and_processor, monkeypatch):
    """Every tiny stage recipe loads on the train split, and every record of every source builds
    a training sample with the data pipeline's own builders."""
    from janus_train.data.builders import record_to_samples
    from janus_train.data.recipe import load_recipe
    from janus_train.data.tario import iter_shard
    from tests.conftest import tiny_run
    from tests.helpers import stage_context

    monkeypatch.setenv("JANUS_DATA_ROOT", str(data_dir / "train"))
    _, processor = tiny_model_and_processor
    for stage in ("stage1", "stage2", "stage3"):
        run = tiny_run([f"stage={stage}"])
        ctx = stage_context(run, processor)
        recipe = load_recipe(run.hparams.data_recipe)
        for src in recipe.sources:
            recs = [r for url in src.shards for r in iter_shard(url)]
            assert recs, src.name
            rng = random.Random(0)
            for rec in recs[:10]:
                samples = record_to_samples(
                    rec.members, src.format, src.task, ctx, rng, src.class_names
                )
                assert samples and all(s.input_ids for s in samples)


def test_record_contents(data_dir):
    cap = next(synth.iter_samples(data_dir / "train" / "caption"))
    assert set(cap) == {"__key__", "png", "txt", "json"}
    meta = json.loads(cap["json"])
    scene = synth.scene_from_json(meta["scene"])
    assert cap["txt"].decode() in (world.caption(scene), world.long_caption(scene))
    img = Image.open(io.BytesIO(cap["png"]))
    assert img.size == (32, 32) and list(img.getdata()) == list(world.render(scene).getdata())
    conv = json.loads(next(synth.iter_samples(data_dir / "train" / "conversation"))["json"])
    turns = conv["conversations"]
    assert turns[0]["from"] == "human" and turns[0]["value"].startswith("<image>\n")
    assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    assert sum(t["value"].count("<image>") for t in turns) == 1
    chat = next(synth.iter_samples(data_dir / "train" / "chat"))
    assert set(chat) == {"__key__", "json"} and "<image>" not in chat["json"].decode()
    cls = next(synth.iter_samples(data_dir / "train" / "imagenet"))
    assert world.class_names()[int(cls["cls"])] == cls["txt"].decode()
    assert set(next(synth.iter_samples(data_dir / "train" / "text"))) == {"__key__", "txt"}


def _triples(root: Path, sources) -> list[set]:
    out = []
    for source in sources:
        for s in synth.iter_samples(root / source):
            if "json" in s and "scene" in json.loads(s["json"]):
                out.append({tuple(o.values()) for o in json.loads(s["json"])["scene"]})
    return out


def test_heldout_split_has_unseen_combinations(data_dir):
    train = _triples(data_dir / "train", ("caption", "conversation", "imagenet"))
    held = _triples(data_dir / "heldout", ("caption", "conversation", "imagenet"))
    seen = set().union(*train)
    assert held and all(scene - seen for scene in held)  # each held-out scene has a new triple
    # ... while every single attribute and every (colour, shape) pair is seen in training
    assert {t[0] for t in seen} == set(world.COLOURS)
    assert {t[1] for t in seen} == set(world.SHAPES)
    assert {t[2] for t in seen} == set(world.POSITIONS)
    assert {(t[0], t[1]) for t in seen} == {(c, s) for c in world.COLOURS for s in world.SHAPES}
    # held-out questions are single-turn with answers
    for s in synth.iter_samples(data_dir / "heldout" / "conversation"):
        assert len(json.loads(s["json"])["conversations"]) == 2


def test_recognizer_reads_rendered_scenes():
    rng = random.Random(3)
    for i in range(100):
        scene = world.random_scene(rng, heldout=i % 2 == 0)
        assert recognize_scene(world.render(scene)) == {
            (o.position, o.colour, o.shape) for o in scene
        }
    assert recognize_scene(Image.new("RGB", (32, 32))) == set()


@pytest.fixture(scope="module")
def fitted_vq(data_dir):
    """The tiny model's VQ before and after a short fit on the train images."""
    from janus_demo import vq as V
    from janus_train.model import train_tiny_tokenizer

    tok = data_dir.parent / "tok"
    train_tiny_tokenizer(tok, corpus=(data_dir / "corpus.txt").read_text().splitlines())
    torch.manual_seed(0)
    model, _ = V.build_tiny(tok)
    vqm = model.model.vqmodel
    x = V.images_to_tensor(V.load_images(data_dir, per_source=40), 32)
    held = V.images_to_tensor(
        [
            Image.open(io.BytesIO(s["png"]))
            for s in synth.iter_samples(data_dir / "heldout" / "caption")
        ],
        32,
    )
    before = V.reconstruction_mse(vqm, held)
    plain = copy.deepcopy(vqm)
    stats = V.fit_vq(vqm, x, V.VQFitConfig(steps=150, batch_size=16))
    V.fit_vq(plain, x, V.VQFitConfig(steps=150, batch_size=16, local_codes=False))
    return vqm, held, before, stats, plain


@pytest.mark.slow  # the two VQ fits of `fitted_vq`
def test_vq_fit_beats_random_vq(fitted_vq):
    """Fitting HF's JanusVQVAE reduces the codes->decode reconstruction error by far."""
    from janus_demo import vq as V

    vqm, held, before = fitted_vq[:3]
    after = V.reconstruction_mse(vqm, held)
    # independent check of the metric: plain MSE of HF's own forward (encode + decode)
    with torch.no_grad():
        rec = vqm(held).decoded_pixel_values
    assert torch.allclose(((rec - held) ** 2).mean(), torch.tensor(after), rtol=1e-4)
    assert after < 0.3 * before, (before, after)
    assert torch.allclose(vqm.quantize.embedding.weight.norm(dim=-1), torch.ones(1), atol=1e-5)


@pytest.mark.slow  # the two VQ fits of `fitted_vq`
def test_fitted_vq_codes_agree_with_hf_encode(fitted_vq):
    """The fit stores the codebook normalised, so HF's raw-distance ``encode`` and the project's
    cosine assignment (``vq_codes``) give the same codes on the demo's VQs: the demo's targets
    did not change when the project switched to DeepSeek's assignment."""
    from janus_train.model.vq_codes import vq_codes

    vqm, held, plain = fitted_vq[0], fitted_vq[1], fitted_vq[4]
    for v in (vqm, plain):
        with torch.no_grad():
            hf = v.encode(held).image_tokens.view(len(held), -1)
        assert torch.equal(vq_codes(v, held), hf)


def _codes(vqm, scenes) -> torch.Tensor:
    from janus_demo import vq as V
    from janus_train.model.vq_codes import vq_codes

    x = V.images_to_tensor([world.render(s) for s in scenes], 32)
    return vq_codes(vqm, x).view(len(scenes), 4, 4)


def _placement_agreement(vqm, rng) -> float:
    """Fraction of an object's 2x2 codes equal to its codes alone at the top left, over every
    (colour, shape) drawn at every position among random other objects (held-out placements
    included). Computed on rendered scenes with ``vq_codes``."""
    quad = {p: (2 * (i // 2), 2 * (i % 2)) for i, p in enumerate(world.POSITIONS)}
    same = total = 0
    for colour in world.COLOURS:
        for shape in world.SHAPES:
            ref = _codes(vqm, [(world.Obj(colour, shape, "top left"),)])[0, :2, :2]
            for pos in world.POSITIONS:
                others = [
                    world.Obj(rng.choice(list(world.COLOURS)), rng.choice(world.SHAPES), p)
                    for p in world.POSITIONS
                    if p != pos and rng.random() < 0.6
                ]
                scene = tuple(
                    sorted(
                        others + [world.Obj(colour, shape, pos)],
                        key=lambda o: world.POSITIONS.index(o.position),
                    )
                )
                r, c = quad[pos]
                got = _codes(vqm, [scene])[0, r : r + 2, c : c + 2]
                same += int((got == ref).sum())
                total += 4
    return same / total


@pytest.mark.slow  # the two VQ fits of `fitted_vq`
def test_vq_codes_depend_on_the_block_only(fitted_vq):
    """The local-code fit gives an object the same 2x2 codes wherever it is drawn and whatever
    else the image holds, far more often than a plain VQ-VAE fit of the same length, whose codes
    depend on the context (the demo's full fit: 1.0). Distinct objects get distinct codes."""
    vqm, plain = fitted_vq[0], fitted_vq[4]
    local = _placement_agreement(vqm, random.Random(0))
    other = _placement_agreement(plain, random.Random(0))
    assert local >= 0.4 and local >= 2 * other, (local, other)
    objs = [(world.Obj(c, s, "top left"),) for c in world.COLOURS for s in world.SHAPES]
    tl = _codes(vqm, objs)[:, :2, :2].reshape(len(objs), 4)
    assert len({tuple(t.tolist()) for t in tl}) >= len(objs) - 2


def test_patch_codes_are_exact_block_classes():
    """Targets of the local fit: equal pixel blocks <=> equal code; the world has 61 blocks."""
    from janus_demo import vq as V

    rng = random.Random(1)
    scenes = [world.random_scene(rng, False) for _ in range(300)]
    scenes += [(o,) for o in world.all_triples()]
    x = V.images_to_tensor([world.render(s) for s in scenes], 32)
    codes = V.patch_codes(x, 8, 64)
    arr = np.stack([np.asarray(world.render(s)) for s in scenes])  # independent block split
    blocks = arr.reshape(len(scenes), 4, 8, 4, 8, 3).transpose(0, 1, 3, 2, 4, 5)
    keys = [b.tobytes() for b in blocks.reshape(-1, 8, 8, 3)]
    flat = codes.reshape(-1).tolist()
    assert len(set(keys)) == 61 == len(set(flat))
    pairs = {(k, c) for k, c in zip(keys, flat)}
    assert len(pairs) == 61  # a bijection between distinct blocks and codes
    # more distinct blocks than codes: k-means, every code used, equal blocks -> equal code
    few = V.patch_codes(x, 8, 8).reshape(-1).tolist()
    assert set(few) <= set(range(8)) and len({(k, c) for k, c in zip(keys, few)}) == 61
