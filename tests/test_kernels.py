"""The heads' chunked cross-entropy (``model.loss_chunk_tokens``) against plain full-logits
F.cross_entropy written here, the training forward with and without it, the refusals of
``model.kernels=liger`` where it cannot run, and the Llama modules Liger's patch replaces still
being where it looks for them in HF's Janus model (liger-kernel itself cannot run on CPU)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from janus_train.config import compose, to_run_config
from janus_train.model import JanusTrainModel
from janus_train.model.kernels import build_head_loss, check_kernels_available
from janus_train.model.loss import HeadLoss, chunked_linear_ce
from tests.helpers import IGN, mixed_batch

N, D = 45, 24  # 45 tokens in chunks of 7: 6 full chunks and an uneven one of 3


def _case(kind: str, seed: int = 0):
    """A head (text: Linear without bias; image: JanusVQVAEHead's last Linear, with bias), its
    input, targets with ignored tokens (chunk 2, rows 14..20, wholly ignored) and task groups."""
    g = torch.Generator().manual_seed(seed)
    vocab = 1031 if kind == "text" else 640
    head = nn.Linear(D, vocab, bias=kind == "image")
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, D, generator=g) * 0.3)
        if head.bias is not None:
            head.bias.copy_(torch.randn(vocab, generator=g))
    x = torch.randn(N, D, generator=g, requires_grad=True)
    target = torch.randint(0, vocab, (N,), generator=g)
    target[[0, 5, 33, 44]] = IGN
    target[14:21] = IGN
    group = torch.randint(0, 3, (N,), generator=g) if kind == "text" else torch.zeros(N).long()
    return head, x, target, group


def _reference(x, head, target, group, num_groups):
    """Full logits, fp32, plain F.cross_entropy; per-group sums over supervised tokens."""
    logits = x @ head.weight.t()
    if head.bias is not None:
        logits = logits + head.bias
    sums = []
    for k in range(num_groups):
        m = (group == k) & (target != IGN)
        sums.append(F.cross_entropy(logits[m].float(), target[m], reduction="sum"))
    return torch.stack(sums)


def _loss_and_grads(fn, head, x, target, group, num_groups, upstream):
    for t in (x, *head.parameters()):
        t.grad = None
    sums = fn(x, head, target, group, num_groups)
    (sums * upstream).sum().backward()  # per-task weights, as the trainer's step weights
    return sums.detach(), [t.grad.clone() for t in (x, *head.parameters())]


@pytest.mark.parametrize("kind", ["text", "image"])
@pytest.mark.parametrize("chunk", [7, 45, 100, 0])
def test_chunked_loss_and_grads_equal_full_logits_reference(kind, chunk):
    head, x, target, group = _case(kind)
    k = 3 if kind == "text" else 1
    upstream = torch.tensor([0.7, 1.3, 0.2])[:k]
    ref, ref_g = _loss_and_grads(_reference, head, x, target, group, k, upstream)
    got, got_g = _loss_and_grads(HeadLoss(chunk).group_sums, head, x, target, group, k, upstream)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    for a, b in zip(got_g, ref_g):  # x, weight (, bias)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ref_g[0][14:21].abs().sum() == 0 and ref_g[0][[0, 5, 33, 44]].abs().sum() == 0


class _CountingLinear(nn.Linear):
    rows: list[int]

    def forward(self, x):
        self.rows.append(x.shape[0])
        return super().forward(x)


def test_chunks_are_computed_and_recomputed_one_at_a_time():
    """Chunking really happens: the head's computation runs once per chunk in forward and once
    more per chunk in backward (the recompute), never on more than ``chunk`` rows; all of it
    inside one call of the head module (hooks fire once: ZeRO-3's gathers and module trace)."""
    head, x, target, _ = _case("text")
    counting = _CountingLinear(D, head.out_features, bias=False)
    counting.load_state_dict(head.state_dict())
    counting.rows, calls = [], []
    counting.register_forward_pre_hook(lambda m, i: calls.append(i[0].shape[0]))
    ce = chunked_linear_ce(x, counting, target, 7)
    assert counting.rows == [7] * 6 + [3] and calls == [N]
    ce.sum().backward()
    assert sorted(counting.rows) == sorted([7] * 12 + [3] * 2) and calls == [N]
    assert "forward" not in counting.__dict__  # the module's own forward is back
    counting.rows.clear()
    with torch.no_grad():  # evaluation: chunked, nothing to recompute
        chunked_linear_ce(x, counting, target, 7)
    assert counting.rows == [7] * 6 + [3] and calls == [N, N]


def _forward_and_grads(janus, batch, head_loss):
    janus.zero_grad(set_to_none=True)
    out = JanusTrainModel(janus, head_loss=head_loss)(batch)
    w = torch.tensor([0.5, 2.0, 1.5])  # per-task step weights
    (out["loss_sum"] * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in janus.named_parameters() if p.grad is not None}
    return out, grads


def test_training_forward_same_loss_and_grads_chunked(fresh_tiny_model):
    """Text, understanding and generation samples in one batch: the per-task loss sums and every
    gradient (lm_head, the image head's two Linears, the LLM) equal the unchunked forward's."""
    janus, proc = fresh_tiny_model
    janus.train()
    batch = mixed_batch(janus, proc.tokenizer)
    ref, ref_g = _forward_and_grads(janus, batch, HeadLoss())
    assert (ref["n_tokens"] > 0).all()
    chunk = 5
    assert int(ref["n_tokens"][2]) % chunk  # the image head's last chunk is uneven
    got, got_g = _forward_and_grads(janus, batch, HeadLoss(chunk))
    torch.testing.assert_close(got["loss_sum"], ref["loss_sum"], rtol=1e-6, atol=1e-5)
    assert torch.equal(got["n_tokens"], ref["n_tokens"])
    assert got_g.keys() == ref_g.keys()
    for name in ("lm_head.weight", "model.generation_head.vision_head.weight"):
        assert name in ref_g
    for n, g in ref_g.items():
        torch.testing.assert_close(got_g[n], g, rtol=1e-5, atol=1e-6, msg=n)


# ---- configuration and refusals -------------------------------------------------------------


def test_config_fields_typed_and_checked():
    run = to_run_config(compose(["model.loss_chunk_tokens=256"]))
    assert run.model.kernels == "none" and run.model.loss_chunk_tokens == 256
    assert build_head_loss(run.model, params_partitioned=True) == HeadLoss(256, False, True)
    with pytest.raises(ValueError, match=r"^model.kernels='triton': one of none, liger$"):
        to_run_config(compose(["model.kernels=triton"]))
    with pytest.raises(ValueError, match="model.loss_chunk_tokens=-1"):
        to_run_config(compose(["model.loss_chunk_tokens=-1"]))


def test_liger_refused_without_cuda_or_package(monkeypatch):
    cfg = to_run_config(compose(["model.kernels=liger"])).model  # any machine may plan it
    with pytest.raises(ValueError, match=r"^model.kernels=liger needs CUDA") as e:
        check_kernels_available(cfg, cuda=False)
    assert "\n" not in str(e.value)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "liger_kernel" else real(n, *a)
    )
    with pytest.raises(ValueError, match=r"pip install 'janus-train\[gpu\]'") as e:
        check_kernels_available(cfg, cuda=True)
    assert str(e.value).startswith("model.kernels=liger needs liger-kernel")
    cfg.kernels = "none"
    check_kernels_available(cfg, cuda=False)  # the default runs anywhere


def test_build_model_refuses_liger_before_building(monkeypatch, tmp_path):
    import transformers

    from janus_train.model import build_model

    def never(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(transformers, "JanusForConditionalGeneration", never)
    cfg = to_run_config(compose(["experiment=tiny", "model=tiny", "model.kernels=liger"])).model
    with pytest.raises(ValueError, match="model.kernels=liger needs CUDA"):
        build_model(cfg, workdir=tmp_path)


def test_liger_head_loss_only_where_it_can_read_the_weights(caplog):
    cfg = to_run_config(compose(["model.kernels=liger", "model.loss_chunk_tokens=512"])).model
    with caplog.at_level("WARNING", logger="janus_train.model.kernels"):
        assert build_head_loss(cfg, params_partitioned=True) == HeadLoss(512, True, True)
    assert "under ZeRO-3" in caplog.text and "model.loss_chunk_tokens=512" in caplog.text
    lin = nn.Linear(4, 8)
    assert HeadLoss(liger=True).uses_liger(lin)
    assert not HeadLoss(liger=True, params_partitioned=True).uses_liger(lin)  # ZeRO-3
    assert not HeadLoss(liger=True).uses_liger(nn.Sequential(lin))  # e.g. a LoRA-wrapped head
    assert not HeadLoss().uses_liger(lin)


# ---- what Liger's Llama patch replaces (liger-kernel 0.8.5, monkey_patch.py) ---------------


def test_liger_llama_patch_targets_exist_in_janus_language_model(tiny_model_and_processor):
    from transformers.models.llama import modeling_llama
    from transformers.models.llama.modeling_llama import (
        LlamaAttention,
        LlamaMLP,
        LlamaModel,
        LlamaRMSNorm,
    )

    janus, _ = tiny_model_and_processor
    lm = janus.model.language_model
    # apply_liger_kernel_to_llama(model=lm) finds its base model by this attribute lookup
    assert isinstance(lm, LlamaModel)
    assert getattr(lm, lm.base_model_prefix, lm) is lm
    # RoPE: the module-level function is replaced; attention must look it up by name at call
    params = list(inspect.signature(modeling_llama.apply_rotary_pos_emb).parameters)
    assert params[:4] == ["q", "k", "cos", "sin"] and "unsqueeze_dim" in params
    assert "apply_rotary_pos_emb" in inspect.unwrap(LlamaAttention.forward).__code__.co_names
    assert hasattr(modeling_llama, "LlamaRMSNorm") and hasattr(modeling_llama, "LlamaMLP")
    norms = [lm.norm]
    for layer in lm.layers:
        assert isinstance(layer.self_attn, LlamaAttention)
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
        mlp = layer.mlp
        assert isinstance(mlp, LlamaMLP)  # LigerSwiGLUMLP.forward: down(silu(gate(x)) * up(x))
        assert all(isinstance(getattr(mlp, n), nn.Linear) for n in ("gate_proj", "up_proj"))
        assert isinstance(mlp.down_proj, nn.Linear)
        assert lm.config.hidden_act == "silu"
    for norm in norms:  # LigerRMSNorm.forward reads weight and variance_epsilon
        assert isinstance(norm, LlamaRMSNorm)
        assert norm.weight.shape == (lm.config.hidden_size,)
        assert math.isclose(norm.variance_epsilon, lm.config.rms_norm_eps)


def test_image_head_splits_before_its_last_linear(tiny_model_and_processor):
    """The forward fuses only JanusVQVAEHead's last Linear with the CE: proj_out -> activation
    -> vision_head must still be its whole forward."""
    janus, _ = tiny_model_and_processor
    head = janus.model.generation_head
    assert type(head).__name__ == "JanusVQVAEHead"
    assert isinstance(head.vision_head, nn.Linear)
    assert head.vision_head.out_features == janus.config.vq_config.num_embeddings
    x = torch.randn(3, janus.config.text_config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(
            head.vision_head(head.activation_fn(head.proj_out(x))), head(x), rtol=0, atol=0
        )


def test_zero3_head_with_submodules_is_not_chunked():
    """Under ZeRO-3 a head with sub-modules (LoRA's base layer and adapters) would call them
    once per chunk, a number that differs between ranks: such a head runs unchunked there."""
    head, x, target, group = _case("text")
    counting = _CountingLinear(D, head.out_features, bias=False)
    counting.rows = []
    wrapped = nn.Sequential(counting)
    HeadLoss(7, params_partitioned=True).group_sums(x, wrapped, target, group, 3)
    assert counting.rows == [N]
    counting.rows.clear()
    HeadLoss(7, params_partitioned=False).group_sums(x, wrapped, target, group, 3)
    assert counting.rows == [7] * 6 + [3]


@pytest.mark.slow
def test_bench_loss_runs_and_chunks_lower_the_peak():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    args = ["--tokens", "96", "--hidden", "16", "--chunk", "32", "--repeats", "1"]
    res = subprocess.run(
        [sys.executable, "benchmarks/bench_loss.py", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(x) for x in res.stdout.splitlines()]
    assert [r["vocab"] for r in rows] == [102400, 16384]
    for r in rows:  # one chunk of 32 of 96 tokens: about a third of the logits at once
        assert 0.2 < r["peak_ratio_chunked_over_full"] < 0.6, r
        assert r["max_loss_abs_diff"] < 1e-3 and r["max_grad_rel_diff"] < 1e-5, r


def _train_losses(tmp_path, name, overrides):
    import json

    from janus_train.train import run

    run_dir = tmp_path / name
    cfg = to_run_config(
        compose(
            [
                "experiment=tiny",
                "stage=stage2",
                "deepspeed=zero2",
                "train.synthetic_data=true",
                "train.synthetic_seq_len=40",
                "train.tokens_per_micro=64",
                "experiment.stage2.global_batch_size=8",
                "experiment.stage2.steps=3",
                "train.log_every=1",
                "train.ckpt_every=0",
                "train.export_at_end=false",
                "train.progress_bar=false",
                f"train.run_dir={run_dir}",
                *overrides,
            ]
        )
    )
    assert run(cfg) == 0
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


@pytest.mark.slow
def test_trainer_step_losses_equal_with_chunked_heads(tmp_path, monkeypatch):
    """One process through the real DeepSpeed engine (ZeRO-2): the step losses (updates
    included) with the heads' CE in chunks of 4 tokens equal the unchunked run's."""
    from janus_train.model import loss

    chunk_loops = []
    real = loss._chunks_ce
    monkeypatch.setattr(
        loss, "_chunks_ce", lambda f, x, t, c: chunk_loops.append(c) or real(f, x, t, c)
    )
    full = _train_losses(tmp_path, "full", [])
    assert chunk_loops == []
    chunked = _train_losses(tmp_path, "chunked", ["model.loss_chunk_tokens=4"])
    assert chunk_loops and set(chunk_loops) == {4}  # the setting reached the trainer's model
    assert len(full) == 3
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)


# ---- the Liger wiring, with a stand-in as strict as liger_kernel ------------------------------


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _make_fake_liger(calls: dict):
    """A ``liger_kernel.transformers`` doing what Liger 0.8.5's does, with pure-torch maths
    (HF's formulas, written here) that count their calls: ``apply_liger_kernel_to_llama``
    swaps modeling_llama's RoPE function, RMSNorm and MLP classes process-wide and patches the
    given model's norm and MLP forwards; ``LigerFusedLinearCrossEntropyLoss`` is full-logits
    F.cross_entropy with its reductions (``none``: per token)."""
    import types

    def rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        calls["rope"] += 1
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    def rms_forward(self, x):
        calls["rms_norm"] += 1
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)

    def swiglu_forward(self, x):
        calls["swiglu"] += 1
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class FakeRMSNorm(nn.Module):
        forward = rms_forward

    class FakeSwiGLUMLP(nn.Module):
        forward = swiglu_forward

    def apply_liger_kernel_to_llama(
        rope: bool = True,
        cross_entropy: bool = False,
        fused_linear_cross_entropy: bool = True,
        rms_norm: bool = True,
        swiglu: bool = True,
        model=None,
    ) -> None:
        from transformers.models.llama import modeling_llama

        flags = dict(
            rope=rope, cross_entropy=cross_entropy, rms_norm=rms_norm, swiglu=swiglu,
            fused_linear_cross_entropy=fused_linear_cross_entropy,
        )  # fmt: skip
        calls["patch"].append({**flags, "model": model})
        assert not (cross_entropy and fused_linear_cross_entropy)
        if rope:
            modeling_llama.apply_rotary_pos_emb = rope_fn
        if rms_norm:
            modeling_llama.LlamaRMSNorm = FakeRMSNorm
        if swiglu:
            modeling_llama.LlamaMLP = FakeSwiGLUMLP
        if fused_linear_cross_entropy:
            raise AssertionError("Liger's LM-head loss patch: the Janus heads' loss is ours")
        if model is None:
            return
        base = getattr(model, model.base_model_prefix, model)
        norms = [base.norm] if rms_norm else []
        for layer in base.layers:
            if swiglu:
                layer.mlp.forward = types.MethodType(swiglu_forward, layer.mlp)
            if rms_norm:
                norms += [layer.input_layernorm, layer.post_attention_layernorm]
        for norm in norms:
            norm.forward = types.MethodType(rms_forward, norm)

    rope_fn = rope

    class LigerFusedLinearCrossEntropyLoss(nn.Module):
        def __init__(self, ce_weight=None, ignore_index=-100, reduction="mean", accum_dtype=None):
            super().__init__()
            calls["loss_init"].append((ignore_index, reduction, accum_dtype))
            self.ignore_index, self.reduction = ignore_index, reduction

        def forward(self, lin_weight, _input, target, bias=None):
            calls["loss_rows"].append(_input.shape[0])
            logits = F.linear(_input, lin_weight, bias).float()
            return F.cross_entropy(
                logits, target, ignore_index=self.ignore_index, reduction=self.reduction
            )

    mod = types.ModuleType("liger_kernel.transformers")
    mod.apply_liger_kernel_to_llama = apply_liger_kernel_to_llama
    mod.LigerFusedLinearCrossEntropyLoss = LigerFusedLinearCrossEntropyLoss
    return mod


@pytest.fixture()
def fake_liger(monkeypatch):
    """The stand-in installed as ``liger_kernel.transformers``; modeling_llama's names are
    restored after the test whatever the code under test did."""
    import importlib.machinery
    import sys
    import types

    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    calls = {"patch": [], "loss_init": [], "loss_rows": [], "rope": 0, "rms_norm": 0, "swiglu": 0}
    pkg = types.ModuleType("liger_kernel")
    pkg.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None, is_package=True)
    pkg.transformers = _make_fake_liger(calls)
    monkeypatch.setitem(sys.modules, "liger_kernel", pkg)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", pkg.transformers)
    return calls


def test_liger_head_loss_one_call_per_head_sums_and_grads(fake_liger):
    """The dispatch around Liger's fused CE: one call for every task's tokens (per token, so
    each task's upstream weight reaches its tokens), grouped on the device, against the
    full-logits reference; the image head: one summed call."""
    for kind, k in (("text", 3), ("image", 1)):
        fake_liger["loss_rows"].clear()
        fake_liger["loss_init"].clear()
        head, x, target, group = _case(kind)
        upstream = torch.tensor([0.7, 1.3, 0.2])[:k]
        ref, ref_g = _loss_and_grads(_reference, head, x, target, group, k, upstream)
        fused = HeadLoss(liger=True).group_sums
        got, got_g = _loss_and_grads(fused, head, x, target, group, k, upstream)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
        for a, b in zip(got_g, ref_g):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert fake_liger["loss_rows"] == [N]  # one call, all tokens
        reduction = "none" if k > 1 else "sum"
        assert fake_liger["loss_init"] == [(IGN, reduction, torch.float32)]


def test_build_model_applies_liger_to_this_model_only(fake_liger, monkeypatch, tmp_path):
    """Every patch flag as intended; the patched model's loss and gradients equal an unpatched
    one's (the stand-in's maths are HF's) while its RoPE, RMSNorm and SwiGLU stand-ins really
    run; modeling_llama is left as it was, so a model built afterwards is plain."""
    from transformers.models.llama import modeling_llama

    from janus_train.model import build_model
    from tests.helpers import mixed_batch

    before = {n: getattr(modeling_llama, n) for n in ("apply_rotary_pos_emb", "LlamaRMSNorm")}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("janus_train.model.attention.has_torch_varlen", lambda: False)  # sdpa
    over = ["experiment=tiny", "model=tiny", "model.attn_implementation=sdpa"]
    cfg = to_run_config(compose([*over, "model.kernels=liger"])).model
    janus, proc = build_model(cfg, workdir=tmp_path)
    (call,) = fake_liger["patch"]
    assert call == dict(
        rope=True, cross_entropy=False, fused_linear_cross_entropy=False, rms_norm=True,
        swiglu=True, model=janus.model.language_model,
    )  # fmt: skip
    for n, v in before.items():
        assert getattr(modeling_llama, n) is v, f"modeling_llama.{n} left swapped"
    plain, _ = build_model(to_run_config(compose(over)).model, workdir=tmp_path)
    batch = mixed_batch(janus, proc.tokenizer)
    for m in (janus, plain):
        m.train()
        for mod in m.modules():
            if isinstance(mod, nn.Dropout):
                mod.p = 0.0
    layers = janus.config.text_config.num_hidden_layers
    counts = {k: fake_liger[k] for k in ("rope", "rms_norm", "swiglu")}
    ref, ref_g = _forward_and_grads(plain, batch, HeadLoss())
    assert {k: fake_liger[k] for k in counts} == counts  # the plain model: no Liger
    got, got_g = _forward_and_grads(janus, batch, HeadLoss())
    assert fake_liger["rope"] - counts["rope"] == layers
    assert fake_liger["rms_norm"] - counts["rms_norm"] == 2 * layers + 1
    assert fake_liger["swiglu"] - counts["swiglu"] == layers
    torch.testing.assert_close(got["loss_sum"], ref["loss_sum"], rtol=1e-6, atol=1e-5)
    assert got_g.keys() == ref_g.keys()
    for n, g in ref_g.items():
        torch.testing.assert_close(got_g[n], g, rtol=1e-5, atol=1e-6, msg=n)


# ---- the real liger-kernel, run by Triton's interpreter on CPU ------------------------------


@pytest.fixture(scope="module")
def liger_interpreted():
    """tests/liger_interpreted.py's JSON (its own process: TRITON_INTERPRET=1 must be set
    before Triton compiles anything, and this process may have imported it already)."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    missing = [m for m in ("liger_kernel", "triton") if importlib.util.find_spec(m) is None]
    if missing:  # not imported here: see above
        pytest.skip(f"{' and '.join(missing)} not installed (dev extra; triton: Linux x86_64)")
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    res = subprocess.run(
        [sys.executable, "tests/liger_interpreted.py"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["text", "image"])
def test_real_liger_fused_ce_equals_full_logits_reference(liger_interpreted, kind):
    r = liger_interpreted[kind]
    assert r["loss"] <= 1e-6 * r["loss_scale"] + 1e-5, r
    assert r["grad"] < 1e-5, r  # input, weight (, bias): max error / max magnitude


def test_real_liger_rope_bound_to_one_model_equals_hf_rope(liger_interpreted):
    r = liger_interpreted["rope"]
    assert r["liger_calls"] == [0, 1]  # the plain model none, the patched layer once
    assert r["out"] < 1e-6 and r["grad"] < 1e-6 and not r["ref_has_own_forward"], r


def test_fake_liger_signatures_match_the_installed_liger(liger_interpreted):
    """The stand-in takes what the installed liger-kernel takes (an upgrade that renames or
    reorders an argument fails here, not on a GPU)."""
    sig = liger_interpreted["signatures"]
    fake = _make_fake_liger({})

    def names(fn):
        return [[p.name, repr(p.default)] for p in inspect.signature(fn).parameters.values()]

    assert names(fake.apply_liger_kernel_to_llama) == sig["apply_liger_kernel_to_llama"]
    assert names(fake.LigerFusedLinearCrossEntropyLoss.forward) == sig["loss_forward"]
    init = names(fake.LigerFusedLinearCrossEntropyLoss.__init__)
    assert all(p in sig["loss_init"] for p in init), (init, sig["loss_init"])
    # what janus_train passes exists in the installed library
    from janus_train.model.kernels import LIGER_FLAGS

    assert set(LIGER_FLAGS) | {"model"} == {n for n, _ in sig["apply_liger_kernel_to_llama"]}
    assert {"ignore_index", "reduction", "accum_dtype"} <= {n for n, _ in sig["loss_init"]}
