"""``janus-data``: build, inspect and pre-tokenize training shards.

    janus-data convert llava    --json data.json --image-root DIR --out DIR [--prefix llava]
    janus-data convert text     --input corpus.jsonl --out DIR [--text-key text]
    janus-data convert captions --input table.{csv,tsv,parquet}|HF_DATASET_DIR --out DIR
                                [--image-col image] [--caption-col caption] [--image-root DIR]
    janus-data convert imagenet --root CLASS_FOLDERS --out DIR [--class-names FILE]
    janus-data inspect [--recipe NAME|PATH] [--n 8] [--steps 1] [--lengths] [--workdir DIR]
                       [hydra overrides ...]
    janus-data vq-encode --model HF_DIR --shards PATTERN --out DIR [--device cuda] [--procs 2]
    janus-data convert-checkpoint DEEPSEEK_DIR [--out HF_DIR]   (DeepSeek's release layout in)
    janus-data export-deepseek HF_DIR --out DIR                 (DeepSeek's release layout out)

Shard formats are described in docs/data.md. Converters write with ``webdataset.ShardWriter``
(``PREFIX-NNNNNN.tar``, ``--maxcount`` samples each) and store images as their original bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from janus_train.errors import run_cli

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp"}


def _writer(out: str, prefix: str, maxcount: int):
    import webdataset as wds

    from janus_train.data.tario import WRITER_OPTIONS

    Path(out).mkdir(parents=True, exist_ok=True)
    pattern = os.path.join(out, f"{prefix}-%06d.tar")
    return wds.ShardWriter(pattern, maxcount=maxcount, verbose=0, **WRITER_OPTIONS)


def _write_all(
    records: Iterator[tuple[str, dict[str, bytes]] | str],
    out: str,
    prefix: str,
    maxcount: int,
    total: int | None,
    what: str,
) -> Counter:
    """Write records (``(key, {ext: bytes})``, or a skip reason string) and count outcomes."""
    counts: Counter = Counter()
    with _writer(out, prefix, maxcount) as sink:
        for rec in tqdm(records, total=total, desc=f"convert {what}", unit="sample"):
            if isinstance(rec, str):
                counts[f"skipped/{rec}"] += 1
                continue
            key, members = rec
            sink.write({"__key__": key, **members})
            counts["written"] += 1
    print(json.dumps(dict(counts)), file=sys.stderr)
    return counts


def _image_member(path: Path) -> tuple[str, bytes] | None:
    ext = IMAGE_SUFFIXES.get(path.suffix.lower())
    if ext is None or not path.is_file():
        return None
    return ext, path.read_bytes()


def convert_llava(args) -> Counter:
    entries = json.loads(Path(args.json).read_text())
    root = Path(args.image_root) if args.image_root else Path(args.json).parent

    def gen():
        for i, e in enumerate(entries):
            conv = e.get("conversations") if isinstance(e, dict) else None
            if not isinstance(conv, list):
                yield "bad_conversation"
                continue
            imgs = e.get("image")
            imgs = [] if imgs is None else ([imgs] if isinstance(imgs, str) else list(imgs))
            members: dict[str, bytes] = {}
            ok = True
            for j, rel in enumerate(imgs):
                m = _image_member(root / rel)
                if m is None:
                    ok = False
                    break
                members[m[0] if len(imgs) == 1 else f"{j}.{m[0]}"] = m[1]
            if not ok:
                yield "missing_image"
                continue
            meta = {"conversations": conv, "id": e.get("id", i)}
            members["json"] = json.dumps(meta, ensure_ascii=False).encode()
            yield f"{i:09d}", members

    return _write_all(gen(), args.out, args.prefix or "llava", args.maxcount, len(entries), "llava")


def convert_text(args) -> Counter:
    def gen():
        with open(args.input, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    yield "bad_json"
                    continue
                if isinstance(row, dict) and isinstance(row.get("conversations"), list):
                    yield (
                        f"{i:09d}",
                        {
                            "json": json.dumps(
                                {"conversations": row["conversations"]}, ensure_ascii=False
                            ).encode()
                        },
                    )
                elif isinstance(row, dict) and isinstance(row.get(args.text_key), str):
                    yield f"{i:09d}", {"txt": row[args.text_key].encode()}
                else:
                    yield "missing_key"

    return _write_all(gen(), args.out, args.prefix or "text", args.maxcount, None, "text")


def _table_rows(path: str, image_col: str) -> tuple[Iterator[dict], int | None]:
    p = Path(path)
    if p.is_dir():
        from datasets import Image as HFImage
        from datasets import load_from_disk

        ds = load_from_disk(str(p))
        if hasattr(ds, "keys") and not hasattr(ds, "column_names"):
            ds = ds[next(iter(ds.keys()))]
        if isinstance(ds.features.get(image_col), HFImage):
            ds = ds.cast_column(image_col, HFImage(decode=False))  # keep the original bytes
        return iter(ds), len(ds)
    if p.suffix in (".csv", ".tsv"):
        import csv

        f = open(p, newline="", encoding="utf-8")  # noqa: SIM115 - closed by the generator's end
        rows = csv.DictReader(f, delimiter="\t" if p.suffix == ".tsv" else ",")
        return iter(rows), None
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        return iter(table.to_pylist()), table.num_rows
    raise ValueError(f"--input {path!r}: expected .csv, .tsv, .parquet or a datasets directory")


def _image_bytes(value, root: Path | None) -> tuple[str, bytes] | None:
    """A table cell -> (ext, bytes): a path, raw bytes, ``{"bytes"|"path"}`` or a PIL image."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return _sniff(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return _sniff(bytes(value))
    if isinstance(value, str) and value:
        p = Path(value)
        return _image_member(p if p.is_absolute() or root is None else root / p)
    if hasattr(value, "save"):  # PIL image from an HF datasets Image feature
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return "png", buf.getvalue()
    return None


