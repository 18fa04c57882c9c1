"""Sample builders, masks, preprocessing and decoding: token-by-token against hand-written
expectations, and the images against independent PIL/numpy computations."""

from __future__ import annotations

import io
import json
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from janus_train.data.builders import (
    BuildContext,
    build_caption_plain,
    build_caption_qa,
    build_conversation,
    build_generation,
    build_text,
    collate_samples,
    first_sentence,
    record_to_samples,
)
from janus_train.data.preprocess import (
    BadSample,
    decode_image,
    gen_pixels,
    gen_uint8,
    resize_long_pad,
    resize_short_crop,
    und_pixels,
    und_uint8,
)
from janus_train.model.tokenizer import resolve_special_tokens, train_tiny_tokenizer

N = 16  # tiny model: 32x32 images, 4x4 image tokens
X = -100


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok"), image_size=32, num_image_tokens=N)


def make_ctx(proc, **kw) -> BuildContext:
    tok = proc.tokenizer
    base = dict(
        tokenizer=tok,
        st=resolve_special_tokens(tok),
        image_size=32,
        num_image_tokens=N,
        codebook_size=64,
        cfg_dropout=0.0,
        first_sentence_prob=0.0,
        seq_len=512,
        system_prompt=None,
        und_format="chat",  # conversations in the chat template (stage 3's framing)
    )
    base.update(kw)
    return BuildContext(**base)


def enc(proc, s):
    return proc.tokenizer.encode(s, add_special_tokens=False)


def img_arr():
    return np.zeros((32, 32, 3), np.uint8)


def test_caption_plain_masks(proc):
    ctx = make_ctx(proc)
    st = ctx.st
    s = build_caption_plain("a red circle", img_arr(), ctx)
    cap = enc(proc, "a red circle")
    assert s.input_ids == [st.bos, st.boi] + [st.image] * N + [st.eoi] + cap + [st.eos]
    assert s.labels == [X] * (N + 3) + cap + [st.eos]
    assert s.task == "und" and len(s.und_images) == 1


def test_caption_qa_masks_question(proc):
    for sft in (False, True):  # the fixed question is never supervised
        ctx = make_ctx(proc, und_format="chat", gen_format="chat", sft=sft)
        st = ctx.st
        s = build_caption_qa("a red circle", img_arr(), ctx)
        pre = enc(proc, "<|User|>: ")
        post = enc(proc, "\nDescribe the image in detail.\n\n<|Assistant|>:")
        ans = enc(proc, " a red circle") + [st.eos]
        block = [st.boi] + [st.image] * N + [st.eoi]
        assert s.input_ids == [st.bos] + pre + block + post + ans
        assert s.labels == [X] * (1 + len(pre) + len(block) + len(post)) + ans


@pytest.mark.parametrize(
    "template,u,a", [("janus", "User", "Assistant"), ("janus_pro", "<|User|>", "<|Assistant|>")]
)
def test_conversation_sft_multiturn(proc, template, u, a):
    ctx = make_ctx(
        proc, chat_template=template, sft=True, system_prompt="You are a helpful assistant."
    )
    st = ctx.st
    turns = [
        ("user", "<image>\nwhat color?"),
        ("assistant", "red"),
        ("user", "what shape?"),
        ("assistant", "a circle"),
    ]
    s = build_conversation(turns, [img_arr()], ctx, "und")
    sys_ = enc(proc, "You are a helpful assistant.\n\n")
    u1a, u1b = enc(proc, f"{u}: "), enc(proc, f"\nwhat color?\n\n{a}:")
    a1 = enc(proc, " red") + [st.eos]
    u2 = enc(proc, f"{u}: what shape?\n\n{a}:")
    a2 = enc(proc, " a circle") + [st.eos]
    block = [st.boi] + [st.image] * N + [st.eoi]
    assert s.input_ids == [st.bos] + sys_ + u1a + block + u1b + a1 + u2 + a2
    masked = lambda x: [X] * len(x)  # noqa: E731
    assert s.labels == (
        [X] + masked(sys_) + masked(u1a) + masked(block) + masked(u1b) + a1 + masked(u2) + a2
    )


def test_conversation_pretrain_supervises_user_text(proc):
    ctx = make_ctx(proc, sft=False)
    st = ctx.st
    s = build_conversation(
        [("system", "be brief"), ("user", "what color?"), ("assistant", "red")], [], ctx, "text"
    )
    sys_ = enc(proc, "be brief\n\n")
    u1 = enc(proc, "<|User|>: what color?\n\n<|Assistant|>:")
    a1 = enc(proc, " red") + [st.eos]
    assert s.input_ids == [st.bos] + sys_ + u1 + a1
    assert s.labels == [X] + [X] * len(sys_) + u1 + a1
    assert s.task == "text"


