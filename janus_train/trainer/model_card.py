"""The export's ``README.md`` (a Hugging Face model card): where the weights come from (base
checkpoint, stage, data recipe and sources, steps, batch, hyper-parameters), how well they do
(the last training and held-out records of ``metrics.jsonl``), the chat format with a rendered
example, and how to load and prompt them with plain transformers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from janus_train.model.chat_template import PromptFormat
from janus_train.model.config import ModelConfig
from janus_train.model.tokenizer import BOI_TOKEN
from janus_train.trainer.config import DeepSpeedConfig
from janus_train.trainer.spec import StageSpec

MODEL_DIR = "path/to/this/export"
"""Placeholder for the export's location in the usage code (tests substitute it)."""


def _val(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "—" if v is None else str(v)


def read_metrics(path: str | os.PathLike) -> tuple[dict | None, dict | None]:
    """The last training record (one with ``loss``) and the last held-out record (``eval/*``
    keys) of a ``metrics.jsonl``; None where there is none."""
    train = held = None
    p = Path(path)
    if not p.is_file():
        return None, None
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
        if "loss" in rec:
            train = rec
        if any(k.startswith("eval/") for k in rec):
            held = rec
    return train, held


def _metrics_table(rec: dict, keys: list[str]) -> str:
    rows = [f"| `{k}` | {_val(rec[k])} |" for k in keys if k in rec]
    return "| metric | value |\n|---|---|\n" + "\n".join(rows)


def _sources(spec: StageSpec) -> str:
    if spec.recipe_ref is None:
        return "Synthetic batches (`train.synthetic_data=true`): no data recipe.\n"
    recipe = spec.recipe
    if recipe is None:
        return f"Data recipe `{spec.recipe_ref}`.\n"
    rows = [
        f"| {s.name} | {s.task} | {s.format} | {_val(s.weight)} | "
        f"{'all' if s.steps is None else f'{s.steps[0]}–{s.steps[1]}'} | "
        f"{len(s.shards)} shard(s), e.g. `{s.shards[0] if s.shards else ''}` |"
        for s in recipe.sources
    ]
    head = f"Data recipe `{recipe.name}` (`{recipe.path}`):\n\n"
    table = "| source | task | format | weight | steps | shards |\n|---|---|---|---|---|---|\n"
    return head + table + "\n".join(rows) + "\n"


def _example(processor, style: str) -> tuple[str, str]:
    """The chat format rendered by the processor's own template: understanding and
    text-to-image prompts."""
    und = [{"role": "user", "content": [{"type": "image"}]}]  # plain (stage 1): captioning
    if style != "plain":
        und = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}],
            },
            {"role": "assistant", "content": "A red circle."},
            {"role": "user", "content": "Where is it?"},
        ]
    gen = [{"role": "user", "content": "a red circle at the top left."}]
    a = processor.apply_chat_template(und, add_generation_prompt=True)
    b = processor.apply_chat_template(gen, add_generation_prompt=True, generation_mode="image")
    b = b.removesuffix(BOI_TOKEN) + BOI_TOKEN  # a released template leaves it to the processor
    if getattr(processor, "use_default_system_prompt", False):
        from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

        a = DEFAULT_SYSTEM_PROMPT + a  # what JanusProcessor prepends in text mode
    return a, b


USAGE = """\
```python
import torch
from PIL import Image
from transformers import JanusForConditionalGeneration, JanusProcessor

model_dir = "{model_dir}"
model = JanusForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
processor = JanusProcessor.from_pretrained(model_dir)

# understanding: the chat template renders the training format
messages = [{{"role": "user", "content": [
    {{"type": "image", "image": Image.open("image.png")}},
    {{"type": "text", "text": "What is in the image?"}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))

# text-to-image: generation_mode="image" drops the system prompt and ends with <begin_of_image>
messages = [{{"role": "user", "content": [{{"type": "text", "text": "a red circle."}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt",
                                       generation_mode="image")
codes = model.generate(**inputs, generation_mode="image", do_sample=True, guidance_scale=5.0)
pixels = model.decode_image_tokens(codes).float()  # (N, H, W, 3) in [-1, 1]
Image.fromarray(((pixels[0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()).save("generated.png")
```
"""


