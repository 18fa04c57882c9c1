"""``janus-data``: converters produce shards the builders read, inspect shows supervised spans,
vq-encode writes the frozen VQ's codes (checked against a direct encode), synth forwards argv."""

from __future__ import annotations

import io
import json
import random
import re
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from janus_train.cli import data as cli
from janus_train.data.builders import BuildContext, record_to_samples
from janus_train.data.preprocess import decode_image, gen_pixels
from janus_train.data.recipe import RECIPE_DIR
from janus_train.data.shards import ShardCursor
from janus_train.data.synthetic import caption_records, shape_image
from janus_train.data.tario import write_tar
from janus_train.model.tokenizer import resolve_special_tokens, train_tiny_tokenizer


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok"), image_size=32, num_image_tokens=16)


def ctx_of(proc, **kw):
    tok = proc.tokenizer
    return BuildContext(
        tokenizer=tok,
        st=resolve_special_tokens(tok),
        image_size=32,
        num_image_tokens=16,
        codebook_size=64,
        cfg_dropout=0.0,
        first_sentence_prob=0.0,
        **kw,
    )


def read_records(directory):
    out = []
    for p in sorted(directory.glob("*.tar")):
        out += [r for _, r in ShardCursor(str(p), None).iterate(0, lambda q: True)]
    return out


def test_convert_llava_text_captions_imagenet(proc, tmp_path):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    (img_dir / "a.jpg").write_bytes(shape_image("red", "circle"))
    (img_dir / "b.png").write_bytes(shape_image("blue", "square", fmt="PNG"))
    llava = [
        {
            "id": "x1",
            "image": "a.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat color?"},
                {"from": "gpt", "value": "red"},
            ],
        },
        {"id": "x2", "image": "missing.jpg", "conversations": []},
        {
            "id": "x3",
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
        },
    ]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    c = cli.convert_llava(
        cli.build_parser().parse_args(
            [
                "convert",
                "llava",
                "--json",
                str(tmp_path / "llava.json"),
                "--image-root",
                str(img_dir),
                "--out",
                str(tmp_path / "llava"),
                "--maxcount",
                "1",
            ]
        )
    )
    assert c == {"written": 2, "skipped/missing_image": 1}
    recs = read_records(tmp_path / "llava")
    assert len(list((tmp_path / "llava").glob("*.tar"))) == 2  # maxcount 1
    ctx = ctx_of(proc, sft=True)
    s = record_to_samples(recs[0].members, "conversation", "understanding", ctx, random.Random(0))
    assert len(s[0].und_images) == 1 and s[0].input_ids.count(ctx.st.image) == 16
    s = record_to_samples(recs[1].members, "conversation", "text", ctx, random.Random(0))
    assert s[0].task == "text"

    (tmp_path / "c.jsonl").write_text('{"text": "the red circle"}\n{oops\n{"other": 1}\n')
    cli.main(
        ["convert", "text", "--input", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "t")]
    )
    recs = read_records(tmp_path / "t")
    assert [r.members["txt"] for r in recs] == [b"the red circle"]

    (tmp_path / "t.csv").write_text(
        "image,caption\na.jpg,a red circle\nb.png,a blue square\nnope.jpg,x\nb.png,\n"
    )
    cli.main(
        [
            "convert",
            "captions",
            "--input",
            str(tmp_path / "t.csv"),
            "--image-root",
            str(img_dir),
            "--out",
            str(tmp_path / "cap"),
        ]
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table(
            {
                "image": [{"bytes": shape_image("red", "circle"), "path": None}],
                "caption": ["a red circle"],
            }
        ),
        tmp_path / "t.parquet",
    )
    cli.main(
        [
            "convert",
            "captions",
            "--input",
            str(tmp_path / "t.parquet"),
            "--out",
            str(tmp_path / "pq"),
        ]
    )
    recs = read_records(tmp_path / "cap") + read_records(tmp_path / "pq")
    assert [r.members["txt"] for r in recs] == [b"a red circle", b"a blue square", b"a red circle"]
    assert "jpg" in recs[0].members and "png" in recs[1].members and "jpg" in recs[2].members
    for r in recs:
        (und,) = record_to_samples(r.members, "caption", "understanding", ctx, random.Random(0))
        assert und.task == "und"

    for cls in ("n01_red_circle", "n02_blue_square"):
        (tmp_path / "inet" / cls).mkdir(parents=True)
    (tmp_path / "inet" / "n01_red_circle" / "1.JPEG").write_bytes(shape_image("red", "circle"))
    (tmp_path / "inet" / "n02_blue_square" / "2.png").write_bytes(
        shape_image("blue", "square", fmt="PNG")
    )
    (tmp_path / "names.txt").write_text("n01_red_circle red circle, round thing\n")
    cli.main(
        [
            "convert",
            "imagenet",
            "--root",
            str(tmp_path / "inet"),
            "--class-names",
            str(tmp_path / "names.txt"),
            "--out",
            str(tmp_path / "in"),
        ]
    )
    recs = read_records(tmp_path / "in")
    assert [(r.members["txt"], r.members["cls"]) for r in recs] == [
        (b"red circle", b"0"),
        (b"n02 blue square", b"1"),
    ]
    (g,) = record_to_samples(recs[0].members, "class_label", "generation", ctx, random.Random(0))
    assert g.input_ids[1:-17] == proc.tokenizer.encode("red circle", add_special_tokens=False)


