"""Token-budget packing: balancing and bin packing against brute force, and packed attention
(every implementation runnable on CPU, plus the flash varlen plumbing through a CPU varlen
reference kernel) against per-sample computation, losses and gradients."""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter

import pytest
import torch

from janus_train.data.packing import (
    assign_balanced,
    balance_takes,
    imbalance,
    layout,
    pack_micro,
)
from janus_train.model import JanusTrainModel, resolve_special_tokens
from janus_train.model import forward as fwd
from tests.helpers import thread_token_loaders

IGN = -100


# ---------------------------------------------------------------------------------------------
# pure packing functions
# ---------------------------------------------------------------------------------------------
def test_pack_micro_respects_budget_and_keeps_every_sample():
    rng = random.Random(0)
    for _ in range(200):
        lens = [rng.randint(1, 50) for _ in range(rng.randint(0, 20))]
        bins = pack_micro(lens, 64)
        assert sorted(i for b in bins for i in b) == list(range(len(lens)))
        assert all(sum(lens[i] for i in b) <= 64 for b in bins)
        # first fit decreasing never needs more than 11/9 OPT + 1 bins; OPT >= ceil(sum / 64)
        assert len(bins) <= 11 / 9 * -(-sum(lens) // 64) + 1
    with pytest.raises(ValueError, match="tokens_per_micro=8"):
        pack_micro([9], 8)


def test_assign_balanced_close_to_brute_force_optimum():
    rng = random.Random(1)
    for _ in range(50):
        lens = [rng.randint(10, 100) for _ in range(8)]
        got = assign_balanced(lens, 2)
        assert sorted(i for r in got for i in r) == list(range(8))
        best = min(
            max(sum(lens[i] for i in c), sum(lens) - sum(lens[i] for i in c))
            for k in range(9)
            for c in itertools.combinations(range(8), k)
        )
        worst = max(sum(lens[i] for i in r) for r in got)
        assert worst <= (4 / 3 - 1 / 6) * best  # Graham's LPT bound, m = 2


def test_balance_takes_exact_counts_fifo_bounds_and_balance():
    rng = random.Random(2)
    for _ in range(100):
        world = rng.randint(2, 4)
        need = {"a": rng.randint(0, 6), "b": rng.randint(1, 6)}
        queues = [{s: [] for s in need} for _ in range(world)]
        for s, n in need.items():  # enough supply: 2 steps' worth spread over ranks
            for _ in range(2 * n):
                queues[rng.randrange(world)][s].append(rng.randint(5, 60))
        keep = {s: [2 * n] * world for s, n in need.items()}
        takes = balance_takes(queues, need, keep)
        for s in need:
            assert sum(t[s] for t in takes) == need[s]
            assert all(0 <= takes[r][s] <= len(queues[r][s]) for r in range(world))
            assert all(len(queues[r][s]) - takes[r][s] <= keep[s][r] for r in range(world))
    # balance: a rank holding only long samples takes none of them (optimum: max load 80)
    q = [{"x": [100] * 4}, {"x": [10] * 12}]
    takes = balance_takes(q, {"x": 8}, {"x": [4, 12]})
    assert takes == [{"x": 0}, {"x": 8}]


def test_balance_takes_near_brute_force_optimum():
    rng = random.Random(5)
    worse = 0
    for _ in range(60):
        need = {"a": 2, "b": 3}
        queues = [
            {s: [rng.randint(5, 60) for _ in range(2 * n)] for s, n in need.items()}
            for _ in range(2)
        ]
        keep = {s: [2 * n, 2 * n] for s, n in need.items()}
        takes = balance_takes(queues, need, keep)
        got = max(sum(sum(q[s][: t[s]]) for s in need) for q, t in zip(queues, takes))
        opt = min(
            max(
                sum(queues[0]["a"][:i]) + sum(queues[0]["b"][:j]),
                sum(queues[1]["a"][: 2 - i]) + sum(queues[1]["b"][: 3 - j]),
            )
            for i in range(3)
            for j in range(4)
        )
        assert got <= opt + 60
        worse += got > opt
    assert worse <= 6  # the greedy + local moves find the optimum in >= 90% of cases


def test_balance_takes_forces_lagging_queues():
    q = [{"x": [10] * 6}, {"x": [100] * 2}]
    takes = balance_takes(q, {"x": 4}, {"x": [2, 2]})
    assert takes[0]["x"] >= 4  # 6 queued, at most 2 may stay


def test_layout_equal_micro_steps_and_imbalance():
    lay = layout([[30, 30, 30], [60, 30], []], 64)
    assert lay.n_micro == 2 and all(len(p) == 2 for p in lay.packs)
    assert lay.packs[1] == [[1], [0]] and lay.packs[2] == [[], []] and lay.tokens == [90, 90, 0]
    assert lay.packs[0] == [[2], [0, 1]]  # the largest pack last (ZeRO-1's reduction window)
    lay = layout([[10, 50, 15, 40], [5]], 64)  # FFD: {50, 10} {40, 15}; rank 1: one pack
    assert lay.packs == [[[2, 3], [0, 1]], [[], [0]]]  # empty micro-steps first
    assert imbalance([90, 90, 0]) == pytest.approx(0.5)
    assert imbalance([5, 5]) == 0.0


# ---------------------------------------------------------------------------------------------
# packed attention vs per-sample computation
# ---------------------------------------------------------------------------------------------
def _samples(model, tok, st):
    n_img = model.config.vision_config.num_image_tokens
    ncode = model.config.vq_config.num_embeddings
    g = torch.Generator().manual_seed(3)

    def words(k):
        return torch.randint(10, 300, (k,), generator=g).tolist()

    out = []
    for k in (5, 11, 3):
        ids = [st.bos, *words(k), st.eos]
        out.append({"ids": ids, "labels": [IGN, *ids[1:]], "codes": [IGN] * len(ids), "task": 0})
    for k in (4, 7):
        head = [st.bos, *words(3), st.boi, *([st.image] * n_img), st.eoi]
        ans = [*words(k), st.eos]
        out.append(
            {
                "ids": head + ans,
                "labels": [IGN] * len(head) + ans,
                "codes": [IGN] * (len(head) + len(ans)),
                "task": 1,
            }
        )
    for k in (2, 6):
        head = [st.bos, *words(k), st.boi]
        codes = torch.randint(0, ncode, (n_img,), generator=g).tolist()
        out.append(
            {
                "ids": head + [st.pad] * n_img,
                "labels": [IGN] * (len(head) + n_img),
                "codes": [IGN] * len(head) + codes,
                "task": 2,
            }
        )
    return out


def _batch(rows, pad, images, size):
    """rows: list of lists of samples; each row packed, position_ids restarting per sample."""
    T = max(sum(len(s["ids"]) for s in row) for row in rows)
    B = len(rows)
    b = {
        "input_ids": torch.full((B, T), pad),
        "attention_mask": torch.zeros(B, T, dtype=torch.long),
        "position_ids": torch.zeros(B, T, dtype=torch.long),
        "labels": torch.full((B, T), IGN),
        "image_codes": torch.full((B, T), IGN),
        "task_ids": torch.full((B, T), -1),
    }
    n_und = 0
    for i, row in enumerate(rows):
        a = 0
        for s in row:
            n = len(s["ids"])
            b["input_ids"][i, a : a + n] = torch.tensor(s["ids"])
            b["attention_mask"][i, a : a + n] = 1
            b["position_ids"][i, a : a + n] = torch.arange(n)
            b["labels"][i, a : a + n] = torch.tensor(s["labels"])
            b["image_codes"][i, a : a + n] = torch.tensor(s["codes"])
            b["task_ids"][i, a : a + n] = s["task"]
            n_und += s["task"] == 1
            a += n
    b["pixel_values"] = images[:n_und] if n_und else torch.zeros(0, 3, size, size)
    return b


def _loss_and_grads(tm, batches):
    tm.zero_grad()
    total = torch.zeros(3)
    for b in batches:
        out = tm(b)
        out["loss_sum"].sum().backward()
        total = total + out["loss_sum"].detach()
    grads = {n: p.grad.clone() for n, p in tm.named_parameters() if p.grad is not None}
    return total, grads


def _expected_boundaries(rows, T):
    """Sequence starts of the flattened (B*T) rows from how they were built: each row's samples
    back to back by their lengths, then each pad token on its own; and the longest length."""
    cu, longest = [], 1
    for i, row in enumerate(rows):
        a = i * T
        for s in row:
            cu.append(a)
            a += len(s["ids"])
            longest = max(longest, len(s["ids"]))
        cu += list(range(a, (i + 1) * T))
    return [*cu, len(rows) * T], longest


class _FlashStandIn:
    """Stands in for flash_attention_2 (CUDA + the flash-attn package) as strictly as HF's own
    path: registered with HF's real ``flash_attention_mask`` (a 2-D padding mask would come
    through and send HF's flash code down its unpad-by-mask branch), it requires all four varlen
    arguments and checks their values against the test's own boundaries, then computes with
    the CPU reference of PyTorch's varlen kernel."""

    def __init__(self):
        self.expected = None
        self.calls = 0

    def __call__(
        self,
        module,
        query,
        key,
        value,
        attention_mask,
        scaling=None,
        dropout=0.0,
        cu_seq_lens_q=None,
        cu_seq_lens_k=None,
        max_length_q=None,
        max_length_k=None,
        **kwargs,
    ):
        from janus_train.model.attention import call_varlen, varlen_attn_reference

        assert attention_mask is None, "a mask reached the flash path (HF would unpad by it)"
        cu, mx = self.expected
        for name, got in (("cu_seq_lens_q", cu_seq_lens_q), ("cu_seq_lens_k", cu_seq_lens_k)):
            assert got is not None and got.dtype == torch.int32, name
            assert got.tolist() == cu, name
        assert max_length_q == mx and max_length_k == mx
        assert isinstance(max_length_q, int) and isinstance(max_length_k, int)
        self.calls += 1
        B, H, T, D = query.shape
        q = query.transpose(1, 2).reshape(B * T, H, D)
        k = key.transpose(1, 2).reshape(B * T, key.shape[1], D)
        v = value.transpose(1, 2).reshape(B * T, value.shape[1], D)
        out = call_varlen(
            varlen_attn_reference, q, k, v, cu_seq_lens_q, cu_seq_lens_k, mx, mx, scaling
        )
        return out.view(B, T, H, D), None


def _impls():
    """eager / sdpa: HF's block-causal mask from the restarts (the CPU path); torch_varlen: the
    CUDA default's plumbing with the CPU reference kernel; flash_stand_in: flash_attention_2's
    path. flex_attention has no backward on CPU (torch 2.13): refused there (see below)."""
    return ["eager", "sdpa", "torch_varlen", "flash_stand_in"]


@pytest.mark.parametrize("impl", _impls())
def test_packed_rows_equal_per_sample_losses_and_grads(fresh_tiny_model, impl, monkeypatch):
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    from janus_train.model.attention import set_llm_attention

    model, processor = fresh_tiny_model
    model.train()
    for mod in model.modules():  # dropout-free comparison
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    stand_in = None
    if impl == "flash_stand_in":
        stand_in = _FlashStandIn()
        AttentionInterface.register(impl, stand_in)
        ALL_MASK_ATTENTION_FUNCTIONS.register(impl, flash_attention_mask)
        monkeypatch.setattr(fwd, "VARLEN_IMPLS", (*fwd.VARLEN_IMPLS, impl))
        model.model.language_model.config._attn_implementation = impl
    elif impl == "torch_varlen":
        set_llm_attention(model, impl)
    else:
        model.model.language_model.config._attn_implementation = impl
    tok = processor.tokenizer
    st = resolve_special_tokens(tok)
    size = model.config.vision_config.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))
    samples = _samples(model, tok, st)
    tm = JanusTrainModel(model)
    # two packed rows (one shorter, so right-padded), several samples each
    rows = [samples[:4], samples[4:]]
    und_order = [s for row in rows for s in row if s["task"] == 1]
    assert len(und_order) == 2
    packed = _batch(rows, st.pad, images, size)
    assert (packed["attention_mask"] == 0).any()  # a right-padded row
    if stand_in:
        stand_in.expected = _expected_boundaries(rows, packed["input_ids"].shape[1])
    packed_loss, packed_grads = _loss_and_grads(tm, [packed])
    alone, i_und = [], 0
    for s in [s for row in rows for s in row]:
        img = images[i_und : i_und + 1] if s["task"] == 1 else images[:0]
        i_und += s["task"] == 1
        alone.append(_batch([[s]], st.pad, img, size))
    if stand_in:
        assert stand_in.calls == model.config.text_config.num_hidden_layers
    ref_loss, ref_grads = _per_sample(tm, alone, stand_in)
    torch.testing.assert_close(packed_loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert packed_grads.keys() == ref_grads.keys()
    for k, g in ref_grads.items():
        torch.testing.assert_close(packed_grads[k], g, rtol=1e-4, atol=1e-6, msg=k)
    # sanity: without the restarts (one long sample per row) the loss differs
    b = _batch(rows, st.pad, images, size)
    b["position_ids"] = torch.arange(b["input_ids"].shape[1]).expand_as(b["input_ids"]).clone()
    if stand_in:
        T = b["input_ids"].shape[1]
        stand_in.expected = ([0, T, 2 * T], T)
    with torch.no_grad():
        assert not torch.allclose(tm(b)["loss_sum"], packed_loss, rtol=1e-4)


def _per_sample(tm, alone, stand_in):
    """Each sample in its own one-row batch (the stand-in told each one's boundaries)."""
    tm.zero_grad()
    total = torch.zeros(3)
    for b in alone:
        if stand_in:
            n = b["input_ids"].shape[1]
            stand_in.expected = ([0, n], n)
        out = tm(b)
        out["loss_sum"].sum().backward()
        total = total + out["loss_sum"].detach()
    grads = {n: p.grad.clone() for n, p in tm.named_parameters() if p.grad is not None}
    return total, grads


def test_batch_index_boundaries_and_positions():
    """The host-side index against a hand-worked batch: varlen boundaries of the flattened rows
    (pads one token each), supervised-position lists and per-task counts."""
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 0, 0, 0]])
    am = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    labels = torch.full((2, 6), IGN)
    labels[0, 1:3] = 5  # text sample: positions 0, 1 predict
    labels[1, 1] = 6  # und sample
    codes = torch.full((2, 6), IGN)
    codes[0, 4:6] = torch.tensor([3, -1])  # gen sample: a given code and one from pixels
    task = torch.tensor([[0, 0, 0, 2, 2, 2], [1, 1, 1, -1, -1, -1]])
    ids = torch.tensor([[1, 2, 3, 1, 9, 9], [1, 7, 2, 0, 0, 0]])
    batch = dict(
        input_ids=ids, attention_mask=am, position_ids=pos, labels=labels, image_codes=codes,
        task_ids=task,
    )  # fmt: skip
    ix = fwd.index_batch(batch, image_token_id=7)
    kw = ix.varlen_kwargs()
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 8, 9, 10, 11, 12]
    assert kw["cu_seq_lens_k"].tolist() == kw["cu_seq_lens_q"].tolist()
    assert kw["max_length_q"] == kw["max_length_k"] == 3
    assert ix.text_pos.tolist() == [0, 1, 6] and ix.code_pos.tolist() == [3, 4]
    assert ix.code_slots.tolist() == [4, 5] and ix.fill_slots.tolist() == [5]
    assert ix.image_slots.tolist() == [7] and ix.n_tokens.tolist() == [2, 1, 2]
    with pytest.raises(ValueError, match="position_ids 0"):
        fwd.index_batch({**batch, "position_ids": pos + 1}, 7)
    with pytest.raises(ValueError, match="right-padded"):
        fwd.index_batch({**batch, "attention_mask": am.flip(1)}, 7)
    assert fwd.index_batch({**batch, "position_ids": None}, 7).varlen_kwargs() == {}


def test_varlen_reference_matches_per_sequence_causal_attention_and_torch_signature():
    """The CPU reference against attention written out here (softmax of masked scores), with
    GQA and a scale; and its signature is the installed ``varlen_attn``'s, so the CUDA kernel
    receives what CI exercised (a torch upgrade that changes it fails here)."""
    import inspect

    from janus_train.model.attention import call_varlen, varlen_attn_reference

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(9, h, 8, generator=g) for h in (4, 2, 2))
    cu = torch.tensor([0, 4, 5, 9], dtype=torch.int32)
    got = call_varlen(varlen_attn_reference, q, k, v, cu, cu, 4, 4, 0.3)
    ref = torch.empty_like(q)
    for a, e in [(0, 4), (4, 5), (5, 9)]:
        kk, vv = k[a:e].repeat_interleave(2, 1), v[a:e].repeat_interleave(2, 1)
        s = torch.einsum("qhd,khd->hqk", q[a:e], kk) * 0.3
        s = s.masked_fill(torch.ones(e - a, e - a).triu(1).bool(), float("-inf"))
        ref[a:e] = torch.einsum("hqk,khd->qhd", s.softmax(-1), vv)
    torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match="max length 3 < longest segment 4"):
        call_varlen(varlen_attn_reference, q, k, v, cu, cu, 3, 3, None)
    from torch.nn.attention.varlen import varlen_attn

    real, mine = inspect.signature(varlen_attn), inspect.signature(varlen_attn_reference)
    assert [(p.name, p.kind, p.default) for p in mine.parameters.values()] == [
        (p.name, p.kind, p.default) for p in real.parameters.values()
    ]


def test_varlen_call_adapts_to_the_torch_2_10_signature():
    """torch 2.10/2.11's varlen_attn takes ``is_causal`` and no ``scale``/``enable_gqa``: the
    call passes is_causal=True and repeats the key/value heads."""
    seen = {}

    def old_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
        seen.update(heads=(query.shape[1], key.shape[1]), is_causal=is_causal)
        return query

    from janus_train.model.attention import call_varlen

    q, k = torch.zeros(3, 4, 8), torch.zeros(3, 2, 8)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    call_varlen(old_varlen, q, k, k, cu, cu, 3, 3, 8**-0.5)
    assert seen == {"heads": (4, 4), "is_causal": True}
    with pytest.raises(ValueError, match="no scale argument"):
        call_varlen(old_varlen, q, k, k, cu, cu, 3, 3, 0.1)


def test_torch_varlen_refuses_missing_arguments_or_a_mask():
    from janus_train.model.attention import varlen_attention_forward

    x = torch.zeros(1, 2, 3, 4)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="needs cu_seq_lens_k, max_length_k"):
        varlen_attention_forward(None, x, x, x, None, cu_seq_lens_q=cu, max_length_q=3)
    with pytest.raises(ValueError, match="not an attention mask"):
        varlen_attention_forward(None, x, x, x, torch.ones(1, 3))


def test_attention_that_would_mix_samples_is_refused():
    from janus_train.model.attention import check_attn_implementation

    check_attn_implementation("sdpa")
    check_attn_implementation("flash_attention_2")
    check_attn_implementation("auto")
    with pytest.raises(ValueError, match="model.attn_implementation='paged|sdpa'"):
        check_attn_implementation("paged|sdpa")


def test_attention_resolution_and_what_this_machine_cannot_run(monkeypatch):
    from janus_train.model import attention as at

    assert at.resolve_attn_implementation("auto", cuda=True) == "torch_varlen"
    assert at.resolve_attn_implementation("auto", cuda=False) == "sdpa"
    assert at.check_attn_available("torch_varlen", cuda=False) == "torch_varlen"  # reference
    for impl, msg in (
        ("flex_attention", "needs CUDA (FlexAttention has no backward on CPU)"),
        ("flash_attention_2", "needs CUDA and the flash-attn package"),
        ("flash_attention_3", "needs CUDA and the flash-attn-3 package"),
    ):
        with pytest.raises(
            ValueError, match="^" + re.escape(f"model.attn_implementation={impl} {msg}")
        ) as e:
            at.check_attn_available(impl, cuda=False)
        assert "\n" not in str(e.value)
    assert at.check_attn_available("flex_attention", cuda=True) == "flex_attention"