def _sniff(data: bytes) -> tuple[str, bytes]:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg", data
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", data
    return "png", data


def convert_captions(args) -> Counter:
    rows, total = _table_rows(args.input, args.image_col)
    root = Path(args.image_root) if args.image_root else None

    def gen():
        for i, row in enumerate(rows):
            cap = row.get(args.caption_col)
            if not isinstance(cap, str) or not cap.strip():
                yield "bad_caption"
                continue
            img = _image_bytes(row.get(args.image_col), root)
            if img is None:
                yield "missing_image"
                continue
            meta = {"caption": cap, "key": f"{i:09d}"}
            yield (
                f"{i:09d}",
                {
                    img[0]: img[1],
                    "txt": cap.encode(),
                    "json": json.dumps(meta, ensure_ascii=False).encode(),
                },
            )

    return _write_all(gen(), args.out, args.prefix or "captions", args.maxcount, total, "captions")


def convert_imagenet(args) -> Counter:
    root = Path(args.root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    names = {c: c.replace("_", " ") for c in classes}
    if args.class_names:
        for line in Path(args.class_names).read_text(encoding="utf-8").splitlines():
            parts = line.strip().split(None, 1)
            if len(parts) == 2:
                names[parts[0]] = parts[1].split(",")[0].strip()
    files = [(ci, f) for ci, c in enumerate(classes) for f in sorted((root / c).iterdir())]

    def gen():
        for i, (ci, f) in enumerate(files):
            m = _image_member(f)
            if m is None:
                yield "not_an_image"
                continue
            c = classes[ci]
            yield f"{i:09d}", {m[0]: m[1], "cls": str(ci).encode(), "txt": names[c].encode()}

    return _write_all(
        gen(), args.out, args.prefix or "imagenet", args.maxcount, len(files), "imagenet"
    )


# --------------------------------------------------------------------------- inspect


def render_sample(row: dict, tokenizer, st) -> str:
    """One batch row as text: supervised spans in ``[[...]]``, image runs collapsed."""
    from janus_train.batch import IGNORE

    ids, labels, codes = row["input_ids"], row["labels"], row["image_codes"]
    groups: list[tuple[str, bool, list[int]]] = []
    for t, lab, c in zip(ids, labels, codes):
        if c != IGNORE:
            kind, sup = "codes", True
        elif t == st.image:
            kind, sup = "image", False
        elif t == st.pad:
            kind, sup = "pad", lab != IGNORE
        else:
            kind, sup = "text", lab != IGNORE
        if groups and groups[-1][0] == kind and groups[-1][1] == sup:
            groups[-1][2].append(t)
        else:
            groups.append((kind, sup, [t]))
    out = []
    for kind, sup, toks in groups:
        s = (
            tokenizer.decode(toks, skip_special_tokens=False)
            if kind == "text"
            else f"<{kind} x{len(toks)}>"
        )
        out.append(f"[[{s}]]" if sup else s)
    return "".join(out)


LENGTH_QUANTILES = 11
"""``janus-data inspect --lengths`` reports deciles (min, 10%, ..., max) of each source."""


def length_snippet(lengths: dict[str, list[int]], recipe_path: str, what: str) -> str:
    """The ``sample_tokens`` lines to paste into a recipe, one per source with samples:
    ``LENGTH_QUANTILES`` equally spaced quantiles (numpy's linear interpolation), rounded."""
    import numpy as np

    lines = [f"# sample_tokens measured over {what}; paste into each source of {recipe_path}:"]
    for name, ns in lengths.items():
        if len(ns) < 2:
            lines.append(f"#   {name}: {len(ns)} sample(s), too few to measure (more --n/--steps)")
            continue
        q = np.quantile(np.asarray(ns, dtype=np.float64), np.linspace(0, 1, LENGTH_QUANTILES))
        q = q if q[0] < q[-1] else q[[0, -1]]  # one length: [n, n]
        vals = ", ".join(str(int(round(x))) for x in q)
        lines.append(f"  - name: {name}  # {len(ns)} samples, mean {np.mean(ns):.0f} tokens")
        lines.append(f"    sample_tokens: [{vals}]")
    return "\n".join(lines)


def inspect(args, overrides: list[str]) -> str:
    from omegaconf import OmegaConf

    from janus_train.config import compose, resolve_stage, to_run_config
    from janus_train.data.loader import build_train_loader
    from janus_train.data.mixing import step_plan
    from janus_train.model.build import get_processor
    from janus_train.model.tokenizer import resolve_special_tokens

    dcfg = compose(overrides)
    stage = dcfg.stage.name  # one step of args.n samples, one per micro-batch
    OmegaConf.update(dcfg, f"experiment.{stage}.global_batch_size", args.n)
    run = to_run_config(dcfg)
    run.data.num_workers = 0
    run.train.tokens_per_micro, run.train.micro_batch_size = 0, 1
    if args.recipe:
        run.hparams.data_recipe = args.recipe
    spec = resolve_stage(run, with_recipe=True)
    proc = get_processor(run.model, args.workdir)
    ctx = spec.context(proc, run.model, run.data)
    loader = build_train_loader(spec.recipe, ctx, run.data, spec.ratio, spec.plan, rank=0)
    recipe, counts = loader.args.recipe, loader.args.counts
    st = resolve_special_tokens(proc.tokenizer)
    lines = [
        f"recipe {recipe.name} ({recipe.path}); stage {run.stage.name}; "
        f"per-step task counts {dict(counts)}"
    ]
    lengths: dict[str, list[int]] = {}
    for step in range(args.steps):
        # one sample per micro-batch; its source is the one the loader's step plan names
        plan = step_plan(recipe, counts, step, 1, 1, args.n, run.data.seed)[0]
        for mb, keys, srcs in zip(loader.next_step(), loader.last_keys, plan):
            n = int(mb["attention_mask"][0].sum())
            lengths.setdefault(recipe.sources[srcs[0]].name, []).append(n)
            if args.lengths:
                continue
            row = {k: mb[k][0, :n].tolist() for k in ("input_ids", "labels", "image_codes")}
            task = {0: "text", 1: "und", 2: "gen"}[int(mb["task_ids"][0, 0])]
            lines.append(f"--- step {step} {task} {keys[0]} ({n} tokens)")
            lines.append(render_sample(row, proc.tokenizer, st))
    lines.append("counts: " + json.dumps(loader.counters()))
    if args.lengths:
        what = f"{args.steps} step(s) x {args.n} samples"
        lines.append(length_snippet(lengths, recipe.path, what))
    loader.close()
    text = "\n".join(lines)
    print(text)
    return text


# --------------------------------------------------------------------------- vq-encode


def _encode_shard(job: tuple[str, str, str, str, int, int]) -> dict:
    """Copy one shard adding ``codes.npy`` (frozen VQ codes of its generation image)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch

    from janus_train.data.builders import image_members
    from janus_train.data.preprocess import BadSample, decode_image, gen_pixels
    from janus_train.data.shards import ShardCursor
    from janus_train.model.vq_codes import vq_codes

    url, out_path, model_dir, device, batch_size, threads = job
    vq, size = _load_vq(model_dir, device)
    records = [r for _, r in ShardCursor(url, None).iterate(0, lambda p: True)]

    def prep(rec):
        exts = image_members(rec.members)
        if not exts:
            return None
        try:
            return gen_pixels(decode_image(rec.members[exts[0]]), size)
        except BadSample:
            return None

    with ThreadPoolExecutor(threads) as pool:
        pixels = list(pool.map(prep, records))
    codes: list = [None] * len(records)
    todo = [i for i, p in enumerate(pixels) if p is not None]
    with torch.no_grad():
        for b in range(0, len(todo), batch_size):
            idx = todo[b : b + batch_size]
            x = torch.from_numpy(np.stack([pixels[i] for i in idx])).to(device)
            toks = vq_codes(vq, x).cpu().numpy().astype(np.int32)
            for i, t in zip(idx, toks):
                codes[i] = t
    from janus_train.data.tario import write_tar

    out = []
    for rec, c in zip(records, codes):
        members = dict(rec.members)
        if c is not None:
            buf = io.BytesIO()
            np.save(buf, c, allow_pickle=False)
            members["codes.npy"] = buf.getvalue()
        out.append((rec.key, members))
    write_tar(out_path, out)
    return {"shard": url, "records": len(records), "encoded": len(todo)}


_VQ_CACHE: dict = {}


def _load_vq(model_dir: str, device: str):
    if (model_dir, device) not in _VQ_CACHE:
        import torch
        from transformers import JanusForConditionalGeneration

        model = JanusForConditionalGeneration.from_pretrained(
            model_dir, local_files_only=True, dtype=torch.float32
        )
        vq = model.model.vqmodel.to(device).eval()
        _VQ_CACHE[(model_dir, device)] = (vq, model.config.vision_config.image_size)
    return _VQ_CACHE[(model_dir, device)]


def vq_encode(args) -> list[dict]:
    from janus_train.data.recipe import expand_shards

    shards = expand_shards(args.shards, "--shards")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    jobs = [
        (
            u,
            os.path.join(args.out, os.path.basename(u.split()[-1])),
            args.model,
            args.device,
            args.batch_size,
            args.threads,
        )
        for u in shards
    ]
    results = []
    if args.procs > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.procs) as pool:
            for r in tqdm(pool.imap(_encode_shard, jobs), total=len(jobs), desc="vq-encode"):
                results.append(r)
    else:
        for job in tqdm(jobs, desc="vq-encode"):
            results.append(_encode_shard(job))
    print(
        json.dumps({"shards": len(results), "encoded": sum(r["encoded"] for r in results)}),
        file=sys.stderr,
    )
    return results


# --------------------------------------------------------------------------- main


def _add_convert_parsers(sub) -> None:
    """``janus-data convert {llava,text,captions,imagenet}``."""
    from janus_train.cli_help import HelpFormatter

    conv = sub.add_parser(
        "convert",
        help="convert a data set into WebDataset shards",
        description="Convert a data set into WebDataset shards (formats: docs/data.md).",
    )
    csub = conv.add_subparsers(dest="kind", required=True)

    def common(p):
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--prefix", default=None, help="shard name prefix")
        p.add_argument("--maxcount", type=int, default=10000, help="samples per shard")

    p = csub.add_parser(
        "llava",
        formatter_class=HelpFormatter,
        help="LLaVA JSON + image folder -> conversation shards",
    )
    p.add_argument("--json", required=True, help="LLaVA conversation JSON (a list of records)")
    p.add_argument(
        "--image-root", default=None, help="directory the records' image paths are relative to"
    )
    common(p)
    p = csub.add_parser(
        "text",
        formatter_class=HelpFormatter,
        help="jsonl ({text} or {conversations}) -> text shards",
    )
    p.add_argument("--input", required=True, help="jsonl file")
    p.add_argument("--text-key", default="text", help="field holding the text")
    common(p)
    p = csub.add_parser(
        "captions",
        formatter_class=HelpFormatter,
        help="csv/tsv/parquet/HF datasets dir -> caption shards",
    )
    p.add_argument("--input", required=True, help="csv/tsv/parquet file or HF datasets directory")
    p.add_argument("--image-col", default="image", help="column with image paths, bytes or images")
    p.add_argument("--caption-col", default="caption", help="column with the caption")
    p.add_argument("--image-root", default=None, help="directory relative image paths start from")
    common(p)
    p = csub.add_parser(
        "imagenet", formatter_class=HelpFormatter, help="class folders -> class_label shards"
    )
    p.add_argument("--root", required=True, help="directory of class folders")
    p.add_argument("--class-names", default=None, help="lines 'FOLDER NAME[, synonyms]'")
    common(p)


def build_parser() -> argparse.ArgumentParser:
    from janus_train.cli_help import HelpFormatter, summary

    ap = argparse.ArgumentParser(
        prog="janus-data", description=summary(__doc__), formatter_class=HelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_convert_parsers(sub)

    p = sub.add_parser(
        "inspect",
        help="print built samples of a recipe, supervised in [[...]]",
        formatter_class=HelpFormatter,
        description="Print the samples a recipe builds for the first steps (supervised tokens in "
        "[[...]]) and the per-source counts.",
    )
    p.add_argument(
        "--recipe",
        default=None,
        help="recipe name or path (default: experiment.<stage>.data_recipe)",
    )
    p.add_argument("--n", type=int, default=8, help="samples per step")
    p.add_argument("--steps", type=int, default=1, help="optimizer steps to build")
    p.add_argument(
        "--lengths",
        action="store_true",
        help="measure each source's built sample lengths instead of printing the samples, "
        "and print the recipe's sample_tokens lines (deciles) that janus-plan simulates",
    )
    p.add_argument("--workdir", default=".", help="where a tiny tokenizer is trained/reused")
    p.add_argument(
        "overrides", nargs="*", help="hydra overrides, e.g. experiment=tiny stage=stage2"
    )

    p = sub.add_parser(
        "vq-encode",
        help="add frozen-VQ codes.npy to generation shards",
        formatter_class=HelpFormatter,
        description="Pre-tokenize generation images with the frozen VQ: writes copies of the "
        "shards with a KEY.codes.npy member, which the trainer uses instead of encoding.",
    )
    p.add_argument("--model", required=True, help="local HF-format Janus directory")
    p.add_argument("--shards", required=True, help="shard pattern (braces allowed)")
    p.add_argument("--out", required=True, help="output directory for the encoded shards")
    p.add_argument("--device", default="cpu", help="torch device of the VQ encoder")
    p.add_argument("--batch-size", type=int, default=32, help="images per VQ forward")
    p.add_argument("--threads", type=int, default=4, help="image decode threads per process")
    p.add_argument("--procs", type=int, default=1, help="shards encoded in parallel processes")

    p = sub.add_parser(
        "convert-checkpoint",
        help="DeepSeek's release layout -> an HF-format directory",
        formatter_class=HelpFormatter,
        description="Convert a checkpoint in DeepSeek's release layout (MultiModalityCausalLM, "
        "e.g. deepseek-ai/Janus-Pro-1B) into an HF-format directory (config, safetensors, "
        "processor); model.init_from does the same on first use into its cache.",
    )
    p.add_argument("src", help="DeepSeek-layout directory (config.json model_type multi_modality)")
    p.add_argument(
        "--out", default=None, help="output directory (default: the cache model.init_from uses)"
    )

    p = sub.add_parser(
        "export-deepseek",
        help="an HF-format directory (a stage's hf/) -> DeepSeek's release layout",
        formatter_class=HelpFormatter,
        description="Write an HF-format Janus directory (a stage's run_dir/hf export) in "
        "DeepSeek's release layout, for DeepSeek's MultiModalityCausalLM.from_pretrained, its "
        "demos and evaluation kits built on its janus package.",
    )
    p.add_argument("src", help="HF-format Janus directory")
    p.add_argument("--out", required=True, help="output directory")
    return ap


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    run_cli(f"janus-data {args.cmd}", _dispatch, args)


def _dispatch(args) -> None:
    if args.cmd == "convert":
        {
            "llava": convert_llava,
            "text": convert_text,
            "captions": convert_captions,
            "imagenet": convert_imagenet,
        }[args.kind](args)
    elif args.cmd == "inspect":
        inspect(args, args.overrides)
    elif args.cmd == "vq-encode":
        vq_encode(args)
    elif args.cmd in ("convert-checkpoint", "export-deepseek"):
        from janus_train.model import deepseek_format as F

        if not Path(args.src).is_dir():
            raise FileNotFoundError(f"{args.src!r} is not a directory")
        if args.cmd == "export-deepseek":
            out = F.export_deepseek(args.src, args.out)
        else:
            out = F.convert_checkpoint(args.src, args.out or F.cache_dir_for(args.src))
        print(out)


if __name__ == "__main__":
    main()