def _training_table(
    spec: StageSpec,
    step: int,
    m: ModelConfig,
    ds: DeepSpeedConfig,
    loss: str,
    seq_len: int,
    export_dtype: torch.dtype | None,
) -> list[str]:
    """The "Training" table: base, stage, steps, batch, ratio, optimiser, precision, loss, format."""
    plan, fmt, r = spec.plan, spec.prompt, spec.ratio
    base = f"`{m.init_from}`" if m.init_from else f"random initialisation (`model={m.name}`)"
    trainable = list(spec.trainable)
    if m.lora.enabled:
        trainable.append(f"LoRA r={m.lora.r} on {list(m.lora.groups)} (merged)")
    return [
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| base checkpoint | {base} |",
        f"| stage | `{spec.name}`: trains {', '.join(f'`{g}`' for g in trainable)}; framing "
        f"`{fmt.style}` (understanding), `{fmt.gen_style}` (text-to-image prompts), SFT "
        f"masking `{spec.sft}` |",
        f"| steps | {step} of {spec.steps} scheduled"
        + (f" (stop at {spec.stop_at})" if spec.stop_at else "")
        + " |",
        f"| global batch | {plan.global_batch_size} samples per step over {plan.world_size} GPUs, "
        + (
            f"micro-batches packed to at most {plan.tokens_per_micro} tokens |"
            if plan.tokens_per_micro
            else f"{plan.micro_batch_size} per GPU x {plan.grad_accum} accumulation |"
        ),
        f"| task ratio und : text : gen | {r['und']} : {r['text']} : {r['gen']} |",
        f"| optimiser | AdamW, lr {_val(spec.lr)}, {spec.schedule} schedule, warmup "
        f"{spec.warmup_steps}, min lr ratio {_val(spec.min_lr_ratio)}, weight decay "
        f"{_val(spec.weight_decay)}, gradient clip {_val(ds.gradient_clipping)} |",
        f"| precision / sharding | {ds.precision} (fp32 where the device lacks bf16), "
        f"DeepSpeed ZeRO-{ds.zero_stage}"
        + (
            f"; exported in {str(export_dtype).removeprefix('torch.')} (the VQ in fp32)"
            if export_dtype
            else ""
        )
        + " |",
        f"| loss | `{loss}`; sequence length {seq_len} |",
        f"| prompt format | {_format_line(fmt)} |",
    ]


def _format_line(fmt: PromptFormat) -> str:
    return (
        fmt.style
        + (f" (text-to-image: {fmt.gen_style})" if fmt.gen_style != fmt.style else "")
        + (f", `{fmt.chat_template}` roles" if "chat" in (fmt.style, fmt.gen_style) else "")
        + (
            f", system prompt {json.dumps(fmt.system_prompt)}"
            if fmt.system_prompt and fmt.style == "chat"
            else ""
        )
    )


def _metrics_section(train: dict | None, held: dict | None) -> list[str]:
    lines = ["## Metrics", ""]
    if train:
        keys = ["loss"] + [k for k in train if k.startswith("loss/")]
        lines += [
            f"Training, step {train['step']} (last logged):",
            "",
            _metrics_table(train, keys),
            "",
        ]
    else:
        lines += ["No training metrics were logged.", ""]
    if held:
        keys = [k for k in held if k.startswith("eval/")]
        lines += [f"Held-out evaluation, step {held['step']}:", "", _metrics_table(held, keys), ""]
    else:
        lines += ["No held-out evaluation ran (`eval.every=0`).", ""]
    return lines


def _chat_section(processor, und: str, gen: str) -> list[str]:
    """How to prompt the export (its chat template rendered for both tasks) and use it."""
    return [
        "## Chat format",
        "",
        "`processor.apply_chat_template` renders exactly what this model was trained on "
        "(`chat_template.jinja`, loaded by `JanusProcessor` and `AutoTokenizer` alike). Images in a user "
        "message become `<image_placeholder>`, which the processor expands to "
        "`<begin_of_image>` + "
        f"{processor.num_image_tokens} x `<image_placeholder>` + `<end_of_image>`; the processor "
        "adds BOS. A conversation with `add_generation_prompt=True`:",
        "",
        "```text",
        und,
        "```",
        "",
        'A text-to-image prompt: pass `generation_mode="image"` to `apply_chat_template` (no '
        "system prompt, ends with `<begin_of_image>`). Unlike the recipe in transformers' Janus "
        "documentation, do not pass it to the processor as well (`<begin_of_image>` would come "
        "twice), and do not leave it out (the prompt would carry the system prompt):",
        "",
        "```text",
        gen,
        "```",
        "",
        "## Usage",
        "",
        USAGE.format(model_dir=MODEL_DIR),
        "Or with janus_train: `janus-sample --model DIR understand --image a.png --question ...` "
        "and `janus-sample --model DIR generate --prompt ...` (same template). This directory is "
        "also the next stage's `model.init_from`.",
        "",
    ]


def model_card(
    spec: StageSpec,
    processor,
    step: int,
    export_dtype: torch.dtype | None = None,
    *,
    model: ModelConfig,
    deepspeed: DeepSpeedConfig,
    loss_reduction: str,
    seq_len: int,
    metrics_path: str | os.PathLike,
) -> str:
    """README.md text of the export of stage ``spec`` after ``step`` optimizer steps."""
    fmt = spec.prompt
    train, held = read_metrics(metrics_path)
    und, gen = _example(processor, fmt.style)
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: any-to-any",
        "tags: [janus, janus-pro, multimodal, text-to-image, janus_train]",
        "---",
        "",
        f"# {spec.experiment} — {spec.name} (step {step})",
        "",
        "A Janus model (`JanusForConditionalGeneration` + `JanusProcessor`, plain transformers) "
        f"trained with `janus_train`: {spec.name} of the `{spec.experiment}` experiment.",
        "",
        *_training_table(spec, step, model, deepspeed, loss_reduction, seq_len, export_dtype),
        "",
        "### Data",
        "",
        _sources(spec),
        *_metrics_section(train, held),
        *_chat_section(processor, und, gen),
    ]
    return "\n".join(lines)
