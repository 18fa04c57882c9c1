"""Answer questions about images and generate images from prompts with any HF-format export
directory (``JanusForConditionalGeneration`` + ``JanusProcessor``, local): the library behind
``janus-sample`` (:mod:`janus_train.cli.sample`) and the evaluation's answers and images.

Prompts come from the export's chat template (``processor.apply_chat_template``, the template
every export carries, generated from the training builders' strings by
``janus_train.model.chat_template``), so a model is asked in the format it was trained on and
exactly as plain transformers would ask it; ``--style/--chat-template/--system-prompt`` override
it (exports without a template). Understanding: one user message ``[image, question]`` (plain,
stage-1 exports: pass ``--question ""`` to caption); text-to-image: ``[prompt]`` rendered with
``generation_mode="image"`` (no system prompt), ending with ``<begin_of_image>``.

Batches are left-padded with the pad token and carry attention masks. Text answers use HF
``generate``; images use HF ``generate(generation_mode="image")``, which doubles the batch for
classifier-free guidance (unconditional rows: every token but BOS/BOI replaced by pad, masks
kept) and decodes with the image head. It passes no position ids, so a left-padded row's
positions are shifted by its pad count; RoPE attention depends only on position differences,
so the padded rows still match unbatched runs (tested).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import LogitsProcessorList

from janus_train.data.preprocess import to_uint8
from janus_train.model.chat_template import PromptFormat
from janus_train.model.tokenizer import BOI_TOKEN, resolve_special_tokens

__all__ = [
    "answer",
    "generate_codes",
    "generation_inputs",
    "load",
    "understanding_inputs",
]


def chat_template_of(processor, fmt: PromptFormat | None = None) -> str:
    """The Jinja template prompts are rendered with: ``fmt``'s, else the processor's own."""
    if fmt is not None:
        return fmt.jinja()
    if not getattr(processor, "chat_template", None):
        raise ValueError(
            "the processor has no chat template (an export from before janus_train wrote one): "
            "give the format, e.g. --style chat --chat-template janus_pro"
        )
    return processor.chat_template


def _processor_for(processor, fmt: PromptFormat | None):
    """With an explicit format the template carries the system prompt: the processor must not
    prepend HF's default one (released checkpoints set ``use_default_system_prompt``)."""
    if fmt is None or not getattr(processor, "use_default_system_prompt", False):
        return processor
    p = copy.copy(processor)
    p.use_default_system_prompt = False
    return p


def understanding_inputs(
    processor, images: list[Image.Image], questions: list[str], fmt: PromptFormat | None = None
):
    """Left-padded ``input_ids``, ``attention_mask``, ``pixel_values`` for one image + question
    each, ending where the answer starts."""
    tmpl = chat_template_of(processor, fmt)
    texts = []
    for q in questions:
        content = [{"type": "image"}] + ([{"type": "text", "text": q}] if q else [])
        texts.append(
            processor.apply_chat_template(
                [{"role": "user", "content": content}],
                chat_template=tmpl,
                add_generation_prompt=True,
            )
        )
    return _processor_for(processor, fmt)(
        text=texts,
        images=[im.convert("RGB") for im in images],
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )


def generation_inputs(processor, prompts: list[str], fmt: PromptFormat | None = None):
    """Left-padded ``input_ids``, ``attention_mask`` of text-to-image prompts ending with
    ``<begin_of_image>``."""
    tmpl = chat_template_of(processor, fmt)
    # The processor's image mode appends <begin_of_image> (and skips HF's default system
    # prompt); our templates render it already, released ones do not.
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": p}]}],
            chat_template=tmpl,
            add_generation_prompt=True,
            generation_mode="image",
        ).removesuffix(BOI_TOKEN)
        for p in prompts
    ]
    return _processor_for(processor, fmt)(
        text=texts,
        generation_mode="image",
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )


def unwrap(model):
    """The ``JanusForConditionalGeneration`` inside a ``JanusTrainModel`` (or itself)."""
    return getattr(model, "janus", model)


def load(model_dir: str | os.PathLike, device: str = "cpu", dtype=torch.float32):
    """``(model, processor)`` from a local export directory, in eval mode."""
    from transformers import JanusForConditionalGeneration

    from janus_train.model.build import load_processor, set_generation_config

    processor = load_processor(model_dir)  # checks the tokenizer before the model loads
    model = JanusForConditionalGeneration.from_pretrained(
        str(model_dir), local_files_only=True, dtype=dtype
    ).to(device)
    set_generation_config(model, resolve_special_tokens(processor.tokenizer))
    model.eval()
    return model, processor


