"""The generated chat template against the training sample builders: ``apply_chat_template`` +
the processor give the builders' token ids (prompt without the answer, whole conversations, the
SFT loss mask as HF's assistant mask) for every conversation shape, both templates, with and
without images and system prompts; text-to-image prompts end with ``<begin_of_image>``."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from PIL import Image

from janus_train.config import prompt_format
from janus_train.data.builders import build_caption_plain, build_conversation, build_generation
from janus_train.model.chat_template import PromptFormat
from janus_train.model.tokenizer import resolve_special_tokens
from tests.conftest import tiny_run
from tests.helpers import stage_context

IGNORE = -100
SYSTEM = "You are a helpful language and vision assistant."


@pytest.fixture(scope="module")
def processor(tiny_model_and_processor, tiny_workdir):
    from janus_train.model.build import load_processor

    return load_processor(tiny_workdir / "tokenizer")  # own copy: the tests set its template


def _img(i: int) -> Image.Image:
    return Image.new("RGB", (40 + i, 30), (60 * i % 256, 255 - 40 * i % 256, 90))


def _image(i):
    return {"type": "image", "image": _img(i)}


def _text(t):
    return {"type": "text", "text": t}


# (HF messages, the same conversation as the builders' (role, text) turns, number of images);
# every conversation ends with an assistant answer.
SHAPES = {
    "one_image": (
        [
            {"role": "user", "content": [_image(0), _text("What color is the circle?")]},
            {"role": "assistant", "content": "red"},
        ],
        [("user", "<image>\nWhat color is the circle?"), ("assistant", "red")],
        1,
    ),
    "multi_turn_images": (
        [
            {"role": "user", "content": [_image(0), _text("What is this?")]},
            {"role": "assistant", "content": [_text("a red circle.")]},
            {"role": "user", "content": [_text("And here?"), _image(1), _image(2)]},
            {"role": "assistant", "content": "two blue squares."},
        ],
        [
            ("user", "<image>\nWhat is this?"),
            ("assistant", "a red circle."),
            ("user", "And here?\n<image>\n<image>"),
            ("assistant", "two blue squares."),
        ],
        3,
    ),
    "string_markers": (
        [
            {"role": "user", "content": "<image>\nDescribe the image in detail."},
            {"role": "assistant", "content": "a green star at the top left."},
        ],
        [
            ("user", "<image>\nDescribe the image in detail."),
            ("assistant", "a green star at the top left."),
        ],
        1,
    ),
    "text_only": (
        [
            {"role": "user", "content": "how many shapes are there?"},
            {"role": "assistant", "content": "three"},
            {"role": "user", "content": [_text("what color"), _text("is the star?")]},
            {"role": "assistant", "content": "yellow"},
        ],
        [
            ("user", "how many shapes are there?"),
            ("assistant", "three"),
            ("user", "what color is the star?"),
            ("assistant", "yellow"),
        ],
        0,
    ),
    "surrounding_whitespace": (
        [
            {"role": "system", "content": "  Be brief.\n"},
            {"role": "user", "content": [_image(2), _text("  what shape?  ")]},
            {"role": "assistant", "content": " a star\n"},
            {"role": "user", "content": "\n and its color? "},
            {"role": "assistant", "content": [_text(" yellow ")]},
        ],
        [
            ("system", "  Be brief.\n"),
            ("user", "<image>\n  what shape?  "),
            ("assistant", " a star\n"),
            ("user", "\n and its color? "),
            ("assistant", " yellow "),
        ],
        1,
    ),
    "explicit_system": (
        [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": [_image(1), _text("Which shape?")]},
            {"role": "assistant", "content": "square"},
        ],
        [
            ("system", "Answer in one word."),
            ("user", "<image>\nWhich shape?"),
            ("assistant", "square"),
        ],
        1,
    ),
}


def _ctx(processor, template: str, system: str | None, stage: str = "stage3"):
    return dataclasses.replace(
        stage_context(tiny_run([f"stage={stage}"]), processor),
        chat_template=template,
        system_prompt=system,
        sft=True,
        cfg_dropout=0.0,
        first_sentence_prob=0.0,
    )


def _hf(processor, messages, **kw) -> dict:
    """``apply_chat_template`` ids; images of string contents (``<image>`` markers) passed
    beside the messages, as a user of that convention must."""
    n = sum(m["content"].count("<image>") for m in messages if isinstance(m["content"], str))
    if n:
        kw["processor_kwargs"] = {"images": [_img(i) for i in range(n)]}
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
    return {
        k: (v[0].tolist() if hasattr(v[0], "tolist") else list(v[0]))
        for k, v in out.items()
        if k != "pixel_values"
    }


@pytest.mark.parametrize("system", [None, SYSTEM])
@pytest.mark.parametrize("template", ["janus", "janus_pro"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_template_token_ids_equal_the_builders(processor, shape, template, system):
    messages, turns, n_img = SHAPES[shape]
    ctx = _ctx(processor, template, system)
    processor.chat_template = PromptFormat("chat", template, system).jinja()
    images = [np.zeros((ctx.image_size, ctx.image_size, 3), np.uint8)] * n_img
    full = build_conversation(turns, images, ctx, "und")

    # The whole conversation: same ids, and HF's assistant mask is the SFT loss mask.
    hf = _hf(processor, messages, return_assistant_tokens_mask=True)
    assert hf["input_ids"] == full.input_ids
    assert hf["assistant_masks"] == [int(lb != IGNORE) for lb in full.labels]

    # The prompt: the conversation without its last answer, ending with the assistant role.
    answer = ctx.enc(" " + turns[-1][1].strip()) + [ctx.st.eos]
    prompt = _hf(processor, messages[:-1], add_generation_prompt=True)["input_ids"]
    assert prompt == full.input_ids[: -len(answer)]
    assert full.labels[len(prompt) - 1] == IGNORE and full.labels[len(prompt)] != IGNORE


@pytest.mark.parametrize("template", ["janus", "janus_pro"])
def test_text_to_image_prompt_equals_the_generation_builder(processor, template):
    """No system prompt, ends with <begin_of_image>, in the chat (qa) and plain formats."""
    st = resolve_special_tokens(processor.tokenizer)
    caption = "a blue square at the top left and a green triangle."
    for stage, style in (("stage2", "chat"), ("stage1", "plain")):
        ctx = _ctx(processor, template, SYSTEM, stage)
        g = build_generation(caption, ctx, random.Random(0), codes=[0] * ctx.num_image_tokens)
        want = g.input_ids[: g.input_ids.index(st.boi) + 1]
        processor.chat_template = PromptFormat(style, template, SYSTEM).jinja()
        got = _hf(
            processor,
            [{"role": "user", "content": [_text(caption)]}],
            add_generation_prompt=True,
            generation_mode="image",
        )["input_ids"]
        assert got == want and got[-1] == st.boi and got.count(st.bos) == 1
        if style == "chat":  # the understanding prompt of the same message keeps the system
            und = _hf(
                processor, [{"role": "user", "content": caption}], add_generation_prompt=True
            )["input_ids"]
            assert und[: len(ctx.enc(SYSTEM)) + 1] == [st.bos] + ctx.enc(SYSTEM)


def test_plain_format_equals_the_stage1_caption_builder(processor):
    ctx = _ctx(processor, "janus_pro", None, "stage1")
    s = build_caption_plain("a red circle.", np.zeros((4, 4, 3), np.uint8), ctx)
    processor.chat_template = PromptFormat("plain").jinja()
    messages = [
        {"role": "user", "content": [_image(0)]},
        {"role": "assistant", "content": "a red circle."},
    ]
    hf = _hf(processor, messages, return_assistant_tokens_mask=True)
    assert hf["input_ids"] == s.input_ids
    assert hf["assistant_masks"] == [int(lb != IGNORE) for lb in s.labels]
    prompt = _hf(processor, messages[:1], add_generation_prompt=True)["input_ids"]
    assert prompt == s.input_ids[: s.labels.index(next(lb for lb in s.labels if lb != IGNORE))]


def test_role_order_is_checked_and_run_format_follows_the_config(processor):
    processor.chat_template = PromptFormat().jinja()
    with pytest.raises(Exception, match="expected a user message, got assistant"):
        processor.apply_chat_template([{"role": "assistant", "content": "hi"}])
    assert prompt_format(tiny_run(["stage=stage1"])).style == "plain"
    fmt = prompt_format(
        tiny_run(["stage=stage3", "experiment.chat_template=janus", "data.system_prompt=Be brief."])
    )
    assert fmt == PromptFormat("chat", "janus", "Be brief.")
    with pytest.raises(ValueError, match="chat template 'pro'"):
        PromptFormat("chat", "pro")


# A released checkpoint's template, written differently from ours (HF's converted Janus-Pro
# repos: roles in the template, the system prompt prepended by the processor in text mode,
# <begin_of_image> appended by the processor in image mode).
RELEASED = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{{ '<|User|>: ' }}"
    "{%- for c in m.content -%}"
    "{%- if c.type == 'image' -%}{{ '<image_placeholder>' ~ ('\\n' if not loop.last else '') }}"
    "{%- else -%}{{ c.text }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if not loop.last or add_generation_prompt -%}{{ '\\n\\n' }}{%- endif -%}"
    "{%- else -%}{{ '<|Assistant|>: ' ~ m.content[0].text ~ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|Assistant|>:' }}{%- endif -%}"
)


def test_a_released_template_is_kept_only_when_it_renders_the_trained_format(processor):
    from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

    from janus_train.model.chat_template import set_chat_template

    official = DEFAULT_SYSTEM_PROMPT.removesuffix("\n\n")
    for fmt, kept in (
        (PromptFormat("chat", "janus_pro", official), True),
        (PromptFormat("chat", "janus_pro", None), False),  # no system prompt trained
        (PromptFormat("chat", "janus", official), False),  # other roles
        (PromptFormat("plain"), False),
    ):
        processor.chat_template, processor.use_default_system_prompt = RELEASED, True
        processor.tokenizer.chat_template = None
        assert set_chat_template(processor, fmt) is not kept
        if kept:
            assert processor.chat_template == RELEASED and processor.use_default_system_prompt
        else:
            assert processor.chat_template == processor.tokenizer.chat_template == fmt.jinja()
            assert not processor.use_default_system_prompt
        # either way: the processor's prompts are the trained ones
        ctx = _ctx(processor, fmt.chat_template, fmt.system_prompt)
        msgs = [{"role": "user", "content": [_image(0), _text("What is this?")]}]
        c = build_conversation(
            [("user", "<image>\nWhat is this?"), ("assistant", "x")], [None], ctx, "und"
        )
        text = processor.apply_chat_template(msgs, add_generation_prompt=True)
        ids = processor(text=text, images=[_img(0)])["input_ids"][0]
        if fmt.style == "chat":
            assert list(ids) == c.input_ids[: len(c.input_ids) - len(ctx.enc(" x")) - 1]
