"""Stage framing as the papers write it (Janus §4.2; ``stage.und_format`` / ``gen_format``):
the presets' stage-2 samples, built from records by the loader's own context, equal sequences
written out here by hand: ``<image>Describe the image in detail.<caption>``,
``<question><answer>`` and ``<caption><image>``, no chat roles, no system prompt; stage 1 is
``<image><caption>``, stage 3 the chat template with DeepSeek's system prompt (unchanged); the
tiny demo keeps the chat framing in stage 2. A stage-2 export's chat template renders what the
stage trained."""

from __future__ import annotations

import dataclasses
import io
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from janus_train.config import compose, prompt_format, to_run_config
from janus_train.data.builders import build_conversation, build_generation, record_to_samples
from janus_train.model.chat_template import PromptFormat
from tests.conftest import tiny_run
from tests.helpers import stage_context

X = -100
PRESETS = ["janus_1.3b", "janus_pro_1b", "janus_pro_7b"]
ROLES = {"janus_1.3b": ("User", "Assistant")}  # Janus-Pro: <|User|> / <|Assistant|>
# written out here, independently of the code's constants
SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)
CAPTION = "A red circle at the top left. A blue square below it."
CONVERSATION = [
    {"from": "human", "value": "<image>\nWhich bar is the tallest?"},
    {"from": "gpt", "value": "the blue one"},
    {"from": "human", "value": "And the shortest"},
    {"from": "gpt", "value": "red"},
]


@pytest.fixture(scope="module")
def proc(tiny_model_and_processor):
    return tiny_model_and_processor[1]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 12), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _npy(codes: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, codes)
    return buf.getvalue()


def preset(exp: str, stage: str, proc, **kw):
    """The preset's BuildContext from ``loader.build_context`` (its real image-token count; the
    tiny tokenizer, which has the Janus special tokens)."""
    run = to_run_config(compose([f"experiment={exp}", f"stage={stage}"]))
    fake = SimpleNamespace(
        tokenizer=proc.tokenizer,
        image_processor=proc.image_processor,
        num_image_tokens=run.model.num_image_tokens,
    )
    ctx = stage_context(run, fake)
    return run, dataclasses.replace(ctx, cfg_dropout=0.0, first_sentence_prob=0.0, **kw)


def _formats(run) -> tuple[str, str]:
    """The stage's understanding and text-to-image framing."""
    fmt = prompt_format(run)
    return fmt.style, fmt.gen_style


def samples(fmt: str, task: str, members: dict, ctx) -> list:
    return record_to_samples(members, fmt, task, ctx, random.Random(0))


def enc(proc, text: str) -> list[int]:
    return proc.tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("exp", PRESETS)