@torch.no_grad()
def answer(
    model,
    processor,
    images: list[Image.Image],
    questions: list[str],
    fmt: PromptFormat | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers, one per (image, question), in left-padded batches; prompts from the
    processor's chat template, or from ``fmt`` when given."""
    model = unwrap(model)
    tok = processor.tokenizer
    st = resolve_special_tokens(tok)
    param = next(model.parameters())
    out: list[str] = []
    for i in range(0, len(questions), batch_size):
        qs, ims = questions[i : i + batch_size], images[i : i + batch_size]
        inputs = understanding_inputs(processor, ims, qs, fmt)
        ids = inputs["input_ids"]
        gen = model.generate(
            input_ids=ids.to(param.device),
            attention_mask=inputs["attention_mask"].to(param.device),
            pixel_values=inputs["pixel_values"].to(param.device, param.dtype),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=st.eos,
            pad_token_id=st.pad,
            generation_mode="text",
        )
        new = gen[:, ids.shape[1] :]
        out += [tok.decode(row, skip_special_tokens=True).strip() for row in new.tolist()]
    return out


@dataclass
class SampleConfig:
    """Image sampling settings (official defaults: CFG 5, temperature 1)."""

    guidance_scale: float = 5.0
    """Classifier-free guidance scale, >= 1; 1 = no guidance (the conditional rows alone
    decide: ``ConditionalOnly``)."""
    temperature: float = 1.0
    """0 = greedy."""
    top_k: int = 0
    """0 = off."""
    top_p: float = 1.0
    num_images: int = 1
    """Images per prompt."""
    batch_size: int = 16
    """Prompts per generate call."""
    seed: int = 0


class ConditionalOnly:
    """Logits processor for HF's image ``generate`` at guidance scale 1 (= no guidance): HF
    always runs the conditional and unconditional rows but only installs its CFG processor,
    which halves the batch, for scales > 1; this keeps the conditional half."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores[: scores.shape[0] // 2]


@torch.no_grad()
def generate_codes(
    model,
    processor,
    prompts: list[str],
    cfg: SampleConfig | None = None,
    fmt: PromptFormat | None = None,
) -> torch.Tensor:
    """(len(prompts) * num_images, num_image_tokens) VQ codes, prompt-major order."""
    model = unwrap(model)
    cfg = cfg or SampleConfig()
    if cfg.guidance_scale < 1:
        raise ValueError(f"guidance_scale={cfg.guidance_scale}: must be >= 1 (1 = no guidance)")
    device = next(model.parameters()).device
    greedy = cfg.temperature <= 0
    sampling = (
        {}
        if greedy
        else {
            "temperature": cfg.temperature,
            "top_k": cfg.top_k if cfg.top_k > 0 else None,
            "top_p": cfg.top_p if cfg.top_p < 1 else None,
        }
    )
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    outs = []
    for i in range(0, len(prompts), cfg.batch_size):
        inputs = generation_inputs(processor, prompts[i : i + cfg.batch_size], fmt)
        # torch.multinomial inside HF generate draws from the global RNG: seed it per batch
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        codes = model.generate(
            inputs=inputs["input_ids"].to(device),
            attention_mask=inputs["attention_mask"].to(device),
            generation_mode="image",
            do_sample=not greedy,
            guidance_scale=cfg.guidance_scale,
            logits_processor=LogitsProcessorList(
                [ConditionalOnly()] if cfg.guidance_scale == 1 else []
            ),
            num_return_sequences=cfg.num_images,
            **sampling,
        )
        outs.append(codes.cpu())
    return torch.cat(outs)


@torch.no_grad()
def decode_codes(model, codes: torch.Tensor) -> list[Image.Image]:
    """VQ-decode (N, num_image_tokens) codes into PIL images."""
    model = unwrap(model)
    device = next(model.parameters()).device
    px = model.decode_image_tokens(codes.to(device)).float().cpu()  # (N, H, W, 3) in [-1, 1]
    return [Image.fromarray(a) for a in to_uint8(px).numpy()]


def generate_images(model, processor, prompts, cfg=None, fmt=None) -> list[Image.Image]:
    return decode_codes(model, generate_codes(model, processor, prompts, cfg, fmt))


def image_grid(images: list[Image.Image], cols: int, scale: int = 1, pad: int = 2) -> Image.Image:
    """Tile images (same size) into one image with a white gap."""
    w, h = images[0].size
    w, h = w * scale, h * scale
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im.resize((w, h), Image.NEAREST), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid
