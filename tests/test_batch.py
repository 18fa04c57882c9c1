"""The batch contract (janus_train/batch.py): the one collate behind both loaders against batches
built by hand here, the empty micro-batch, ``check_batch``'s refusals, ``count_supervised``
against a token-by-token count, and the one pixel normalisation against its arithmetic."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from janus_train.batch import BatchPlan, check_batch, count_supervised, empty_batch
from janus_train.data.builders import (
    BuildContext,
    build_caption_plain,
    build_generation,
    build_text,
    collate_samples,
    finish_pixels,
)
from janus_train.data.preprocess import gen_pixels, normalize_batch, normalize_pixels_, und_pixels
from janus_train.model.tokenizer import resolve_special_tokens, train_tiny_tokenizer
from tests.conftest import tiny_run
from tests.helpers import synthetic_loader

N = 16  # image tokens of the tiny tokenizer's processor
ROW = 60  # packed row length: the five samples take 2-4 rows
IGN = -100
MEAN, STD = (0.48, 0.45, 0.4), (0.26, 0.26, 0.27)


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok"), image_size=32, num_image_tokens=N)


def _ctx(proc) -> BuildContext:
    tok = proc.tokenizer
    return BuildContext(
        tokenizer=tok,
        st=resolve_special_tokens(tok),
        image_size=32,
        num_image_tokens=N,
        codebook_size=64,
        cfg_dropout=0.0,
        seq_len=120,
        mean=MEAN,
        std=STD,
        system_prompt=None,
    )


def _pixels(arr: np.ndarray, mean, std) -> torch.Tensor:
    """(S, S, 3) uint8 -> (3, S, S) float32: ``x * (1 / (255 std)) + (-mean / std)``, one float32
    multiply and one float32 add (the data pipeline's arithmetic), written in numpy."""
    x = arr.astype(np.float32).transpose(2, 0, 1)
    scale = (1.0 / (255.0 * np.asarray(std, np.float64))).astype(np.float32)[:, None, None]
    shift = (-np.asarray(mean, np.float64) / np.asarray(std, np.float64)).astype(np.float32)
    return torch.from_numpy(x * scale + shift[:, None, None])


def _by_hand(rows, pad, T, positions=True):
    """Right-padded (B, T) fields of `rows` (lists of samples laid end to end), one token at a
    time."""
    task_id = {"text": 0, "und": 1, "gen": 2}
    B = len(rows)
    out = {
        "input_ids": [[pad] * T for _ in range(B)],
        "attention_mask": [[0] * T for _ in range(B)],
        "position_ids": [[0] * T for _ in range(B)],
        "labels": [[IGN] * T for _ in range(B)],
        "image_codes": [[IGN] * T for _ in range(B)],
        "task_ids": [[-1] * T for _ in range(B)],
    }
    for i, row in enumerate(rows):
        t = 0
        for s in row:
            codes = [IGN] * len(s.input_ids) if s.image_codes is None else list(s.image_codes)
            for j in range(len(s.input_ids)):
                out["input_ids"][i][t] = int(s.input_ids[j])
                out["attention_mask"][i][t] = 1
                out["position_ids"][i][t] = j
                out["labels"][i][t] = int(s.labels[j])
                out["image_codes"][i][t] = int(codes[j])
                out["task_ids"][i][t] = task_id[s.task]
                t += 1
    if not positions:
        del out["position_ids"]
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def _samples(ctx):
    rng = np.random.default_rng(0)
    ims = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    return [
        build_caption_plain("a red circle", ims[0], ctx),
        build_text("the blue square is on the left", ctx)[0],
        build_generation("a green star", ctx, random.Random(0), image=ims[1]),
        build_caption_plain("two stars", ims[2], ctx),
        build_generation("codes", ctx, random.Random(0), codes=np.arange(N) % 64),
    ]


def _assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("multiple", [1, 8])
def test_data_collate_equals_a_batch_built_by_hand(proc, multiple):
    ctx = _ctx(proc)
    samples = _samples(ctx)
    T = max(len(s.input_ids) for s in samples)
    T = -(-T // multiple) * multiple
    want = _by_hand([[s] for s in samples], ctx.st.pad, T)
    und = [s.und_images[0] for s in samples if s.und_images]
    want["pixel_values"] = torch.stack([_pixels(a, MEAN, STD) for a in und])
    want["gen_pixel_values"] = _pixels(samples[2].gen_image, (0.5,) * 3, (0.5,) * 3)[None]
    got = collate_samples(samples, ctx, pad_to_multiple_of=multiple)
    _assert_same(got, want)
    # uint8 shipping, then the device-side finish: the same bits
    raw = collate_samples(samples, ctx, pad_to_multiple_of=multiple, pixels_uint8=True)
    assert raw["pixel_values"].dtype == torch.uint8
    _assert_same(finish_pixels(raw, MEAN, STD), want)


def test_packed_data_collate_equals_a_batch_built_by_hand(proc):
    ctx = _ctx(proc)
    samples = _samples(ctx)
    got = collate_samples(samples, ctx, pack=True, row_len=ROW)
    rows, room = [], []  # first fit, samples kept in order within a row
    for s in samples:
        n = len(s.input_ids)
        r = next((r for r in range(len(rows)) if room[r] >= n), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(ROW)
        rows[r].append(s)
        room[r] -= n
    assert 1 < len(rows) < len(samples)  # the case packs something
    T = max(sum(len(s.input_ids) for s in row) for row in rows)
    want = _by_hand(rows, ctx.st.pad, T)
    und = [im for row in rows for s in row for im in s.und_images]
    want["pixel_values"] = torch.stack([_pixels(a, MEAN, STD) for a in und])
    gen = [s.gen_image for row in rows for s in row if s.gen_image is not None]
    want["gen_pixel_values"] = torch.stack([_pixels(a, (0.5,) * 3, (0.5,) * 3) for a in gen])
    _assert_same(got, want)


@pytest.mark.parametrize("tokens_per_micro", [0, 256])
def test_synthetic_batches_equal_batches_built_by_hand(proc, tokens_per_micro):
    """Fixed-length rows (no position_ids, image keys only when there are images) and packed
    rows (unpadded, position_ids restart per sample), from the loader's own samples."""
    run = tiny_run(["train.synthetic_seq_len=64"])
    loader = synthetic_loader(run, proc, plan=BatchPlan(8, 2, 4, 1, tokens_per_micro))
    tasks = loader.tasks_for_step(0)
    samples = [loader.make_row(t, 0, g) for g, t in enumerate(tasks)]
    assert [len(s.input_ids) for s in samples] == [
        loader.row_length(t, 0, g) for g, t in enumerate(tasks)
    ]
    micro = loader.next_step()
    if tokens_per_micro:
        from janus_train.data.packing import assign_balanced, layout

        lengths = [len(s.input_ids) for s in samples]
        (share,) = assign_balanced(lengths, 1)
        packs = layout([[lengths[g] for g in share]], tokens_per_micro).packs[0]
        rows = [[[samples[share[i]] for i in p]] for p in packs]
    else:
        rows = [[[s] for s in samples[m * 2 : m * 2 + 2]] for m in range(4)]
    assert len(micro) == len(rows)
    for got, row in zip(micro, rows):
        T = sum(len(s.input_ids) for s in row[0]) if tokens_per_micro else 64
        want = _by_hand(row, loader.pad_id, T, positions=bool(tokens_per_micro))
        und = [im for r in row for s in r for im in s.und_images]
        gen = [s.gen_image for r in row for s in r if s.gen_image is not None]
        if und:
            want["pixel_values"] = torch.stack(und)
        if gen:
            want["gen_pixel_values"] = torch.stack(gen)
        _assert_same(got, want)
        check_batch(got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_empty_batch(dtype):
    b = empty_batch(7, 32, dtype)
    want = {
        "input_ids": torch.tensor([[7]]),
        "attention_mask": torch.tensor([[0]]),
        "position_ids": torch.tensor([[0]]),
        "labels": torch.tensor([[IGN]]),
        "image_codes": torch.tensor([[IGN]]),
        "task_ids": torch.tensor([[-1]]),
        "pixel_values": torch.zeros((0, 3, 32, 32), dtype=dtype),
        "gen_pixel_values": torch.zeros((0, 3, 32, 32), dtype=dtype),
    }
    _assert_same(b, want)
    assert count_supervised(check_batch(b)).tolist() == [0, 0, 0]


def test_check_batch_refuses_a_broken_batch_in_one_line(proc):
    ctx = _ctx(proc)
    good = collate_samples(_samples(ctx), ctx)
    assert check_batch(good) is good
    B, T = good["input_ids"].shape
    broken = [
        ({k: v for k, v in good.items() if k != "labels"}, "missing ['labels']"),
        ({**good, "pixel_value": good["pixel_values"]}, "unknown ['pixel_value']"),
        ({**good, "task_ids": good["task_ids"][:, :-1]}, "batch['task_ids']"),
        ({**good, "labels": good["labels"].int()}, "batch['labels']"),
        ({**good, "input_ids": good["input_ids"].view(-1)}, "batch['input_ids']"),
        ({**good, "pixel_values": good["pixel_values"][:, :1]}, "batch['pixel_values']"),
    ]
    for batch, needle in broken:
        with pytest.raises(ValueError) as e:
            check_batch(batch)
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_count_supervised_counts_token_by_token(proc):
    ctx = _ctx(proc)
    samples = _samples(ctx)
    for batch in (collate_samples(samples, ctx), collate_samples(samples, ctx, pack=True)):
        want = [0, 0, 0]
        lab, codes, task = (batch[k].tolist() for k in ("labels", "image_codes", "task_ids"))
        for i in range(len(lab)):
            for t in range(1, len(lab[i])):  # a target at t is predicted from t-1
                if lab[i][t] != IGN:
                    want[task[i][t]] += 1
                if codes[i][t] != IGN:
                    want[2] += 1
        assert count_supervised(batch).tolist() == want
    assert want[2] >= N  # the pre-tokenized generation sample's codes count


def test_one_pixel_normalisation_everywhere():
    """Every path computes the same bits for the same image: the loader's batch stack, the
    per-image helpers (janus-data vq-encode), the device-side finish of uint8 pixels and the
    demo's VQ input; all within float32 rounding of ``(x / 255 - mean) / std``."""
    from janus_demo.vq import images_to_tensor

    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    arr[0, :3] = [[0, 0, 0], [127, 128, 255], [255, 255, 255]]  # the ends and the middle
    img = Image.fromarray(arr)
    for mean, std in ((MEAN, STD), ((0.5,) * 3, (0.5,) * 3)):
        want = _pixels(arr, mean, std)
        exact = (arr.astype(np.float64).transpose(2, 0, 1) / 255 - np.reshape(mean, (3, 1, 1))) / (
            np.reshape(std, (3, 1, 1))
        )
        np.testing.assert_allclose(want.numpy(), exact, rtol=0, atol=1e-6)
        assert torch.equal(normalize_batch([arr], mean, std)[0], want)
        u8 = torch.from_numpy(arr).permute(2, 0, 1)[None]
        assert torch.equal(normalize_pixels_(u8.float(), mean, std)[0], want)
        assert torch.equal(torch.from_numpy(und_pixels(img, 32, mean, std)), want)
    gen = _pixels(arr, (0.5,) * 3, (0.5,) * 3)
    assert torch.equal(torch.from_numpy(gen_pixels(img, 32)), gen)
    assert torch.equal(images_to_tensor([img], 32)[0], gen)
    levels = torch.arange(256, dtype=torch.float32).view(1, 1, 1, 256).expand(1, 3, 1, 256)
    g = normalize_pixels_(levels.clone())
    assert float(g.min()) == -1.0 and float(g.max()) == 1.0
