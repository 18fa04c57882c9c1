"""Token-budget packing: balancing and bin packing against brute force, and packed attention
(every implementation runnable on CPU, plus the flash varlen plumbing through a CPU varlen
reference kernel) against per-sample computation, losses and gradients."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from janus_train.data.packing import (
    assign_balanced,
    balance_takes,
    imbalance,
    layout,
    pack_micro,
)
from janus_train.model import JanusTrainModel, resolve_special_tokens
from janus_train.model import forward as fwd

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
    assert lay.packs[1] == [[0], [1]] and lay.packs[2] == [[], []] and lay.tokens == [90, 90, 0]
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


def _varlen_reference(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    cu_seq_lens_q=None,
    max_length_q=None,
    **kwargs,
):
    """What a flash varlen kernel computes, on CPU: causal attention within each cu_seqlens
    segment of the flattened (B*T) token stream, nothing across segments."""
    assert attention_mask is None and cu_seq_lens_q is not None and max_length_q is not None
    B, H, T, D = query.shape
    rep = H // key.shape[1]
    q = query.transpose(1, 2).reshape(B * T, H, D)
    k = key.repeat_interleave(rep, 1).transpose(1, 2).reshape(B * T, H, D)
    v = value.repeat_interleave(rep, 1).transpose(1, 2).reshape(B * T, H, D)
    out = torch.empty_like(q)
    cu = cu_seq_lens_q.tolist()
    for a, e in zip(cu[:-1], cu[1:]):
        o = F.scaled_dot_product_attention(
            q[a:e].transpose(0, 1),
            k[a:e].transpose(0, 1),
            v[a:e].transpose(0, 1),
            is_causal=True,
            scale=scaling,
        )
        out[a:e] = o.transpose(0, 1)
    return out.view(B, T, H, D), None


def _impls():
    """eager / sdpa: HF's block-causal mask from the restarts (the CPU path); varlen_reference:
    the flash path's kwargs. flex_attention has no backward on CPU (torch 2.13)."""
    return ["eager", "sdpa", "varlen_reference"]


@pytest.mark.parametrize("impl", _impls())
def test_packed_rows_equal_per_sample_losses_and_grads(fresh_tiny_model, impl, monkeypatch):
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    model, processor = fresh_tiny_model
    model.train()
    for mod in model.modules():  # dropout-free comparison
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    if impl == "varlen_reference":
        # stands in for flash_attention_2 (needs CUDA): same kwargs path, CPU kernel
        AttentionInterface.register(impl, _varlen_reference)
        ALL_MASK_ATTENTION_FUNCTIONS.register(impl, lambda *a, **k: None)
        monkeypatch.setattr(fwd, "VARLEN_IMPLS", (impl,))
    model.model.language_model.config._attn_implementation = impl
    tok = processor.tokenizer
    st = resolve_special_tokens(tok)
    size = model.config.vision_config.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))
    samples = _samples(model, tok, st)
    tm = JanusTrainModel(model)
    # two packed rows (the second shorter, so right-padded), several samples each
    rows = [samples[:4], samples[4:]]
    und_order = [s for row in rows for s in row if s["task"] == 1]
    assert len(und_order) == 2
    packed_loss, packed_grads = _loss_and_grads(tm, [_batch(rows, st.pad, images, size)])
    alone, i_und = [], 0
    for s in [s for row in rows for s in row]:
        img = images[i_und : i_und + 1] if s["task"] == 1 else images[:0]
        i_und += s["task"] == 1
        alone.append(_batch([[s]], st.pad, img, size))
    ref_loss, ref_grads = _loss_and_grads(tm, alone)
    torch.testing.assert_close(packed_loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert packed_grads.keys() == ref_grads.keys()
    for k, g in ref_grads.items():
        torch.testing.assert_close(packed_grads[k], g, rtol=1e-4, atol=1e-6, msg=k)
    # sanity: without the restarts (one long sample per row) the loss differs
    b = _batch(rows, st.pad, images, size)
    b["position_ids"] = torch.arange(b["input_ids"].shape[1]).expand_as(b["input_ids"]).clone()
    with torch.no_grad():
        assert not torch.allclose(tm(b)["loss_sum"], packed_loss, rtol=1e-4)


def test_varlen_kwargs_from_flattened_rows():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 0, 0, 0]])
    kw = fwd.varlen_kwargs(pos, "flash_attention_2")
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 8, 9, 10, 11, 12]
    assert kw["max_length_q"] == 3
    assert fwd.varlen_kwargs(pos, "sdpa") == {}
    with pytest.raises(ValueError, match="position_ids 0"):
        fwd.varlen_kwargs(torch.tensor([[1, 2]]), "flash_attention_2")


def test_attention_that_would_mix_samples_is_refused():
    fwd.check_attn_implementation("sdpa")
    fwd.check_attn_implementation("flash_attention_2")
    with pytest.raises(ValueError, match="model.attn_implementation='paged|sdpa'"):
        fwd.check_attn_implementation("paged|sdpa")


# ---------------------------------------------------------------------------------------------
# the token-budget WebDataset loader: 2 ranks in threads exchanging queue lengths
# ---------------------------------------------------------------------------------------------
class _ThreadExchange:
    """all_gather of python objects between ranks running as threads."""

    def __init__(self, world):
        import threading

        self.slots = [None] * world
        self.barrier = threading.Barrier(world)

    def for_rank(self, rank):
        def exchange(obj):
            self.slots[rank] = obj
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()
            return out

        return exchange


def _run_ranks(loaders, steps):
    """next_step() of every loader ``steps`` times, ranks concurrently: [step][rank] batches."""
    from concurrent.futures import ThreadPoolExecutor

    out = []
    with ThreadPoolExecutor(len(loaders)) as ex:
        for _ in range(steps):
            out.append(list(ex.map(lambda L: (L.next_step(), list(L.last_keys)), loaders)))
    return out


def _token_loaders(proc, run, world, budget, states=None):
    from janus_train.data.loader import build_train_loader

    ex = _ThreadExchange(world)
    loaders = [
        build_train_loader(
            run,
            proc,
            rank=r,
            world_size=world,
            micro_batch_size=1,
            grad_accum=1,
            tokens_per_micro=budget,
            exchange=ex.for_rank(r),
        )
        for r in range(world)
    ]
    for L, sd in zip(loaders, states or []):
        L.load_state_dict(sd)
    return loaders


@pytest.fixture(scope="module")
def tok_proc(tmp_path_factory):
    from janus_train.model.tokenizer import train_tiny_tokenizer

    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok"), image_size=32, num_image_tokens=16)


def test_token_loader_exact_ratio_balanced_equal_micro_steps_and_exact_resume(
    tok_proc, tmp_path, monkeypatch
):
    from janus_train.config import compose, to_run_config
    from janus_train.data.mixing import task_counts
    from janus_train.data.synthetic import write_tiny_dataset

    monkeypatch.setenv("JANUS_DATA_ROOT", str(tmp_path / "data"))
    write_tiny_dataset(tmp_path / "data", n_shards=4, per_shard=20)
    run = to_run_config(
        compose(["experiment=tiny", "stage=stage2", "train.global_batch_size=10"])
    )  # not a multiple of world 4
    run.data.num_workers, run.data.seq_len = 0, 128
    budget, world, steps = 160, 4, 6
    counts = task_counts({"und": 2, "text": 3, "gen": 5}, 10)
    loaders = _token_loaders(tok_proc, run, world, budget)
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
    resumed = _run_ranks(_token_loaders(tok_proc, run, world, budget, states), steps - 2)
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