def test_stage2_presets_build_the_papers_sequences(proc, exp):
    run, ctx = preset(exp, "stage2", proc)
    st, n = ctx.st, run.model.num_image_tokens
    assert (*_formats(run), run.stage.sft) == ("qa", "plain", False)
    assert run.data.system_prompt == SYSTEM  # configured, and still not used in stage 2
    img = [st.boi] + [st.image] * n + [st.eoi]

    # <image>Describe the image in detail.<caption>: the question context only
    (s,) = samples("caption", "understanding", {"png": _png(), "txt": CAPTION.encode()}, ctx)
    q = enc(proc, "\nDescribe the image in detail.")
    ans = enc(proc, " " + CAPTION) + [st.eos]
    assert s.input_ids == [st.bos] + img + q + ans
    assert s.labels == [X] * (1 + len(img) + len(q)) + ans

    # <question><answer> (interleaved, tables and charts): no roles, no system prompt (the
    # record's own system turn dropped), every text token supervised in pretraining
    conv = [{"from": "system", "value": "Be brief."}, *CONVERSATION]
    (c,) = samples(
        "conversation",
        "understanding",
        {"png": _png(), "json": json.dumps({"conversations": conv}).encode()},
        ctx,
    )
    q1, a1 = enc(proc, "\nWhich bar is the tallest?"), enc(proc, " the blue one") + [st.eos]
    q2, a2 = enc(proc, "And the shortest"), enc(proc, " red") + [st.eos]
    assert c.input_ids == [st.bos] + img + q1 + a1 + q2 + a2
    assert c.labels == [X] * (1 + len(img)) + q1 + a1 + q2 + a2

    # <caption><image>, and the CFG-dropped form: every prompt token pad
    codes = np.arange(n, dtype=np.int64) % 7
    t2i = {"txt": CAPTION.encode(), "codes.npy": _npy(codes)}
    (g,) = samples("caption", "generation", t2i, ctx)
    p = enc(proc, CAPTION)
    assert g.input_ids == [st.bos] + p + [st.boi] + [st.pad] * n
    assert g.image_codes == [X] * (len(p) + 2) + codes.tolist()
    assert set(g.labels) == {X}
    (u,) = samples("caption", "generation", t2i, dataclasses.replace(ctx, cfg_dropout=1.0))
    assert u.input_ids == [st.bos] + [st.pad] * len(p) + [st.boi] + [st.pad] * n

    # text: the document, nothing added
    (t,) = samples("text", "text", {"txt": b"Plain text, as it is."}, ctx)
    assert t.input_ids == [st.bos] + enc(proc, "Plain text, as it is.") + [st.eos]


@pytest.mark.parametrize("exp", ["janus_1.3b", "janus_pro_1b"])  # both role sets
def test_stage1_and_stage3_framing(proc, exp):
    u, a = ROLES.get(exp, ("<|User|>", "<|Assistant|>"))
    run, ctx = preset(exp, "stage1", proc)
    st, n = ctx.st, run.model.num_image_tokens
    img = [st.boi] + [st.image] * n + [st.eoi]
    assert _formats(run) == ("plain", "plain")
    (s,) = samples("caption", "understanding", {"png": _png(), "txt": CAPTION.encode()}, ctx)
    assert s.input_ids == [st.bos] + img + enc(proc, CAPTION) + [st.eos]

    run, ctx = preset(exp, "stage3", proc)
    assert (*_formats(run), run.stage.sft) == ("chat", "chat", True)
    (s,) = samples("caption", "understanding", {"png": _png(), "txt": CAPTION.encode()}, ctx)
    head = enc(proc, SYSTEM + "\n\n") + enc(proc, f"{u}: ")
    q = enc(proc, f"\nDescribe the image in detail.\n\n{a}:")
    ans = enc(proc, " " + CAPTION) + [st.eos]
    assert s.input_ids == [st.bos] + head + img + q + ans
    assert s.labels == [X] * (1 + len(head) + len(img) + len(q)) + ans
    codes = np.zeros(n, dtype=np.int64)
    (g,) = samples(
        "caption", "generation", {"txt": CAPTION.encode(), "codes.npy": _npy(codes)}, ctx
    )
    p = enc(proc, f"{u}: {CAPTION}\n\n{a}:")
    assert g.input_ids[: len(p) + 2] == [st.bos] + p + [st.boi]


def test_chat_framing_stays_an_option_and_the_demo_keeps_it(proc):
    _, ctx = preset("janus_pro_1b", "stage2", proc)
    chat = to_run_config(
        compose(
            [
                "experiment=janus_pro_1b",
                "stage=stage2",
                "experiment.stage2.und_format=chat",
                "experiment.stage2.gen_format=chat",
            ]
        )
    )
    assert _formats(chat) == ("chat", "chat")
    ctx = dataclasses.replace(ctx, und_format="chat", gen_format="chat")
    (s,) = samples("caption", "understanding", {"png": _png(), "txt": CAPTION.encode()}, ctx)
    assert s.input_ids[1 : 1 + len(enc(proc, SYSTEM))] == enc(proc, SYSTEM)
    # the tiny demo: chat framing in stage 2 (its held-out figures were measured so)
    tiny = {s: tiny_run([f"stage={s}"]) for s in ("stage1", "stage2", "stage3")}
    assert {s: _formats(r) for s, r in tiny.items()} == {
        "stage1": ("plain", "plain"),
        "stage2": ("chat", "chat"),
        "stage3": ("chat", "chat"),
    }
    with pytest.raises(Exception, match="und_format"):
        compose(["experiment.stage2.und_format=markdown"])


