"""The training forward against independent computations: HF's own loss for understanding,
module-by-module CE for generation, per-sample equality in a mixed padded batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from janus_train.batch import count_supervised
from janus_train.model import JanusTrainModel, resolve_special_tokens
from tests.helpers import (
    IGN,
    check_packed_row_equals_samples_alone,
    collate,
    gen_sample,
    text_sample,
    token_ids,
    und_sample,
)


@pytest.fixture()
def setup(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    model.eval()
    tok = processor.tokenizer
    st = resolve_special_tokens(tok)
    return model, tok, st


def test_understanding_loss_equals_hf_loss(setup):
    model, tok, st = setup
    n_img = model.config.vision_config.num_image_tokens
    size = model.config.vision_config.image_size
    torch.manual_seed(1)
    images = torch.randn(2, 3, size, size)
    samples = [und_sample(tok, st, n_img), und_sample(tok, st, n_img, "how many shapes", "two")]
    batch = collate(samples, st.pad, images)
    with torch.no_grad():
        out = JanusTrainModel(model)(batch)
        hf = model(
            input_ids=batch["input_ids"],
            pixel_values=images,
            attention_mask=batch["attention_mask"],
            labels=batch["labels"].masked_fill(batch["attention_mask"] == 0, IGN),
        )
    n = out["n_tokens"][1].item()
    assert n == sum(len(token_ids(tok, a)) + 1 for a in ("red", "two"))
    assert out["n_tokens"][0] == 0 and out["n_tokens"][2] == 0
    torch.testing.assert_close(out["loss_sum"][1] / n, hf.loss, rtol=1e-5, atol=1e-6)


def test_generation_loss_equals_module_by_module_ce(setup):
    model, tok, st = setup
    n_img = model.config.vision_config.num_image_tokens
    n_codes = model.config.vq_config.num_embeddings
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, n_codes, (n_img,), generator=g)
    s = gen_sample(tok, st, codes.tolist())
    batch = collate([s], st.pad)
    with torch.no_grad():
        out = JanusTrainModel(model)(batch)
        head = torch.tensor(s["ids"][: len(s["ids"]) - n_img])
        inner = model.model
        text_emb = inner.language_model.embed_tokens(head)
        img_emb = inner.generation_aligner(inner.generation_embeddings(codes))
        h = inner.language_model(
            inputs_embeds=torch.cat([text_emb, img_emb])[None]
        ).last_hidden_state[0]
        # position of <begin_of_image> predicts code 0; code i predicts code i + 1
        logits = inner.generation_head(h[len(head) - 1 : len(head) - 1 + n_img])
        ref = F.cross_entropy(logits, codes, reduction="sum")
    assert out["n_tokens"].tolist() == [0, 0, n_img]
    torch.testing.assert_close(out["loss_sum"][2], ref, rtol=1e-5, atol=1e-5)
    # codes are never predicted by lm_head nor embedded with the text table
    assert out["loss_sum"][0] == 0 and out["loss_sum"][1] == 0


def test_codes_from_pixels_match_precomputed_codes(setup):
    model, tok, st = setup
    n_img = model.config.vision_config.num_image_tokens
    size = model.config.vision_config.image_size
    torch.manual_seed(3)
    px = torch.rand(1, 3, size, size) * 2 - 1
    tm = JanusTrainModel(model)
    codes = tm.encode_images(px)[0]
    pre = collate([gen_sample(tok, st, codes.tolist())], st.pad)
    lazy = collate([gen_sample(tok, st, [-1] * n_img)], st.pad)
    lazy["gen_pixel_values"] = px
    with torch.no_grad():
        a, b = tm(pre), tm(lazy)
    torch.testing.assert_close(a["loss_sum"], b["loss_sum"])
    assert a["n_tokens"].tolist() == b["n_tokens"].tolist()


def test_mixed_padded_batch_equals_each_sample_alone(setup):
    model, tok, st = setup
    n_img = model.config.vision_config.num_image_tokens
    size = model.config.vision_config.image_size
    torch.manual_seed(4)
    img = torch.randn(1, 3, size, size)
    codes = torch.randint(0, model.config.vq_config.num_embeddings, (n_img,)).tolist()
    samples = [
        text_sample(tok, st),
        und_sample(tok, st, n_img),
        gen_sample(tok, st, codes),
        text_sample(tok, st, "two small stars"),
    ]
    tm = JanusTrainModel(model)
    batch = collate(samples, st.pad, img)
    with torch.no_grad():
        mixed = tm(batch)
        alone = [tm(collate([s], st.pad, img if s["task"] == 1 else None)) for s in samples]
    total = sum(a["loss_sum"] for a in alone)
    torch.testing.assert_close(mixed["loss_sum"], total, rtol=1e-5, atol=1e-5)
    assert mixed["n_tokens"].tolist() == sum(a["n_tokens"] for a in alone).tolist()
    assert count_supervised(batch).tolist() == mixed["n_tokens"].tolist()


def test_placeholder_image_count_mismatch_is_an_error(setup):
    model, tok, st = setup
    n_img = model.config.vision_config.num_image_tokens
    size = model.config.vision_config.image_size
    batch = collate([und_sample(tok, st, n_img)], st.pad, torch.zeros(2, 3, size, size))
    with pytest.raises(ValueError, match="image_placeholder"):
        JanusTrainModel(model)(batch)


def test_packed_row_equals_samples_alone(setup):
    """Two samples packed in one row (position_ids restart) give each sample's own loss:
    attention does not cross the sample boundary."""
    check_packed_row_equals_samples_alone(setup)


def test_left_padding_with_position_ids_is_rejected(setup):
    model, tok, st = setup
    batch = collate([text_sample(tok, st)], st.pad)
    batch["attention_mask"][0, 0] = 0
    with pytest.raises(ValueError, match="right-padded"):
        JanusTrainModel(model)(batch)


def _gen_ce_by_hand(model, s, n_img):
    """Summed generation CE of one generation sample, built module by module on the sample
    alone: the hidden state at position t of the image span predicts the code at t + 1 (the
    ``<begin_of_image>`` position predicts code 0). Targets and positions are written out here,
    not taken from the training forward."""
    codes = torch.tensor(s["codes"][-n_img:])
    head = torch.tensor(s["ids"][: len(s["ids"]) - n_img])
    inner = model.model
    emb = torch.cat(
        [
            inner.language_model.embed_tokens(head),
            inner.generation_aligner(inner.generation_embeddings(codes)),
        ]
    )
    h = inner.language_model(inputs_embeds=emb[None]).last_hidden_state[0]
    boi = len(head) - 1
    predicting = torch.arange(boi, boi + n_img)  # positions; target i sits at position boi+1+i
    return F.cross_entropy(inner.generation_head(h[predicting]), codes, reduction="sum")


def _packed_row(parts, st):
    """One unpadded row holding ``parts`` back to back (position_ids restart per sample)."""
    packed = {k: sum((p[k] for p in parts), []) for k in ("ids", "labels", "codes")}
    batch = collate([{**packed, "task": 0}], st.pad)
    batch["task_ids"][0] = torch.tensor(sum(([p["task"]] * len(p["ids"]) for p in parts), []))
    batch["position_ids"][0] = torch.cat([torch.arange(len(p["ids"])) for p in parts])
    return batch


@pytest.mark.parametrize("layout", ["mixed", "packed"])
@pytest.mark.parametrize("chunk", [0, 7])
def test_image_codes_predicted_from_the_previous_position(setup, layout, chunk):
    """In a mixed padded batch and in a packed row (the generation sample after two others),
    unchunked and with the heads' CE in chunks: the generation loss equals the hand-built one
    in which position t predicts code t + 1. An image head reading the code's own position
    (or any other shift) gives another value."""
    from janus_train.model.loss import HeadLoss

    model, tok, st = setup
    n_img = model.config.vision_config.num_image_tokens
    size = model.config.vision_config.image_size
    g = torch.Generator().manual_seed(6)
    img = torch.randn(1, 3, size, size, generator=g)
    codes = torch.randint(0, model.config.vq_config.num_embeddings, (n_img,), generator=g)
    gen = gen_sample(tok, st, codes.tolist(), "a green triangle under a red circle")
    others = [text_sample(tok, st, "one star"), und_sample(tok, st, n_img)]
    if layout == "mixed":
        batch = collate([others[0], gen, others[1], text_sample(tok, st)], st.pad, img)
    else:
        batch = _packed_row([*others, gen], st)
        batch["pixel_values"] = img
    tm = JanusTrainModel(model, head_loss=HeadLoss(chunk_tokens=chunk))
    with torch.no_grad():
        got = tm(batch)
        want = _gen_ce_by_hand(model, gen, n_img)
    assert got["n_tokens"][2] == n_img
    torch.testing.assert_close(got["loss_sum"][2], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("partitioned", [False, True])
def test_frozen_vq_never_runs_on_a_dummy(setup, partitioned):
    """With pre-tokenized codes the VQ has nothing to encode, under ZeRO-3 too: the trainer
    holds it outside the engine (``vq_codes.detach_vq``), so no gather needs keeping in step."""
    model, tok, st = setup
    n_img = model.config.vision_config.num_image_tokens
    calls = []
    handle = model.model.vqmodel.encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        batch = collate([gen_sample(tok, st, [1] * n_img), text_sample(tok, st)], st.pad)
        with torch.no_grad():
            JanusTrainModel(model, params_partitioned=partitioned)(batch)
    finally:
        handle.remove()
    assert calls == []
