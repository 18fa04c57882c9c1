"""janus-sample on an export directory: prompts from the export's chat template equal the
training builders' and plain transformers' ``apply_chat_template`` + ``generate``, left-padded
batches equal unbatched runs (greedy), CFG image generation, the CLI in both modes."""

from __future__ import annotations

import copy
import dataclasses
import json
import random

import pytest
import torch
from PIL import Image

from janus_demo import world
from janus_train import sample as S
from janus_train.cli import sample as sample_cli
from janus_train.model.chat_template import PromptFormat, set_chat_template
from janus_train.model.tokenizer import resolve_special_tokens

SYSTEM = "You are a helpful language and vision assistant."


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    out = tmp_path_factory.mktemp("export") / "hf"
    model.save_pretrained(out)
    processor = copy.deepcopy(processor)
    set_chat_template(processor, PromptFormat("chat", "janus_pro", SYSTEM))
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def loaded(export_dir):
    return S.load(export_dir)


QUESTIONS = [
    "What color is the shape at the top left?",
    "How many?",
    "Where is the red circle? Describe the image in detail.",
]
PROMPTS = [
    "a red circle.",
    "a blue square at the top left and a green triangle at the bottom right.",
    "two",
]


def _images(n: int) -> list[Image.Image]:
    rng = random.Random(0)
    return [world.render(world.random_scene(rng, False)) for _ in range(n)]


def test_prompts_from_the_export_template_equal_the_training_builders(loaded):
    """Independent check: the sampler's prompts (the export's own template) are the prefixes the
    data builders train on; an explicit format overrides the export's template."""
    from janus_train.data.builders import build_conversation, build_generation
    from tests.conftest import tiny_run
    from tests.helpers import stage_context

    model, processor = loaded
    st = resolve_special_tokens(processor.tokenizer)
    ctx = stage_context(tiny_run(["stage=stage3", f"data.system_prompt={SYSTEM}"]), processor)
    ctx = dataclasses.replace(ctx, cfg_dropout=0.0, first_sentence_prob=0.0)
    g = build_generation(PROMPTS[1], ctx, random.Random(0), codes=[0] * ctx.num_image_tokens)
    ids = S.generation_inputs(processor, [PROMPTS[1]])["input_ids"][0].tolist()
    assert ids == g.input_ids[: g.input_ids.index(st.boi) + 1]
    c = build_conversation(
        [("user", "<image>\n" + QUESTIONS[0]), ("assistant", "red")], [None], ctx, "und"
    )
    ids = S.understanding_inputs(processor, _images(1), QUESTIONS[:1])["input_ids"][0].tolist()
    assert c.input_ids[: len(ids)] == ids and ids[1] != st.image  # system prompt first
    assert c.labels[len(ids)] != -100 and c.labels[len(ids) - 1] == -100

    ctx = dataclasses.replace(ctx, chat_template="janus", system_prompt=None)
    c = build_conversation(
        [("user", "<image>\n" + QUESTIONS[0]), ("assistant", "red")], [None], ctx, "und"
    )
    fmt = PromptFormat("chat", "janus", None)
    ids = S.understanding_inputs(processor, _images(1), QUESTIONS[:1], fmt)["input_ids"][0]
    assert c.input_ids[: len(ids)] == ids.tolist()
    bare = copy.copy(processor)
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        S.understanding_inputs(bare, _images(1), QUESTIONS[:1])