def _img(i: int) -> Image.Image:
    return Image.new("RGB", (40 + i, 30), (60 * i % 256, 90, 90))


def _image(i: int) -> dict:
    return {"type": "image", "image": _img(i)}


def _text(t: str) -> dict:
    return {"type": "text", "text": t}


# (HF messages, the same conversation as the builders' turns, number of images)
SHAPES = {
    "caption_qa": (
        [
            {"role": "user", "content": [_image(0), _text("Describe the image in detail.")]},
            {"role": "assistant", "content": CAPTION},
        ],
        [("user", "<image>\nDescribe the image in detail."), ("assistant", CAPTION)],
        1,
    ),
    "multi_turn_system_images": (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [_image(0), _text("  What is this? ")]},
            {"role": "assistant", "content": [_text("a red circle.")]},
            {"role": "user", "content": [_text("And here?"), _image(1)]},
            {"role": "assistant", "content": " two blue squares\n"},
            {"role": "user", "content": "how many shapes"},
            {"role": "assistant", "content": "three"},
        ],
        [
            ("system", "Be brief."),
            ("user", "<image>\n  What is this? "),
            ("assistant", "a red circle."),
            ("user", "And here?\n<image>"),
            ("assistant", " two blue squares\n"),
            ("user", "how many shapes"),
            ("assistant", "three"),
        ],
        2,
    ),
}


def _hf(processor, messages, **kw) -> dict:
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
    return {k: list(v[0]) for k, v in out.items() if k != "pixel_values"}


def _paper_stage2_run():
    # the tiny model with conf/stage/stage2.yaml's framing (the tiny experiment overrides it)
    return tiny_run(
        ["stage=stage2", "experiment.stage2.und_format=null", "experiment.stage2.gen_format=null"]
    )


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_stage2_export_template_renders_what_stage2_trained(shape, tiny_workdir):
    from janus_train.model.build import load_processor

    processor = load_processor(tiny_workdir / "tokenizer")  # own copy: the test sets its template
    run = _paper_stage2_run()
    fmt = prompt_format(run)
    assert fmt == PromptFormat("qa", "janus_pro", None, "plain")  # tiny: no system prompt
    processor.chat_template = fmt.jinja()
    ctx = dataclasses.replace(stage_context(run, processor), sft=True)
    messages, turns, n_img = SHAPES[shape]
    images = [np.zeros((ctx.image_size, ctx.image_size, 3), np.uint8)] * n_img
    full = build_conversation(turns, images, ctx, "und")
    text = processor.tokenizer.decode(full.input_ids)
    assert not any(w in text for w in ("helpful", "Be brief", "User", "Assistant"))
    hf = _hf(processor, messages, return_assistant_tokens_mask=True)
    assert hf["input_ids"] == full.input_ids
    assert hf["assistant_masks"] == [int(lb != X) for lb in full.labels]
    prompt = _hf(processor, messages[:-1], add_generation_prompt=True)["input_ids"]
    assert full.labels[len(prompt) - 1] == X and full.labels[len(prompt)] != X
    assert prompt == full.input_ids[: len(prompt)]
    # text-to-image: <caption><begin_of_image>
    g = build_generation(CAPTION, ctx, random.Random(0), codes=[0] * ctx.num_image_tokens)
    got = _hf(
        processor,
        [{"role": "user", "content": [_text(CAPTION)]}],
        add_generation_prompt=True,
        generation_mode="image",
    )["input_ids"]
    assert got == g.input_ids[: g.input_ids.index(ctx.st.boi) + 1]
    assert got == [ctx.st.bos] + ctx.enc(CAPTION) + [ctx.st.boi]