def test_inspect_shows_supervised_spans(proc, tmp_path, monkeypatch, capsys):
    from janus_train.data.synthetic import write_tiny_dataset

    monkeypatch.setenv("JANUS_DATA_ROOT", str(tmp_path / "data"))
    write_tiny_dataset(tmp_path / "data", n_shards=2, per_shard=2)
    mine = tmp_path / "mine.yaml"  # --recipe: in place of experiment.stage1.data_recipe
    shutil.copy(RECIPE_DIR / "tiny_stage1.yaml", mine)
    args = ["--n", "4", "--workdir", str(tmp_path), "--recipe", str(mine)]
    cli.main(["inspect", *args, "experiment=tiny", "stage=stage1"])
    out = capsys.readouterr().out
    assert out.startswith(f"recipe tiny_stage1 ({mine}); stage stage1")
    assert "<image x16>" in out and "[[<codes x16>]]" in out
    assert "<|end▁of▁sentence|>]]" in out.replace("｜", "|")
    assert '"samples/captions": 2' in out and '"samples/imagenet": 2' in out

    # --lengths: each source's deciles of the samples the same steps build, as recipe lines
    # (oracle: the per-sample lengths printed without --lengths, attributed to sources by
    # their shard directory and task, and numpy's quantiles of them)
    args = ["--n", "8", "--steps", "3", "--workdir", str(tmp_path), "experiment=tiny"]
    cli.main(["inspect", *args, "stage=stage2"])
    source = {("text", "text"): "text", ("und", "caption"): "captions",
              ("und", "conversation"): "conversations", ("gen", "caption"): "t2i",
              ("gen", "imagenet"): "imagenet"}  # fmt: skip
    seen: dict[str, list[int]] = {}
    for task, folder, n in re.findall(
        r"^--- step \d (\w+) \S+/(\w+)/[^ ]+ \((\d+) tokens\)$", capsys.readouterr().out, re.M
    ):
        seen.setdefault(source[task, folder], []).append(int(n))
    assert sum(map(len, seen.values())) == 24 and len(set(seen["t2i"])) > 1
    cli.main(["inspect", *args, "stage=stage2", "--lengths"])
    out = capsys.readouterr().out
    assert "--- step" not in out
    got = dict(re.findall(r"- name: (\w+) .*\n +sample_tokens: (\[.*\])", out))
    for name, ns in seen.items():
        if len(ns) < 2:
            assert f"#   {name}: 1 sample(s), too few" in out
            continue
        q = np.quantile(ns, np.linspace(0, 1, 11))
        want = [round(x) for x in q] if min(ns) < max(ns) else [ns[0], ns[0]]
        assert json.loads(got.pop(name)) == want, name
    assert not got


def test_vq_encode_matches_direct_encode(proc, tmp_path, monkeypatch):
    from janus_train.config import compose, to_run_config
    from janus_train.model import build_model
    from janus_train.model.forward import JanusTrainModel

    run = to_run_config(compose(["experiment=tiny"]))
    model, p = build_model(run.model, workdir=tmp_path)
    model.save_pretrained(tmp_path / "m")
    src = write_tar(tmp_path / "in" / "cap-000000.tar", caption_records(0, 5, size=(48, 40)))
    cli.main(
        [
            "vq-encode",
            "--model",
            str(tmp_path / "m"),
            "--shards",
            src,
            "--out",
            str(tmp_path / "out"),
            "--batch-size",
            "2",
        ]
    )
    recs = read_records(tmp_path / "out")
    assert len(recs) == 5
    wrapped = JanusTrainModel(model.eval())
    x = torch.from_numpy(np.stack([gen_pixels(decode_image(r.members["jpg"]), 32) for r in recs]))
    want = wrapped.encode_images(x).numpy()
    got = np.stack([np.load(io.BytesIO(r.members["codes.npy"]), allow_pickle=False) for r in recs])
    assert got.shape == (5, 16) and np.array_equal(got, want)
    ctx = ctx_of(proc)
    (g,) = record_to_samples(recs[0].members, "caption", "generation", ctx, random.Random(0))
    assert g.gen_image is None and g.image_codes[-16:] == [int(v) for v in want[0]]


def test_tar_members_written_by_converters_are_plain(tmp_path):
    # ShardWriter must store bytes as-is (no pickling of our members)
    write_tar(tmp_path / "x.tar", caption_records(0, 1))
    with tarfile.open(tmp_path / "x.tar") as tf:
        names = sorted(m.name for m in tf.getmembers())
    assert names == ["000000.jpg", "000000.json", "000000.txt"]
    assert Image.open(io.BytesIO(caption_records(0, 1)[0][1]["jpg"])).format == "JPEG"


def test_convert_captions_from_local_hf_dataset(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"image": [Image.open(io.BytesIO(shape_image("red", "circle")))], "caption": ["a red"]},
        features=datasets.Features(
            {"image": datasets.Image(), "caption": datasets.Value("string")}
        ),
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    cli.main(["convert", "captions", "--input", str(tmp_path / "hf"), "--out", str(tmp_path / "o")])
    (rec,) = read_records(tmp_path / "o")
    assert rec.members["txt"] == b"a red" and decode_image(rec.members["jpg"]).size == (48, 40)