@pytest.mark.parametrize("impl", ["auto", "sdpa", "eager", "torch_varlen"])
def test_every_accepted_value_builds_and_trains_a_packed_step(impl, tiny_workdir):
    """``build_model`` with each value this CPU accepts, then one packed optimizer step whose
    loss is the per-sample one (the model sees two samples in one row)."""
    from janus_train.config import compose, to_run_config
    from janus_train.model import build_model

    cfg = to_run_config(
        compose(["experiment=tiny", "model=tiny", f"model.attn_implementation={impl}"])
    ).model
    model, proc = build_model(cfg, workdir=tiny_workdir)
    want = {"auto": "sdpa"}.get(impl, impl)
    assert model.model.language_model.config._attn_implementation == want
    assert model.config.vision_config._attn_implementation in ("sdpa", "eager")
    st = resolve_special_tokens(proc.tokenizer)
    size = model.config.vision_config.image_size
    text = [s for s in _samples(model, proc.tokenizer, st) if s["task"] == 0][:2]
    tm = JanusTrainModel(model)
    model.train()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    none = torch.zeros(0, 3, size, size)
    with torch.no_grad():
        alone = sum(tm(_batch([[s]], st.pad, none, size))["loss_sum"] for s in text)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = tm(_batch([text], st.pad, none, size))
    out["loss_sum"].sum().backward()
    opt.step()
    torch.testing.assert_close(out["loss_sum"].detach(), alone, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        after = tm(_batch([text], st.pad, none, size))["loss_sum"].sum()
    assert after < out["loss_sum"].sum()  # the step trained


def test_flex_attention_refused_at_start_on_cpu(tmp_path, monkeypatch):
    """No traceback, no model: one line before anything is built (exit 2 through the CLI's
    user-error path)."""
    from janus_train import train
    from janus_train.config import compose, to_run_config
    from janus_train.errors import is_user_error

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train, "build_engine", lambda *a, **k: pytest.fail("engine built"))
    cfg = to_run_config(
        compose(
            [
                "experiment=tiny",
                "train.synthetic_data=true",
                "model.attn_implementation=flex_attention",
                f"train.run_dir={tmp_path}",
            ]
        )
    )
    with pytest.raises(ValueError, match="flex_attention needs CUDA") as e:
        train.run(cfg)
    assert is_user_error(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# the token-budget WebDataset loader: 2 ranks in threads exchanging queue lengths
# ---------------------------------------------------------------------------------------------
def _run_ranks(loaders, steps):
    """next_step() of every loader ``steps`` times, ranks concurrently: [step][rank] batches."""
    from concurrent.futures import ThreadPoolExecutor

    out = []
    with ThreadPoolExecutor(len(loaders)) as ex:
        for _ in range(steps):
            out.append(list(ex.map(lambda L: (L.next_step(), list(L.last_keys)), loaders)))
    return out


@pytest.fixture(scope="module")
def tok_proc(tmp_path_factory):
    from janus_train.model.tokenizer import train_tiny_tokenizer

    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok"), image_size=32, num_image_tokens=16)


def test_token_loader_exact_ratio_balanced_equal_micro_steps_and_exact_resume(
    tok_proc, tmp_path, monkeypatch
):
    from janus_train.batch import task_counts
    from janus_train.config import compose, to_run_config
    from janus_train.data.synthetic import write_tiny_dataset

    monkeypatch.setenv("JANUS_DATA_ROOT", str(tmp_path / "data"))
    write_tiny_dataset(tmp_path / "data", n_shards=4, per_shard=20)
    run = to_run_config(
        compose(["experiment=tiny", "stage=stage2", "experiment.stage2.global_batch_size=10"])
    )  # not a multiple of world 4
    run.data.num_workers, run.data.seq_len = 0, 128
    budget, world, steps = 160, 4, 6
    counts = task_counts({"und": 2, "text": 3, "gen": 5}, 10)
    loaders = thread_token_loaders(run, tok_proc, world, budget)
    got = _run_ranks(loaders[:], 2)
    states = [L.state_dict() for L in loaders]
    got += _run_ranks(loaders, steps - 2)
    seen = []
    for step in got:
        n_micro = {len(mbs) for mbs, _ in step}
        assert len(n_micro) == 1  # every rank runs the same number of micro-steps
        per_task = Counter()
        tokens = []
        for mbs, keys in step:
            tok = 0
            for mb, ks in zip(mbs, keys):
                assert mb["input_ids"].shape[0] == 1 and mb["input_ids"].shape[1] <= budget
                starts = (mb["position_ids"][0] == 0) & (mb["attention_mask"][0] == 1)
                tasks = [("text", "und", "gen")[t] for t in mb["task_ids"][0][starts].tolist()]
                assert len(tasks) == len(ks)
                per_task.update(tasks)
                seen += list(zip(ks, tasks))  # captions feed both und and gen sources
                tok += int(mb["attention_mask"].sum())
            tokens.append(tok)
        assert dict(per_task) == {k: v for k, v in counts.items() if v}  # exact task ratio
        assert imbalance(tokens) < 0.25
    assert len(seen) == len(set(seen)) == steps * 10  # G samples a step, none twice
    # exact resume from the state after step 2
    resumed = _run_ranks(thread_token_loaders(run, tok_proc, world, budget, states), steps - 2)
    for a, b in zip(got[2:], resumed):
        for (ma, ka), (mb_, kb) in zip(a, b):
            assert ka == kb
            for x, y in zip(ma, mb_):
                assert all(torch.equal(x[k], y[k]) for k in x)
    for L in loaders:
        L.close()


def test_config_refuses_mixing_attention_and_a_budget_below_the_sample_length():
    from janus_train.config import compose, to_run_config

    with pytest.raises(ValueError, match="model.attn_implementation='paged|sdpa'"):
        to_run_config(compose(["model.attn_implementation=paged|sdpa"]))
    with pytest.raises(ValueError, match="train.tokens_per_micro=1024 < data.seq_len=4096"):
        to_run_config(compose(["train.tokens_per_micro=1024"]))
    with pytest.raises(ValueError, match="train.synthetic_seq_len=64"):
        to_run_config(compose(["train.tokens_per_micro=32", "train.synthetic_data=true"]))
    to_run_config(compose(["train.tokens_per_micro=0", "model.attn_implementation=eager"]))


class _HostReads:
    """Records the aten ops that read a tensor's value on the host (on CUDA: a sync): scalar
    reads (item, bool, int), nonzero, masked_select, unique, boolean-mask indexing."""

    NAMES = {
        "aten::_local_scalar_dense",
        "aten::nonzero",
        "aten::masked_select",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
    }

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self
        self.hits, self.paused = [], 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func._schema.name
                idx = args[1] if name == "aten::index" and len(args) > 1 else ()
                masked = any(getattr(t, "dtype", None) == torch.bool for t in idx)
                if (name in outer.NAMES or masked) and not outer.paused:
                    outer.hits.append(name)
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


def test_forward_and_backward_read_no_device_value_on_the_host(fresh_tiny_model, monkeypatch):
    """With the micro-batch's index computed on the host (what the trainer does), the training
    forward and backward through the CUDA default's path (torch_varlen) read no tensor value on
    the host: no sync inside a micro-step. (The CPU reference kernel stands in for PyTorch's
    and is excluded; without the host index the forward computes it itself, and is seen to.)"""
    import functools

    from janus_train.model import attention as at
    from janus_train.model.forward import with_index
    from tests.helpers import mixed_batch

    model, proc = fresh_tiny_model
    at.set_llm_attention(model, "torch_varlen")
    rec = _HostReads()
    real = at.varlen_attn_reference

    @functools.wraps(real)
    def kernel(*a, **k):  # on CUDA: torch's varlen_attn, no host reads
        rec.paused += 1
        try:
            return real(*a, **k)
        finally:
            rec.paused -= 1

    monkeypatch.setattr(at, "varlen_attn_reference", kernel)
    batch = mixed_batch(model, proc.tokenizer)
    assert batch.get("position_ids") is not None and batch["pixel_values"].shape[0] > 0
    tm = JanusTrainModel(model)
    indexed = with_index(batch, model)  # on the host, before the (here absent) copy
    with rec.mode:
        out = tm(indexed)
    with rec.mode:
        out["loss_sum"].sum().backward()
    assert (out["n_tokens"] > 0).all()
    assert rec.hits == []
    with rec.mode:
        tm(batch)  # no host index: the forward derives it (a sync on CUDA), and is caught
    assert "aten::nonzero" in rec.hits


def test_flash_stand_in_and_torch_varlen_match_the_installed_transformers():
    """The flash stand-in takes what HF's ``flash_attention_forward`` takes, is registered with
    the mask function HF uses for flash_attention_2, and the four varlen arguments it checks are
    the ones HF's flash code reads (fewer: it would fall back to causal attention over the whole
    row); ``torch_varlen``'s function has the same interface."""
    import inspect

    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
    from transformers.modeling_flash_attention_utils import _flash_attention_forward

    from janus_train.model.attention import varlen_attention_forward

    def head(fn, skip_self=False):
        ps = list(inspect.signature(fn).parameters.values())[int(skip_self) :]
        return [(p.name, p.default) for p in ps if p.kind is p.POSITIONAL_OR_KEYWORD][:7]

    hf = head(flash_attention_forward)
    mine = {"dropout": 0.0, "scaling": None}  # keyword defaults HF's call passes by name
    assert [n for n, _ in hf[:5]] == ["module", "query", "key", "value", "attention_mask"]
    assert {n: d for n, d in hf[5:] if n in mine} == mine
    for fn in (_FlashStandIn.__call__, varlen_attention_forward):
        got = head(fn, skip_self=fn is _FlashStandIn.__call__)
        assert [n for n, _ in got[:5]] == [n for n, _ in hf[:5]], fn
        assert {n: d for n, d in got[5:] if n in mine} == mine, fn
    varlen = ["cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"]
    assert set(varlen) <= set(inspect.signature(_flash_attention_forward).parameters)
    assert varlen[0] in inspect.getsource(_flash_attention_forward)
    assert ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"] is flash_attention_mask
    e = torch.zeros(0, dtype=torch.long)
    ix = fwd.BatchIndex(e, e, e, e, e, e, torch.tensor([0, 1], dtype=torch.int32), 1)
    assert set(ix.varlen_kwargs()) == set(varlen)  # what the forward passes