def test_conversation_marker_mismatch(proc):
    ctx = make_ctx(proc)
    with pytest.raises(BadSample) as e:
        build_conversation(
            [("user", "<image><image> hi"), ("assistant", "x")], [img_arr()], ctx, "und"
        )
    assert e.value.reason == "image_marker_mismatch"


def test_text_chunks(proc):
    ctx = make_ctx(proc, seq_len=8)
    st = ctx.st
    text = "the red circle is on the left and the blue square is on the right"
    ids = [st.bos] + enc(proc, text) + [st.eos]
    chunks = build_text(text, ctx)
    # chunks overlap by one token; no chunk's first token is a target (packed, it would be
    # predicted from the previous sample of the row); every token after BOS is a target once
    assert all(len(c.input_ids) <= 8 and c.labels[0] == X for c in chunks)
    assert all(c.labels[1:] == c.input_ids[1:] for c in chunks)
    assert all(a.input_ids[-1] == b.input_ids[0] for a, b in zip(chunks, chunks[1:]))
    targets = [t for c in chunks for t in c.labels if t != X]
    assert targets == ids[1:]
    # data.text_chunk: shorter chunks of the same document, same targets
    short = build_text(text, make_ctx(proc, seq_len=8, text_chunk=4))
    assert max(len(c.input_ids) for c in short) == 4 and len(short) > len(chunks)
    assert [t for c in short for t in c.labels if t != X] == ids[1:]


def test_generation_sequences(proc):
    ctx = make_ctx(proc)
    st = ctx.st
    codes = np.arange(N) % 64
    s = build_generation("a red circle", ctx, random.Random(0), codes=codes)
    p = enc(proc, "a red circle")
    assert s.input_ids == [st.bos] + p + [st.boi] + [st.pad] * N
    assert s.labels == [X] * (len(p) + 2 + N)
    assert s.image_codes == [X] * (len(p) + 2) + list(range(N))
    assert st.eoi not in s.input_ids
    # Without codes: -1 slots and the [-1, 1] image travels along.
    im = img_arr()
    s = build_generation(
        "a red circle",
        make_ctx(proc, und_format="chat", gen_format="chat"),
        random.Random(0),
        image=im,
    )
    p = enc(proc, "<|User|>: a red circle\n\n<|Assistant|>:")
    assert s.input_ids == [st.bos] + p + [st.boi] + [st.pad] * N
    assert s.image_codes == [X] * (len(p) + 2) + [-1] * N and s.gen_image is im


def test_cfg_dropout_is_hf_unconditional_prompt(proc):
    ctx = make_ctx(proc, und_format="chat", gen_format="chat", cfg_dropout=1.0)
    st = ctx.st
    cond = build_generation(
        "a red circle",
        make_ctx(proc, und_format="chat", gen_format="chat"),
        random.Random(0),
        codes=np.zeros(N),
    )
    unc = build_generation("a red circle", ctx, random.Random(0), codes=np.zeros(N))
    # HF generate(generation_mode="image"): every prompt token that is neither BOS nor BOI -> pad.
    ids = torch.tensor(cond.input_ids[:-N])
    hf = ids.masked_fill((ids != st.bos) & (ids != st.boi), st.pad).tolist()
    assert unc.input_ids[:-N] == hf
    assert unc.input_ids[0] == st.bos and unc.input_ids[-N - 1] == st.boi
    assert unc.image_codes == cond.image_codes


def test_dropout_rates_and_first_sentence(proc):
    assert first_sentence("a red circle. there is one! more") == "a red circle."
    assert first_sentence("no end here") == "no end here"
    ctx = make_ctx(proc, cfg_dropout=0.1, first_sentence_prob=0.25)
    st = ctx.st
    full = enc(proc, "a red circle. there is one")
    short = enc(proc, "a red circle.")
    n, unc, first = 2000, 0, 0
    for i in range(n):
        s = build_generation("a red circle. there is one", ctx, random.Random(i), codes=np.zeros(N))
        body = s.input_ids[1 : -N - 1]
        unc += all(t == st.pad for t in body)
        first += len(body) == len(short)
        assert len(body) in (len(full), len(short))
    assert 0.08 < unc / n < 0.12
    assert 0.22 < first / n < 0.28


def test_long_sample_truncation(proc):
    ctx = make_ctx(proc, seq_len=N + 6)
    s = build_caption_plain("a red circle a red circle a red circle a red circle", img_arr(), ctx)
    assert len(s.input_ids) == N + 6 and s.labels[-1] != X
    with pytest.raises(BadSample) as e:
        build_caption_plain("x", img_arr(), make_ctx(proc, seq_len=N))
    assert e.value.reason == "too_long"


