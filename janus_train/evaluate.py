"""In-training and post-training evaluation on a held-out *eval recipe*: per-task loss, a grid
of generated images, understanding answers, and accuracy figures.

    run_eval(model, processor, spec, model_cfg, data, ev, step, out_dir)
        -> {"loss/text": .., "und/accuracy": .., ...}

It takes the run's typed pieces, never the config tree: the stage evaluated
(``trainer.spec.StageSpec``: its framing), the model and data configs its samples are built
with, and the ``eval`` group.

The trainer calls it every ``eval.every`` steps on **every rank**: every rank runs the same
forwards on the same data (ZeRO-3 gathers parameters collectively), rank 0 writes the files. What
it reads and how much: the ``eval`` group (``janus_train.trainer.config.EvalConfig``).

Eval recipe: ``eval.recipe`` (a recipe name or path; the ``tiny`` experiment's is
``data_recipes/tiny_heldout.yaml``). The first ``eval.max_per_source`` records of each source
are read in order (no shuffle), built by the training sample builders with the stage's framing
but without CFG dropout or caption truncation, so the figures are comparable between
evaluations.

- ``loss/{text,und,gen}``: token-mean CE per task (``JanusTrainModel`` forward).
- ``und/accuracy``: greedy answers equal (case and final period ignored) to the reference answer
  of single-question conversations (chat framing), or the generated caption equals the reference
  caption (stage 1 plain framing).
- ``gen/token_accuracy``: codes generated greedily with classifier-free guidance
  ``eval.guidance_scale`` (``gen/guidance_scale``; 1 = none) equal the VQ codes of the
  reference image, position by position (chance: 1 / codebook size);
  ``gen/token_accuracy@cfg{s}`` for ``eval.extra_guidance_scales``.

Application metrics: ``eval.metrics`` names callables (``"package.module:function"``), each
called on every rank with the ``GenerationOutputs`` (the held-out prompts, reference
images, their records' ``json`` metadata, generated and reference codes, decoded images, the
VQ encoder of reference images, the stage evaluated and the step) and returning
``{name: value}`` merged into the metrics.
The demo's scene, object and unseen-object accuracies and its blank-image baseline come this way
(``janus_demo.metrics``); the library itself never imports an application.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from janus_train import sample as S
from janus_train.data.builders import BuildContext
from janus_train.data.config import DataConfig
from janus_train.model.chat_template import PromptFormat
from janus_train.model.config import ModelConfig
from janus_train.model.vq_codes import vq_codes
from janus_train.trainer.config import EvalConfig
from janus_train.trainer.distributed import is_main_process
from janus_train.trainer.spec import StageSpec

logger = logging.getLogger(__name__)


def eval_recipe(cfg: EvalConfig):
    """The held-out recipe ``eval.recipe``, loaded."""
    from janus_train.data.recipe import load_recipe

    if not cfg.recipe:
        raise ValueError("eval.recipe is not set: name the held-out recipe (name or path)")
    return load_recipe(cfg.recipe)


def _records(src, n: int):
    from janus_train.data.tario import iter_shard

    out = []
    if n <= 0:
        return out
    for url in src.shards:
        for rec in iter_shard(url):
            out.append(rec)
            if len(out) >= n:
                return out
    return out


def eval_context(
    spec: StageSpec, processor, model_cfg: ModelConfig, data: DataConfig
) -> BuildContext:
    """The stage's BuildContext (:meth:`StageSpec.context`) without CFG dropout and caption
    truncation."""
    ctx = spec.context(processor, model_cfg, data)
    return dataclasses.replace(ctx, cfg_dropout=0.0, first_sentence_prob=0.0)


@torch.no_grad()
def heldout_losses(janus, ctx, recipe, cfg: EvalConfig) -> dict[str, float]:
    """Token-mean CE per task over the first records of every source."""
    from janus_train.batch import TASKS
    from janus_train.data.builders import collate_samples, record_to_samples
    from janus_train.data.preprocess import BadSample
    from janus_train.model import JanusTrainModel

    samples = []
    for src in recipe.sources:
        rng = random.Random(0)
        for rec in _records(src, cfg.max_per_source):
            try:
                samples += record_to_samples(
                    rec.members, src.format, src.task, ctx, rng, src.class_names
                )
            except BadSample:
                continue
    model = JanusTrainModel(janus)
    device = next(janus.parameters()).device
    loss_sum = torch.zeros(3, dtype=torch.float64)
    n_tok = torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(samples), cfg.batch_size):
        batch = collate_samples(samples[i : i + cfg.batch_size], ctx)
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(batch)
        loss_sum += out["loss_sum"].double().cpu()
        n_tok += out["n_tokens"].double().cpu()
    return {f"loss/{t}": float(loss_sum[i] / n_tok[i]) for i, t in enumerate(TASKS) if n_tok[i]}


def normalize_answer(text: str) -> str:
    """An answer as compared with its reference: case, surrounding space and final period
    ignored."""
    return " ".join(text.lower().strip().rstrip(".").split())


def _image(members):
    from janus_train.data.builders import record_image
    from janus_train.data.preprocess import decode_image

    return decode_image(record_image(members)).convert("RGB")


def understanding_items(recipe, fmt: PromptFormat, n: int):
    """(image, question, reference answer) from the eval recipe's understanding sources."""
    from janus_train.data.builders import record_caption, record_turns

    want = "caption" if fmt.style == "plain" else "conversation"  # stage 1: captioning
    items = []
    for src in recipe.sources:
        if src.task != "understanding" or src.format != want:
            continue
        for rec in _records(src, n - len(items)):
            if want == "caption":
                items.append((_image(rec.members), "", record_caption(rec.members)))
                continue
            turns = [t for t in record_turns(rec.members) if t[0] != "system"]
            if len(turns) >= 2 and turns[0][1].count("<image>") == 1:
                q = turns[0][1].replace("<image>", "").strip()
                items.append((_image(rec.members), q, turns[1][1]))
    return items