def test_plain_transformers_with_apply_chat_template_equals_janus_sample(loaded, export_dir):
    """A user of the export with nothing but transformers: apply_chat_template + generate give
    janus-sample's answers and (greedy, guided) image codes."""
    model, processor = loaded
    images = _images(3)
    ours = S.answer(model, processor, images, QUESTIONS, max_new_tokens=6)
    hf = []
    for im, q in zip(images, QUESTIONS):
        msgs = [
            {
                "role": "user",
                "content": [{"type": "image", "image": im}, {"type": "text", "text": q}],
            }
        ]
        inputs = processor.apply_chat_template(
            msgs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        hf.append(
            processor.decode(
                out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            ).strip()
        )
    assert hf == ours and len(set(ours)) > 1
    # the demo report's batched plain-transformers check (left padding from the processor)
    from janus_demo.report import plain_transformers_answers

    assert plain_transformers_answers(export_dir, images, QUESTIONS, 6, batch_size=3) == ours

    greedy = S.SampleConfig(guidance_scale=3.0, temperature=0.0)
    ours = S.generate_codes(model, processor, PROMPTS[:2], greedy)
    for p, codes in zip(PROMPTS, ours):
        msgs = [{"role": "user", "content": [{"type": "text", "text": p}]}]
        inputs = processor.apply_chat_template(
            msgs,
            add_generation_prompt=True,
            generation_mode="image",
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        out = model.generate(**inputs, generation_mode="image", do_sample=False, guidance_scale=3.0)
        assert torch.equal(out[0], codes)


def test_answers_batched_equal_unbatched(loaded):
    model, processor = loaded
    images = _images(3)
    batched = S.answer(model, processor, images, QUESTIONS, max_new_tokens=6, batch_size=3)
    single = [
        S.answer(model, processor, [im], [q], max_new_tokens=6)[0]
        for im, q in zip(images, QUESTIONS)
    ]
    assert batched == single
    assert len(set(single)) > 1  # the images and questions matter: the check can fail


def test_image_codes_batched_equal_unbatched(loaded):
    model, processor = loaded
    greedy = S.SampleConfig(guidance_scale=3.0, temperature=0.0, batch_size=3)
    batched = S.generate_codes(model, processor, PROMPTS, greedy)
    single = torch.cat([S.generate_codes(model, processor, [p], greedy) for p in PROMPTS])
    n = model.config.vision_config.num_image_tokens
    assert batched.shape == (3, n)
    assert torch.equal(batched, single)
    assert not torch.equal(batched[0], batched[1])  # prompts matter

    # Without the attention mask the padded prompt differs: what the masks protect against.
    inputs = S.generation_inputs(processor, PROMPTS)
    assert (inputs["attention_mask"] == 0).any()
    unmasked = model.generate(
        inputs=inputs["input_ids"],
        attention_mask=torch.ones_like(inputs["attention_mask"]),
        generation_mode="image",
        do_sample=False,
        guidance_scale=3.0,
    )
    assert not torch.equal(unmasked[0], single[0])


def test_sampling_several_images_per_prompt(loaded):
    model, processor = loaded
    cfg = S.SampleConfig(
        guidance_scale=5.0, temperature=1.0, top_k=8, top_p=0.9, num_images=3, batch_size=2, seed=1
    )
    codes = S.generate_codes(model, processor, PROMPTS, cfg)
    assert codes.shape[0] == 9 and int(codes.max()) < model.config.vq_config.num_embeddings
    assert torch.equal(codes, S.generate_codes(model, processor, PROMPTS, cfg))  # seeded
    images = S.decode_codes(model, codes)
    assert len(images) == 9 and images[0].size == (32, 32)
    with pytest.raises(ValueError, match="guidance_scale"):
        S.generate_codes(model, processor, PROMPTS, S.SampleConfig(guidance_scale=0.5))


@torch.no_grad()
def _greedy_cfg_by_hand(model, ids: list[int], pad: int, bos: int, boi: int, scale: float):
    """Independent greedy CFG decode: no cache, the whole sequence re-run every token, logits
    ``u + scale * (c - u)`` with the unconditional prompt = every token but BOS/BOI -> pad."""
    cond = torch.tensor([ids])
    uncond = torch.tensor([[t if t in (bos, boi) else pad for t in ids]])
    emb = model.get_input_embeddings()
    seqs = [emb(cond), emb(uncond)]
    out = []
    for _ in range(model.config.vision_config.num_image_tokens):
        c, u = (
            model.model.generation_head(
                model.model.language_model(inputs_embeds=e).last_hidden_state[:, -1]
            )
            for e in seqs
        )
        tok = int((u + scale * (c - u)).argmax(-1))
        out.append(tok)
        nxt = model.prepare_embeddings_for_image_generation(torch.tensor([[tok]]))
        seqs = [torch.cat([e, nxt], 1) for e in seqs]
    return out


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_guided_greedy_codes_equal_a_hand_written_cfg_decode(loaded, scale):
    """guidance_scale=1 is plain conditional decoding (no CFG); >1 mixes in the unconditional
    logits exactly as written in the Janus papers. Checked against a cache-free loop."""
    model, processor = loaded
    st = resolve_special_tokens(processor.tokenizer)
    fmt = PromptFormat()
    greedy = S.SampleConfig(guidance_scale=scale, temperature=0.0)
    for p in PROMPTS[:2]:
        ids = S.generation_inputs(processor, [p], fmt)["input_ids"][0].tolist()
        got = S.generate_codes(model, processor, [p], greedy, fmt)[0].tolist()
        assert got == _greedy_cfg_by_hand(model, ids, st.pad, st.bos, st.boi, scale)
    one = S.generate_codes(
        model, processor, PROMPTS[:2], dataclasses.replace(greedy, guidance_scale=1.0), fmt
    )
    three = S.generate_codes(
        model, processor, PROMPTS[:2], dataclasses.replace(greedy, guidance_scale=3.0), fmt
    )
    assert not torch.equal(one, three)  # the scale matters: the check can fail


def test_cli_both_modes(export_dir, tmp_path, capsys):
    img = tmp_path / "a.png"
    _images(1)[0].save(img)
    sample_cli.main(
        [
            "--model",
            str(export_dir),
            "understand",
            "--image",
            str(img),
            "--question",
            QUESTIONS[0],
            "--question",
            QUESTIONS[1],
            "--max-new-tokens",
            "4",
        ]
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["question"] for x in lines] == QUESTIONS[:2]
    out = tmp_path / "gen"
    sample_cli.main(
        [
            "--model",
            str(export_dir),
            "generate",
            "--prompt",
            PROMPTS[0],
            "--prompt",
            PROMPTS[1],
            "--n",
            "2",
            "--guidance",
            "4",
            "--top-k",
            "16",
            "--out",
            str(out),
        ]
    )
    pngs = sorted(p.name for p in out.glob("prompt*.png"))
    assert pngs == ["prompt000_00.png", "prompt000_01.png", "prompt001_00.png", "prompt001_01.png"]
    assert Image.open(out / "grid.png").size[0] > 2 * 32