def _png(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_preprocess_matches_independent_computation():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8))  # w=40, h=20
    # understanding: 40x20 -> 32x16 bicubic, centred on a 32x32 (127,127,127) square
    ref = np.full((32, 32, 3), 127, np.uint8)
    ref[8:24] = np.asarray(img.resize((32, 16), Image.BICUBIC))
    assert np.array_equal(np.asarray(resize_long_pad(img, 32)), ref)
    x = und_pixels(img, 32, (0.48, 0.45, 0.4), (0.26, 0.26, 0.27))
    want = (ref.astype(np.float32) / 255 - np.array([0.48, 0.45, 0.4], np.float32)) / np.array(
        [0.26, 0.26, 0.27], np.float32
    )
    np.testing.assert_allclose(x, want.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)
    # generation: 40x20 -> 64x32 bicubic, centre crop columns 16..48
    ref = np.asarray(img.resize((64, 32), Image.BICUBIC))[:, 16:48]
    assert np.array_equal(np.asarray(resize_short_crop(img, 32)), ref)
    g = gen_pixels(img, 32)
    np.testing.assert_allclose(g, ref.transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
    assert g.min() >= -1 and g.max() <= 1


def test_decode_modes_and_exif():
    base = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 40x20, displayed 20x40
    im = decode_image(_png(base, "JPEG", exif=exif.tobytes()))
    assert im.size == (20, 40) and im.mode == "RGB"
    rgba = Image.new("RGBA", (8, 8), (0, 0, 255, 0))
    assert decode_image(_png(rgba)).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert decode_image(_png(base.convert("P"))).mode == "RGB"
    assert decode_image(_png(base.convert("L"))).mode == "RGB"
    cmyk = decode_image(_png(base.convert("CMYK"), "JPEG"))
    assert cmyk.mode == "RGB" and abs(cmyk.getpixel((5, 5))[0] - 200) < 12
    with pytest.raises(BadSample) as e:
        decode_image(b"not an image")
    assert e.value.reason == "bad_image"


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/janus_data_pwned",))


def test_record_reasons_and_no_unpickling(proc, tmp_path):
    import os

    ctx = make_ctx(proc)
    rng = random.Random(0)
    jpg = _png(Image.new("RGB", (10, 10)), "JPEG")
    cases = [
        ({"jpg": b"garbage", "txt": b"a"}, "caption", "understanding", "bad_image"),
        ({"jpg": jpg}, "caption", "understanding", "missing_key"),
        ({"jpg": jpg, "txt": b"   "}, "caption", "understanding", "empty_caption"),
        ({"jpg": jpg, "json": b'{"caption": 3}'}, "caption", "understanding", "bad_caption"),
        ({"jpg": jpg, "json": b"{oops"}, "conversation", "understanding", "bad_json"),
        (
            {
                "json": json.dumps(
                    {
                        "conversations": [
                            {"from": "human", "value": "<image> hi"},
                            {"from": "gpt", "value": "x"},
                        ]
                    }
                ).encode()
            },
            "conversation",
            "understanding",
            "image_marker_mismatch",
        ),
        ({"txt": b"a red", "codes.npy": b"\x93NUMPY junk"}, "caption", "generation", "bad_codes"),
    ]
    for members, fmt, task, reason in cases:
        with pytest.raises(BadSample) as e:
            record_to_samples(members, fmt, task, ctx, rng)
        assert e.value.reason == reason, (members, e.value)
    # Pickle payloads in .pyd/.pkl/.pth members and pickled .npy are never loaded.
    evil = pickle.dumps(_Evil())
    if os.path.exists("/tmp/janus_data_pwned"):
        os.remove("/tmp/janus_data_pwned")
    out = record_to_samples(
        {"jpg": jpg, "txt": b"a red", "pyd": evil, "pkl": evil, "pth": evil},
        "caption",
        "understanding",
        ctx,
        rng,
    )
    assert len(out) == 1
    buf = io.BytesIO()
    np.save(buf, np.array([_Evil()], dtype=object), allow_pickle=True)
    with pytest.raises(BadSample):
        record_to_samples({"txt": b"a", "npy": buf.getvalue()}, "caption", "generation", ctx, rng)
    assert not os.path.exists("/tmp/janus_data_pwned")


def test_collate_contract(proc):
    ctx = make_ctx(proc, mean=(0.48, 0.45, 0.4), std=(0.26, 0.26, 0.27))
    st = ctx.st
    rng = np.random.default_rng(1)
    pil = Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8))
    a = build_caption_plain("a red", und_uint8(pil, 32), ctx)
    g = build_generation("blue", ctx, random.Random(0), image=gen_uint8(pil, 32))
    t = build_text("the red circle", ctx)[0]
    b = collate_samples([a, g, t], ctx)
    T = max(len(a.input_ids), len(g.input_ids), len(t.input_ids))
    assert b["input_ids"].shape == (3, T)
    n = len(t.input_ids)
    assert b["input_ids"][2, n:].eq(st.pad).all() and b["attention_mask"][2, n:].eq(0).all()
    assert b["labels"][2, n:].eq(X).all() and b["task_ids"][2, n:].eq(-1).all()
    assert b["position_ids"][2, :n].tolist() == list(range(n))
    assert b["task_ids"][0, 0] == 1 and b["task_ids"][1, 0] == 2 and b["task_ids"][2, 0] == 0
    # batched normalisation == the per-image reference of spec §3
    assert b["pixel_values"].shape == (1, 3, 32, 32) and b["pixel_values"].dtype == torch.float32
    np.testing.assert_allclose(
        b["pixel_values"][0].numpy(), und_pixels(pil, 32, ctx.mean, ctx.std), atol=1e-5
    )
    assert b["gen_pixel_values"].shape == (1, 3, 32, 32)
    np.testing.assert_allclose(b["gen_pixel_values"][0].numpy(), gen_pixels(pil, 32), atol=1e-6)
    assert int((b["image_codes"] == -1).sum()) == N
    assert int((b["input_ids"] == st.image).sum()) == N
    assert collate_samples([t], ctx, pad_to_multiple_of=8)["input_ids"].shape[1] % 8 == 0