def _generation_items(recipe, n: int):
    """(prompt, reference image, metadata) from the eval recipe's generation sources; metadata is
    the record's ``json`` member for captions (it describes the whole image) and ``{}`` for class
    labels (a class name does not fix the rest of the image)."""
    from janus_train.data.builders import record_caption, record_class_name
    from janus_train.data.preprocess import decode_json

    items = []
    for src in recipe.sources:
        if src.task != "generation":
            continue
        for rec in _records(src, n - len(items)):
            m = rec.members
            prompt = (
                record_class_name(m, src.class_names)
                if src.format == "class_label"
                else record_caption(m)
            )
            meta = decode_json(m["json"]) if "json" in m and src.format == "caption" else {}
            items.append((prompt, _image(m), meta if isinstance(meta, dict) else {}))
    return items


def reference_codes(janus, images, size: int) -> torch.Tensor:
    """VQ codes (DeepSeek's cosine assignment) of reference images after the generation
    preprocessing (crop, [-1, 1])."""
    from janus_train.data.preprocess import gen_uint8, normalize_batch

    x = normalize_batch([gen_uint8(im, size) for im in images])
    vq = janus.model.vqmodel
    return vq_codes(vq, x.to(next(vq.parameters()).device)).cpu()


@dataclass
class GenerationOutputs:
    """What an application metric (``eval.metrics``) sees of the greedy generation."""

    prompts: list[str]
    references: list[Image.Image]
    """Reference images of the prompts (as stored, RGB)."""
    metadata: list[dict]
    """Each record's ``json`` member (``{}`` when absent or for class labels)."""
    codes: torch.Tensor
    """Generated codes, (n, image tokens)."""
    reference_codes: torch.Tensor
    """VQ codes of the reference images, (n, image tokens)."""
    images: list[Image.Image]
    """Generated images (``codes`` decoded by the VQ)."""
    encode: Callable[[list[Image.Image]], torch.Tensor]
    """VQ codes, (n, image tokens), of any images, computed as ``reference_codes`` were."""
    stage: StageSpec
    """The stage evaluated (frozen): name, framing (``stage.prompt``), ratio, recipe."""
    step: int
    """The training step evaluated (-1: after training)."""


MetricFn = Callable[[GenerationOutputs], dict]


def load_metric(spec: str) -> MetricFn:
    """``"package.module:function"`` -> the function (``eval.metrics``)."""
    mod, sep, fn = spec.partition(":")
    if not sep or not mod or not fn:
        raise ValueError(f"eval.metrics: {spec!r} is not 'package.module:function'")
    try:
        obj = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"eval.metrics: cannot load {spec!r} ({e})") from e
    if not callable(obj):
        raise ValueError(f"eval.metrics: {spec!r} is not callable")
    return obj


@torch.no_grad()
def _answer_questions(janus, processor, und: list, fmt, cfg: EvalConfig) -> list[dict]:
    """Greedy answers to the held-out questions, each with its reference and exact match."""
    preds = S.answer(
        janus,
        processor,
        [u[0] for u in und],
        [u[1] for u in und],
        fmt,
        cfg.max_new_tokens,
        cfg.batch_size,
    )
    return [
        {
            "question": q,
            "answer": p,
            "reference": r,
            "correct": normalize_answer(p) == normalize_answer(r),
        }
        for (_, q, r), p in zip(und, preds)
    ]


def _generation_metrics(
    janus, processor, gen: list, fmt, cfg: EvalConfig, size: int
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Greedy CFG generation of the held-out prompts against the reference images' VQ codes:
    token accuracies at ``eval.guidance_scale`` and each extra scale. Returns (metrics,
    generated codes, reference codes)."""
    scale = cfg.guidance_scale
    metrics: dict[str, float] = {}
    greedy = S.SampleConfig(guidance_scale=scale, temperature=0.0, batch_size=cfg.batch_size)
    codes = S.generate_codes(janus, processor, [g[0] for g in gen], greedy, fmt)
    ref = reference_codes(janus, [g[1] for g in gen], size)
    hit = codes == ref
    metrics["gen/token_accuracy"] = float(hit.float().mean())
    metrics["gen/guidance_scale"] = float(scale)
    for s in cfg.extra_guidance_scales:
        other = S.generate_codes(
            janus,
            processor,
            [g[0] for g in gen],
            dataclasses.replace(greedy, guidance_scale=s),
            fmt,
        )
        metrics[f"gen/token_accuracy@cfg{s:g}"] = float((other == ref).float().mean())
    return metrics, codes, ref


def _sample_grid(janus, processor, gen: list, decoded, fmt, cfg: EvalConfig, size, step):
    """Rows of (reference, greedy, two sampled images) for the first ``n_grid`` prompts."""
    k = min(cfg.n_grid, len(gen))
    sampled = S.SampleConfig(
        guidance_scale=cfg.guidance_scale,
        temperature=1.0,
        num_images=2,
        batch_size=cfg.batch_size,
        seed=step,
    )
    samp = S.decode_codes(
        janus, S.generate_codes(janus, processor, [g[0] for g in gen[:k]], sampled, fmt)
    )
    tiles = []
    for i in range(k):
        tiles += [gen[i][1].resize((size, size)), decoded[i], samp[2 * i], samp[2 * i + 1]]
    return S.image_grid(tiles, cols=4, scale=max(1, 96 // size)), k


def _write_eval_outputs(out_dir, step: int, metrics: dict, answers: list, grid, rows: list):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"step": step, **metrics}, indent=1) + "\n")
    with open(out / "answers.jsonl", "w") as f:
        for a in answers:
            f.write(json.dumps(a) + "\n")
    if grid is not None:
        grid.save(out / "generated.png")
        (out / "generated.json").write_text(
            json.dumps(
                {"columns": ["reference", "greedy", "sample", "sample"], "rows": rows},
                indent=1,
            )
            + "\n"
        )


def run_eval(
    model,
    processor,
    spec: StageSpec,
    model_cfg: ModelConfig,
    data: DataConfig,
    cfg: EvalConfig,
    step: int,
    out_dir,
) -> dict:
    """Evaluate stage ``spec`` (samples built with ``model_cfg`` / ``data``) on every rank as
    ``cfg`` (the ``eval`` group) says; rank 0 writes ``out_dir/{metrics.json, answers.jsonl,
    generated.png}``. Returns flat metrics (the caller logs them, e.g. prefixed ``eval/``)."""
    # loaded before any forward: a wrong name fails in a second, not after the generation
    extra_metrics = [load_metric(m) for m in cfg.metrics]
    janus = S.unwrap(model)
    was_training = janus.training
    janus.eval()
    recipe = eval_recipe(cfg)
    fmt = spec.prompt
    size = janus.config.vision_config.image_size
    metrics: dict[str, float] = {}
    ctx = eval_context(spec, processor, model_cfg, data)
    metrics.update(heldout_losses(janus, ctx, recipe, cfg))

    und = understanding_items(recipe, fmt, cfg.n_und)
    answers = []
    if und:
        answers = _answer_questions(janus, processor, und, fmt, cfg)
        metrics["und/accuracy"] = float(np.mean([a["correct"] for a in answers]))

    gen = _generation_items(recipe, cfg.n_gen)
    grid, rows = None, []
    if gen:
        gen_metrics, codes, ref = _generation_metrics(janus, processor, gen, fmt, cfg, size)
        metrics.update(gen_metrics)
        decoded = S.decode_codes(janus, codes)
        outputs = GenerationOutputs(
            prompts=[g[0] for g in gen],
            references=[g[1] for g in gen],
            metadata=[g[2] for g in gen],
            codes=codes,
            reference_codes=ref,
            images=decoded,
            encode=lambda images: reference_codes(janus, images, size),
            stage=spec,
            step=step,
        )
        for fn in extra_metrics:
            metrics.update({k: float(v) for k, v in fn(outputs).items()})
        grid, k = _sample_grid(janus, processor, gen, decoded, fmt, cfg, size, step)
        rows = [
            {"prompt": g[0], "token_accuracy": float((c == r).float().mean())}
            for g, c, r in zip(gen, codes, ref)
        ][:k]
    if is_main_process():
        _write_eval_outputs(out_dir, step, metrics, answers, grid, rows)
    if was_training:
        janus.train()
    logger.info("eval step %d: %s", step, json.dumps(metrics))
    return metrics