def test_uint8_pixels_finish_equals_float_contract(proc):
    from janus_train.data.builders import finish_pixels

    ctx = make_ctx(proc, mean=(0.48, 0.45, 0.4), std=(0.26, 0.26, 0.27))
    rng = np.random.default_rng(2)
    pil = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    samples = [
        build_caption_plain("a red", und_uint8(pil, 32), ctx),
        build_generation("blue", ctx, random.Random(0), image=gen_uint8(pil, 32)),
    ]
    ref = collate_samples(samples, ctx)
    raw = collate_samples(samples, ctx, pixels_uint8=True)
    assert raw["pixel_values"].dtype == torch.uint8 and raw["gen_pixel_values"].dtype == torch.uint8
    done = finish_pixels(raw, ctx.mean, ctx.std)
    for k in ref:
        assert done[k].dtype == ref[k].dtype
        torch.testing.assert_close(done[k], ref[k], atol=1e-5, rtol=0)


def test_packed_collate(proc):
    from janus_train.batch import count_supervised
    from janus_train.data.builders import pack_rows

    ctx = make_ctx(proc, seq_len=64)
    ims = [np.full((32, 32, 3), v, np.uint8) for v in (10, 20, 30)]
    long = "the red circle is on the left and the blue square is on the right of it"
    samples = [
        build_caption_plain(long, ims[0], ctx),
        build_caption_plain(long, ims[1], ctx),  # no room left in row 0
        build_text("red", ctx)[0],
        build_caption_plain("red", ims[2], ctx),
    ]  # first fit: back into row 0
    lens = [len(s.input_ids) for s in samples]
    rows = pack_rows(samples, 64)
    assert all(sum(len(s.input_ids) for s in r) <= 64 for r in rows) and len(rows) < 4
    assert sorted(id(s) for r in rows for s in r) == sorted(id(s) for s in samples)
    packed, flat = collate_samples(samples, ctx, pack=True), collate_samples(samples, ctx)
    assert packed["input_ids"].shape[0] == len(rows)
    assert torch.equal(count_supervised(packed), count_supervised(flat))
    assert int(packed["attention_mask"].sum()) == sum(lens)
    # position_ids restart at each packed sample; images follow the packed row-major layout
    for i, row in enumerate(rows):
        a = 0
        for s in row:
            n = len(s.input_ids)
            assert packed["position_ids"][i, a : a + n].tolist() == list(range(n))
            assert packed["input_ids"][i, a : a + n].tolist() == s.input_ids
            a += n
    order = [s for r in rows for s in r if s.und_images]
    assert [s.und_images[0][0, 0, 0] for s in order] == [10, 30, 20]  # packed, not input, order
    want = [
        float(und_pixels(Image.fromarray(s.und_images[0]), 32, ctx.mean, ctx.std)[0, 0, 0])
        for s in order
    ]
    assert packed["pixel_values"][:, 0, 0, 0].tolist() == pytest.approx(want, abs=1e-6)
