"""Multi-process trainer tests: real DeepSpeed on 2 CPU ranks (gloo) through torchrun.

Two kinds of launch keep the wall time low (each torchrun start costs seconds):

* one ``scenarios`` launch runs, in the same two processes: every stage for 2 steps under
  ZeRO-2 and ZeRO-3; the gradient of a 2-rank x 2-accumulation step taken through the loop's
  own ``train_step`` (ZeRO-2 token mean, ZeRO-3 task-mean sum, padded and packed) for
  comparison against a single-process plain-torch computation on the same 4 samples as one
  batch; bf16 ZeRO-2 and ZeRO-3 runs (losses against the fp32 ones, VQ codes against an fp32
  VQ's float64 argmax); ZeRO-3 with rank 1 text-only; non-finite updates (skip, then stop); the
  uninterrupted 6-step reference run of the resume test;
* a chain of launches of one 6-step command (asynchronous saves) that is killed with SIGKILL
  while committing the step-4 checkpoint, SIGKILLed mid-step 5, SIGTERMed (one rank only) in
  step 5, then completed; per-step losses and final weights must equal the uninterrupted run's
  bitwise (the LoRA chain, with synchronous saves, shares the last launch).

LoRA (``model.lora``) rides along: a ZeRO-1 stage-3 run, the gradient comparison with adapters
(ZeRO-2, packed rows), and a ZeRO-3 6-step reference for a shorter SIGKILL-then-resume chain and
the merged export (hf/ against peft's own forward of adapter/).

This file is also the worker script: ``python tests/test_train_dist.py <scenario> <dir> [mode]``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_utils import run_torchrun  # noqa: E402

pytestmark = pytest.mark.dist
SELF = str(Path(__file__).resolve())
SEQ = 40
# adapters on the LLM; random B so that every adapter parameter gets a gradient at step 1
LORA = ["model.lora.enabled=true", "model.lora.groups=[llm]", "model.lora.init=random"]
LORA_GRAD = [*LORA, "model.lora.dropout=0"]  # the reference cannot replay dropout masks
# dropout RNG restored on resume; synchronous saves (the full chain's are asynchronous)
LORA_RESUME = [*LORA, "model.lora.dropout=0.1", "train.ckpt_async=false"]
CHUNKED = ("model.loss_chunk_tokens=5",)  # the reference computes all logits at once


# ---------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------
def make_run(root, name, stage="stage2", zero=2, steps=2, gbs=4, extra=()):
    from janus_train.config import compose, to_run_config

    ov = [
        f"stage={stage}",
        f"deepspeed=zero{zero}",
        "train.synthetic_data=true",
        f"train.run_dir={root}/{name}",
        f"experiment.{stage}.steps={steps}",
        f"experiment.{stage}.global_batch_size={gbs}",
        "train.log_every=1",
        "train.ckpt_every=0",
        "train.export_at_end=false",
        "train.progress_bar=false",
        f"train.synthetic_seq_len={SEQ}",
        *extra,
    ]
    return to_run_config(compose(ov))


def _grads(root, name, zero, reduction, tokens_per_micro=0, extra=()):
    """Full gradients of one optimizer step of 2 ranks x 2 micro-batches, taken through the
    loop's own ``train.train_step`` (its token-count all-reduce, loss weights and loss scale):
    captured when the loop calls ``engine.step()`` at the accumulation boundary, just before
    the update. Rank 0 saves them with the step's all-reduced loss and token counts. With
    ``tokens_per_micro``: the same 4 samples balanced over the ranks by tokens and packed into
    rows of at most that many tokens (micro-step counts agreed, empty micro-steps where a rank
    has fewer); each rank records its rows' token counts."""
    from deepspeed.utils import safe_get_full_grad

    from janus_train import train
    from janus_train.trainer.distributed import barrier, setup_distributed
    from janus_train.trainer.guard import RunGuard
    from janus_train.trainer.metrics import Throughput

    run = make_run(
        root,
        name,
        "stage2",
        zero,
        extra=[
            f"train.loss_reduction={reduction}",
            f"train.tokens_per_micro={tokens_per_micro}",
            "train.micro_batch_size=1",
            *extra,
        ],
    )
    info = setup_distributed()
    prep = train.prepare(run, info)
    assert prep.spec.plan.grad_accum == 2 and prep.spec.plan.world_size == 2
    t = train.build_engine(run, prep.spec, info, prep.ds_config, prep.run_dir)
    loader = train.build_loader(run, prep.spec, t.processor, info.rank)
    rows: list[int] = []
    next_step = loader.next_step

    def recording_next_step():
        micro = next_step()
        rows.extend(int(b["attention_mask"].sum()) for b in micro)
        if tokens_per_micro:
            assert all(b["input_ids"].shape[0] == 1 for b in micro)  # one packed row each
        return micro

    loader.next_step = recording_next_step
    grads: dict[str, torch.Tensor] = {}
    engine_step = t.engine.step

    def capturing_step(*a, **k):
        if t.engine.is_gradient_accumulation_boundary():  # the update: grads are final
            for pname, p in t.janus.named_parameters():
                if p.requires_grad:
                    g = safe_get_full_grad(p)  # collective under ZeRO-3
                    grads[pname] = g.detach().clone().cpu()
        return engine_step(*a, **k)

    t.engine.step = capturing_step
    with RunGuard(run.train.stop_grace_s) as guard:
        out = train.train_step(run, prep.spec, t, loader, 0, guard, Throughput(t.flops), True)
    assert grads and out.applied
    if tokens_per_micro:
        (Path(root) / f"{name}.rank{info.rank}.json").write_text(json.dumps(rows))
    if info.is_main:
        torch.save(
            {"grads": grads, "loss": out.loss, "n_tokens": out.n_tokens.tolist()},
            Path(root) / f"{name}.pt",
        )
    barrier()


def _text_only_rank1(root):
    """ZeRO-3, stage 3 (SigLIP trains): rank 1's micro-batches are text-only."""
    from janus_train import train
    from janus_train.data.synthetic_loader import SyntheticStepLoader

    class Loader(SyntheticStepLoader):
        def tasks_for_step(self, step):
            return ["und", "text", "gen", "text"]  # rows 1, 3 (rank 1) text only

    orig = train.build_loader
    train.build_loader = lambda run, spec, proc, rank: Loader(
        proc, run.model, spec.plan, spec.ratio, rank=rank, seq_len=run.train.synthetic_seq_len
    )
    try:
        assert (
            train.run(
                make_run(root, "text_only_z3", "stage3", 3, extra=["train.tokens_per_micro=0"])
            )
            == 0
        )
    finally:
        train.build_loader = orig


def _nonfinite(root):
    """NaN gradients in chosen steps: skipped and counted; K in a row stop the run."""
    import torch.distributed as dist

    from janus_train import train
    from janus_train.model import JanusTrainModel

    orig = JanusTrainModel.forward
    state = {"calls": 0, "bad": set()}

    def forward(self, batch):
        out = orig(self, batch)
        state["calls"] += 1
        if (state["calls"] - 1) // 2 + 1 in state["bad"]:  # 2 micro-batches per step
            out["loss_sum"] = out["loss_sum"] * float("nan")
        return out

    JanusTrainModel.forward = forward
    try:
        for zero in (2, 3):
            state.update(calls=0, bad={2})
            run = make_run(
                root,
                f"nan_skip_z{zero}",
                "stage1",
                zero,
                steps=4,
                extra=["train.ckpt_every=1", "train.keep_last=10", "train.tokens_per_micro=0"],
            )
            assert train.run(run) == 0
        state.update(calls=0, bad={2, 3, 4, 5})
        run = make_run(
            root,
            "nan_stop",
            "stage1",
            2,
            steps=5,
            extra=[
                "train.ckpt_every=1",
                "train.max_consecutive_skips=2",
                "train.tokens_per_micro=0",
            ],
        )
        try:
            train.run(run)
            msg = None
        except RuntimeError as e:
            msg = str(e)
        if dist.get_rank() == 0:
            (Path(root) / "nan_stop.json").write_text(json.dumps({"error": msg}))
    finally:
        JanusTrainModel.forward = orig


def resume_run(root, name="resume", extra=()):
    # packed rows of <= SEQ tokens: several micro-steps per step, their count varying
    return make_run(
        root,
        name,
        "stage2",
        3,
        steps=6,
        extra=[
            "train.ckpt_every=2",
            "train.export_at_end=true",
            f"train.tokens_per_micro={SEQ}",
            *extra,
        ],
    )


def _install_fake_eval(root):
    """Stand-in ``janus_train.evaluate``: records its calls; runs a forward on every rank;
    each rank writes its step and what ``is_main_process`` (evaluate's writer test) says."""
    import types

    import torch.distributed as dist

    from janus_train.trainer.distributed import is_main_process

    def run_eval(model, processor, spec, model_cfg, data, ev, step, out_dir):
        model.eval()
        with torch.no_grad():
            ids = processor.tokenizer("a red circle", return_tensors="pt").input_ids
            logits = model(input_ids=ids).logits  # collective under ZeRO-3
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / f"rank{dist.get_rank()}").write_text(f"{step} {is_main_process()}")
        return {"fake_logit_mean": float(logits.float().mean())}

    sys.modules["janus_train.evaluate"] = types.SimpleNamespace(run_eval=run_eval)


def _bf16_run(root, zero):
    """Stage 2 in bf16 on CPU (``resolve_precision`` would fall back to fp32 there): the same
    data, init and options as the fp32 ``stage2_z{zero}`` run. Records, per rank and VQ call,
    the dtype the VQ ran in, whether ZeRO manages its weights, the pixels and the codes."""
    import torch.distributed as dist

    from janus_train import train
    from janus_train.model import JanusTrainModel

    seen = []
    orig_resolve, orig_encode = train.resolve_precision, JanusTrainModel.encode_images

    def encode_images(self, px):
        codes = orig_encode(self, px)
        w = self.janus.model.vqmodel.quant_conv.weight
        seen.append((str(w.dtype), hasattr(w, "ds_id"), px.clone(), codes.clone()))
        return codes

    train.resolve_precision = lambda requested: requested
    JanusTrainModel.encode_images = encode_images
    extra = ["deepspeed.precision=bf16"]
    if zero == 3:
        extra.append("model.gradient_checkpointing=true")  # as stage2_z3
    try:
        assert train.run(make_run(root, f"bf16_stage2_z{zero}", "stage2", zero, extra=extra)) == 0
    finally:
        train.resolve_precision, JanusTrainModel.encode_images = orig_resolve, orig_encode
    torch.save(seen, Path(root) / f"bf16_vq_z{zero}.rank{dist.get_rank()}.pt")


INIT_FROM = [  # stage 3 trains every group but the VQ, with weight decay; LoRA on SigLIP
    "experiment.stage3.weight_decay=0.1",
    "model.reinit_gen_modules=true",
    "model.tokenizer=null",
    "model.lora.enabled=true",
    "model.lora.groups=[und_encoder]",
    "model.lora.init=random",
]


def _init_from_z3(root):
    """ZeRO-3 runs of stage 3 from ``model.init_from`` (``stage3_z3``'s export): built and
    loaded partitioned (``partitioned_load``), and whole then partitioned by
    ``deepspeed.initialize`` (the reference: ``partitioned_load`` returning None, as before
    issue 22). Records per run and rank: the parameter elements ``build_model`` left on the
    rank (held) against the model's (full), whether the VQ is whole fp32 outside ZeRO, the
    FLOP counter's parameter count, and (rank 0) every weight gathered after the engine."""
    import deepspeed
    import torch.distributed as dist

    from janus_train import train
    from janus_train.model.freeze import full_numel
    from janus_train.model.vq_codes import vq_state_dict

    orig_build_model, orig_engine, orig_load = (
        train.build_model,
        train.build_engine,
        train.partitioned_load,
    )
    seen: dict = {}

    def build_model(*a, **k):
        janus, proc = orig_build_model(*a, **k)
        vq = janus.model.vqmodel.quant_conv.weight
        seen["vq_whole_fp32"] = vq.dtype == torch.float32 and not hasattr(vq, "ds_id")
        # a partitioned parameter's elements on this rank are its shard (ds_tensor)
        seen["held"] = sum(getattr(p, "ds_tensor", p).numel() for p in janus.parameters())
        seen["full"] = sum(full_numel(p) for p in janus.parameters())
        seen["vq"] = sum(p.numel() for p in janus.model.vqmodel.parameters())
        return janus, proc

    def build_engine(*a, **k):
        t = orig_engine(*a, **k)
        seen["flop_params"] = t.flops.n_params
        params = dict(t.janus.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            weights = {n: p.detach().clone() for n, p in params.items()}
        weights.update({k: v.clone() for k, v in vq_state_dict(t.janus).items()})
        if dist.get_rank() == 0:
            torch.save(weights, Path(root) / f"{seen['name']}.weights.pt")
        return t

    ckpt = Path(root) / "stage3_z3" / "hf"
    train.build_model, train.build_engine = build_model, build_engine
    try:
        for name, whole in (("init_from_z3", False), ("init_from_z3_whole", True)):
            seen.clear()
            seen["name"] = name
            if whole:
                train.partitioned_load = lambda ds_config: None
            run = make_run(root, name, "stage3", 3, extra=[f"model.init_from={ckpt}", *INIT_FROM])
            assert train.run(run) == 0
            path = Path(root) / f"{name}.rank{dist.get_rank()}.json"
            path.write_text(json.dumps(seen))
    finally:
        train.build_model, train.build_engine = orig_build_model, orig_engine
        train.partitioned_load = orig_load


def scenario_main(root):
    from janus_train import train

    _install_fake_eval(root)
    extras = {
        # the in-training eval call point (prepare checks the held-out shards: scen writes one)
        ("stage1", 2): ["eval.every=1", f"eval.recipe={root}/heldout.yaml"],
        ("stage2", 3): ["model.gradient_checkpointing=true"],
        ("stage3", 2): ["train.export_at_end=true"],
        ("stage3", 3): ["train.export_at_end=true"],
    }
    for stage in ("stage1", "stage2", "stage3"):
        for zero in (2, 3):
            run = make_run(
                root, f"{stage}_z{zero}", stage, zero, extra=extras.get((stage, zero), [])
            )
            assert train.run(run) == 0
    _init_from_z3(root)
    _bf16_run(root, 2)
    _bf16_run(root, 3)
    _grads(root, "grad_token_mean_z2", 2, "token_mean")
    _grads(root, "grad_task_mean_sum_z3", 3, "task_mean_sum")
    _grads(root, "grad_packed_token_mean_z2", 2, "token_mean", tokens_per_micro=SEQ)
    _grads(root, "grad_packed_task_mean_sum_z3", 3, "task_mean_sum", tokens_per_micro=SEQ)
    _grads(  # the heads' CE in chunks of 5 tokens (recomputed in backward) under ZeRO-3
        root,
        "grad_chunked_packed_task_mean_sum_z3",
        3,
        "task_mean_sum",
        tokens_per_micro=SEQ,
        extra=CHUNKED,
    )
    _grads(
        root,
        "grad_lora_packed_token_mean_z2",
        2,
        "token_mean",
        tokens_per_micro=SEQ,
        extra=LORA_GRAD,
    )
    run = make_run(
        root,
        "lora_stage3_z1",
        "stage3",
        1,
        extra=[*LORA, "model.lora.groups=[llm,und_encoder]", "train.export_at_end=true"],
    )
    assert train.run(run) == 0
    _text_only_rank1(root)
    _nonfinite(root)
    ref = make_run(
        root,
        "uninterrupted",
        "stage2",
        3,
        steps=6,
        extra=["train.ckpt_every=2", "train.export_at_end=true", f"train.tokens_per_micro={SEQ}"],
    )
    assert train.run(ref) == 0
    assert train.run(resume_run(root, "uninterrupted_lora", LORA_RESUME)) == 0


def scenario_resume(root, mode, variant=""):
    """One launch of the resumable command, with a fault injected per ``mode``."""
    import torch.distributed as dist

    from janus_train import train
    from janus_train.data.synthetic_loader import SyntheticStepLoader
    from janus_train.model import JanusTrainModel
    from janus_train.trainer import ckpt_save

    current = {"step": -1, "calls": 0}
    orig_next, orig_fwd, orig_commit = (
        SyntheticStepLoader.next_step,
        JanusTrainModel.forward,
        ckpt_save._commit,
    )

    def next_step(self):
        current.update(step=self.step, calls=0)
        if mode == "sigterm" and self.step == 4 and dist.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # one rank only: the flag is all-reduced
        return orig_next(self)

    def forward(self, batch):
        current["calls"] += 1
        if (
            mode == "kill_mid_step"
            and current["step"] == 4
            and current["calls"] == 2
            and dist.get_rank() == 1
        ):
            os.kill(os.getpid(), signal.SIGKILL)
        return orig_fwd(self, batch)

    def commit(src, dst):
        if mode == "kill_in_save" and dst.name == "step_00000004":
            os.kill(os.getpid(), signal.SIGKILL)
        return orig_commit(src, dst)

    SyntheticStepLoader.next_step, JanusTrainModel.forward = next_step, forward
    ckpt_save._commit = commit
    full, lora = resume_run(root), resume_run(root, "resume_lora", LORA_RESUME)
    # "both": the last launch of the two chains completes both runs (one torchrun start less)
    from janus_train.trainer.distributed import exit_finished

    rc = 0
    for run in {"": [full], "lora": [lora], "both": [full, lora]}[variant]:
        rc = train.run(run)
        if rc != 0:
            break
    exit_finished(rc)  # as janus-train's main does after a run that returned


# ---------------------------------------------------------------------------------------------
# test side
# ---------------------------------------------------------------------------------------------
def _metrics(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def scen(tmp_path_factory):
    from janus_train.data.synthetic import text_records
    from janus_train.data.tario import write_tar

    root = tmp_path_factory.mktemp("train_dist")
    write_tar(root / "heldout-0.tar", text_records(0, 2))
    src = {"name": "t", "task": "text", "format": "text", "shards": str(root / "heldout-0.tar")}
    (root / "heldout.yaml").write_text(json.dumps({"name": "heldout", "sources": [src]}))
    res = run_torchrun([SELF, "main", str(root)], timeout=400)
    assert res.returncode == 0, res.output[-6000:]
    return root


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
@pytest.mark.parametrize("zero", [2, 3])
def test_stage_runs(scen, stage, zero):
    d = scen / f"{stage}_z{zero}"
    ds = json.loads((d / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == zero
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 4
    assert ds["bf16"]["enabled"] is False  # CPU: fp32
    recs = [r for r in _metrics(d / "metrics.jsonl") if "loss" in r]  # not eval records
    assert [r["step"] for r in recs] == [1, 2]
    for key in (
        "loss",
        "loss/text",
        "loss/und",
        "loss/gen",
        "optim/lr",
        "optim/grad_norm",
        "speed/tokens_per_s",
        "speed/samples_per_s",
        "data/skipped/synthetic",
    ):
        assert key in recs[-1], key
    assert "speed/mfu" not in recs[-1]  # CPU: no peak FLOPs
    # token-budget rows (default): unpadded, one micro-step per rank here, so every slot is real
    assert all(r["data/token_fill"] == 1.0 and 0 <= r["data/rank_imbalance"] < 1 for r in recs)
    assert all(r["optim/skipped_steps"] == 0 for r in recs)
    assert sum(v for k, v in recs[-1].items() if k.startswith("data/samples/")) == 8
    for r in recs:
        parts = {t: (r[f"loss/{t}"], r[f"tokens/{t}"]) for t in ("text", "und", "gen")}
        total = sum(n for _, n in parts.values())
        mean = sum(v * n for v, n in parts.values() if n) / total
        assert r["loss"] == pytest.approx(mean, rel=1e-9)
    trainable = json.loads((d / "trainable.json").read_text())
    assert trainable["vq"]["trainable"] == 0
    assert (d / "checkpoints" / "latest").read_text() == "step_00000002"


def _reference_grads(tmp_path, reduction, extra=()):
    """Plain torch, one process: the same 4 samples as one batch, loss from its definition."""
    from janus_train.batch import BatchPlan
    from janus_train.config import compose, to_run_config
    from janus_train.model import JanusTrainModel, apply_freeze, build_model, set_train_mode
    from tests.helpers import concat_batches, synthetic_loader

    run = to_run_config(
        compose(
            ["stage=stage2", "train.synthetic_data=true", f"train.synthetic_seq_len={SEQ}", *extra]
        )
    )
    janus, proc = build_model(run.model, workdir=tmp_path)
    apply_freeze(janus, run.trainable_groups, run.model.lora)
    set_train_mode(janus, run.trainable_groups)
    loader = synthetic_loader(run, proc, plan=BatchPlan(4, 1, 4, 1))
    batch = concat_batches(loader.next_step())
    out = JanusTrainModel(janus)(batch)
    s, n = out["loss_sum"].double(), out["n_tokens"].double()
    loss = s.sum() / n.sum() if reduction == "token_mean" else (s[n > 0] / n[n > 0]).sum()
    loss.backward()
    grads = {k: p.grad for k, p in janus.named_parameters() if p.requires_grad}
    return grads, float(loss.detach()), n.long().tolist()


@pytest.mark.parametrize(
    "name,reduction,extra",
    [
        ("grad_token_mean_z2", "token_mean", ()),
        ("grad_task_mean_sum_z3", "task_mean_sum", ()),
        ("grad_packed_token_mean_z2", "token_mean", ()),
        ("grad_packed_task_mean_sum_z3", "task_mean_sum", ()),
        ("grad_chunked_packed_task_mean_sum_z3", "task_mean_sum", CHUNKED),
        ("grad_lora_packed_token_mean_z2", "token_mean", LORA_GRAD),  # LLM through adapters only
    ],
)
def test_grad_equivalence(scen, tmp_path, name, reduction, extra):
    """2 ranks x 2 micro-batches through ``train_step``, or the same 4 samples balanced by
    tokens and packed (equal micro-step counts, an empty micro-step where a rank has fewer)
    = 1 batch of 4 in one process, the loss written from its definition (gradients, the
    step loss and its token counts)."""
    if "packed" in name:
        per_rank = [json.loads((scen / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]
        assert len(per_rank[0]) == len(per_rank[1]) >= 2, per_rank
        assert all(0 <= n <= SEQ for r in per_rank for n in r)
    saved = torch.load(scen / f"{name}.pt")
    dist_grads = saved["grads"]
    ref, ref_loss, ref_n = _reference_grads(tmp_path, reduction, extra)
    assert saved["n_tokens"] == ref_n
    assert saved["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert dist_grads.keys() == ref.keys()
    assert any("language_model" in k for k in ref)  # the LLM trains in stage 2
    llm = [k for k in ref if k.startswith(("model.language_model", "lm_head"))]
    assert all(".lora_" in k for k in llm) == (extra == LORA_GRAD)  # LoRA: only its adapters
    for k, g in ref.items():
        assert g is not None and g.abs().sum() > 0, k
        # fp32 sums in another order: error relative to the tensor's scale, not elementwise
        err = (dist_grads[k] - g).abs().max().item()
        assert err <= 1e-5 * g.abs().max().item(), (k, err, g.abs().max().item())


@pytest.mark.parametrize("zero", [2, 3])
def test_bf16_run_losses_within_tolerance_of_fp32(scen, zero):
    """A 2-rank bf16 run on CPU trains (its DeepSpeed config has bf16 on) and its per-step
    losses, per task too, are within 2% of the fp32 run on the same data and init (bf16's
    8-bit mantissa: ~0.4% per rounding; measured <0.1% here), yet not equal to them (the run
    really was bf16)."""
    d = scen / f"bf16_stage2_z{zero}"
    ds = json.loads((d / "ds_config.json").read_text())
    assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == zero
    fp32 = {r["step"]: r for r in _metrics(scen / f"stage2_z{zero}" / "metrics.jsonl")}
    bf16 = {r["step"]: r for r in _metrics(d / "metrics.jsonl")}
    assert sorted(bf16) == sorted(fp32) == [1, 2]
    keys = ("loss", "loss/text", "loss/und", "loss/gen")
    for step, r in bf16.items():
        for k in keys:
            assert r[k] == pytest.approx(fp32[step][k], rel=2e-2), (step, k)
    assert any(bf16[s][k] != fp32[s][k] for s in bf16 for k in keys)


@pytest.fixture(scope="module")
def fp32_vq():
    """The runs' VQ, built independently in fp32 (the tiny model's seeded random init)."""
    from janus_train.model import build_model
    from tests.conftest import tiny_run

    janus, _ = build_model(tiny_run(["stage=stage2"]).model)
    return janus.model.vqmodel.eval()


@pytest.mark.parametrize("zero", [2, 3])
def test_bf16_run_assigns_the_fp32_vq_codes(scen, fp32_vq, zero):
    """The generation targets do not depend on the training precision: every code a bf16 run
    assigned in its steps (the synthetic data gives rank 1 one image per step) equals the
    float64 cosine argmax over the latents of the VQ built in fp32 (``helpers.reference_
    codes``); the VQ ran in fp32, outside ZeRO's management. A VQ cast to bf16, as DeepSpeed
    did before, assigns 1 of these 32 codes differently."""
    from tests.helpers import reference_codes

    seen = [c for r in (0, 1) for c in torch.load(scen / f"bf16_vq_z{zero}.rank{r}.pt")]
    assert sum(codes.numel() for *_, codes in seen) >= 32
    for dtype, managed, px, codes in seen:
        assert dtype == "torch.float32" and not managed
        want, _ = reference_codes(fp32_vq, px.float())
        assert torch.equal(codes, want)


def test_eval_call_point_and_gradient_checkpointing(scen):
    recs = _metrics(scen / "stage1_z2" / "metrics.jsonl")
    evals = [r for r in recs if "eval/fake_logit_mean" in r]
    assert [r["step"] for r in evals] == [1, 2]
    for step in (1, 2):
        d = scen / "stage1_z2" / "eval" / f"step_0000000{step}"
        assert sorted(p.name for p in d.iterdir()) == ["rank0", "rank1"]
        main = [(d / f"rank{r}").read_text() for r in (0, 1)]
        assert main == [f"{step} True", f"{step} False"]  # evaluate writes on rank 0 only
    cfg = (scen / "stage2_z3" / "config.yaml").read_text()
    assert "gradient_checkpointing: true" in cfg
    assert [r["step"] for r in _metrics(scen / "stage2_z3" / "metrics.jsonl")] == [1, 2]


def test_zero3_text_only_rank_does_not_hang(scen):
    recs = _metrics(scen / "text_only_z3" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2]
    assert all(r["tokens/text"] > 0 and r["tokens/und"] > 0 and r["tokens/gen"] > 0 for r in recs)


def _module_state(ckpt):
    return torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def test_zero3_init_from_loads_partitioned_and_trains_as_the_whole_load(scen):
    """ZeRO-3 from ``model.init_from``: ``build_model`` leaves each rank its shards only (the
    frozen VQ whole, fp32, outside ZeRO); gathered after the engine, the weights equal the
    checkpoint's bitwise (the re-initialised generation modules and the adapters excepted) and
    the whole load's bitwise (those too: same seeds, rank 0's values kept). Training is then
    bitwise the whole load's: the same values in the same partitions of the same engine."""
    from janus_train.model.lora import is_adapter_param

    ck = _load_safetensors(scen / "stage3_z3" / "hf")
    part, whole = (
        torch.load(scen / f"{n}.weights.pt") for n in ("init_from_z3", "init_from_z3_whole")
    )
    assert part.keys() == whole.keys()
    assert all(torch.equal(part[k], whole[k]) for k in part)
    loaded = {k.replace(".base_layer.", "."): v for k, v in part.items() if not is_adapter_param(k)}
    assert loaded.keys() == ck.keys()
    reinit = ("model.generation_head.", "model.generation_aligner.", "model.generation_embeddings.")
    for k, v in loaded.items():
        assert torch.equal(v, ck[k]) != k.startswith(reinit), k
    for r in (0, 1):
        p, w = (
            json.loads((scen / f"{n}.rank{r}.json").read_text())
            for n in ("init_from_z3", "init_from_z3_whole")
        )
        assert p["vq_whole_fp32"] and w["vq_whole_fp32"]
        assert p["full"] == w["full"] == w["held"] and p["flop_params"] == w["flop_params"]
        assert p["held"] - p["vq"] <= 0.51 * (p["full"] - p["vq"]), p  # half, a shard each
    a, b = (_metrics(scen / n / "metrics.jsonl") for n in ("init_from_z3", "init_from_z3_whole"))
    keys = [k for k in a[0] if k.startswith(("loss", "optim/")) and k != "optim/lr"]
    assert len(a) == len(b) == 2 and "optim/grad_norm" in keys
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    report = [
        json.loads((scen / n / "trainable.json").read_text())
        for n in ("init_from_z3", "init_from_z3_whole")
    ]
    assert report[0] == report[1] and report[0]["total"]["trainable"] > 0


def test_nonfinite_updates_skipped_then_stop(scen):
    for zero in (2, 3):
        recs = _metrics(scen / f"nan_skip_z{zero}" / "metrics.jsonl")
        assert [r["optim/skipped_steps"] for r in recs] == [0, 1, 1, 1]
        assert recs[1]["loss"] is None  # NaN written as null
        assert all(
            r["loss"] is not None and r["optim/grad_norm"] is not None for r in recs[2:]
        )  # training goes on with finite values
    c = scen / "nan_skip_z2" / "checkpoints"
    s1, s2, s3 = (_module_state(c / f"step_0000000{i}") for i in (1, 2, 3))
    trained = [k for k in s1 if "generation_head" in k]
    assert trained and all(torch.equal(s1[k], s2[k]) for k in s1)  # skipped: untouched
    assert any(not torch.equal(s2[k], s3[k]) for k in trained)  # next step updates again
    assert all(torch.isfinite(v).all() for v in s3.values() if v.is_floating_point())
    err = json.loads((scen / "nan_stop.json").read_text())["error"]
    assert err and "2 consecutive non-finite" in err
    c = scen / "nan_stop" / "checkpoints"
    assert (c / "latest").read_text() == "step_00000002"
    state = _module_state(c / "step_00000002")
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def _load_safetensors(d):
    from safetensors.torch import load_file

    return load_file(str(Path(d) / "model.safetensors"))


def _initial_weights(tmp_path):
    from janus_train.config import compose, to_run_config
    from janus_train.model import build_model

    janus, _ = build_model(to_run_config(compose()).model, workdir=tmp_path)
    return janus.state_dict()


def test_export_zero3_consolidated_and_hf_generate(scen, tmp_path):
    from transformers import JanusForConditionalGeneration, JanusProcessor

    z2, z3 = (_load_safetensors(scen / f"stage3_z{z}" / "hf") for z in (2, 3))
    assert z2.keys() == z3.keys()
    for k in z2:  # same data, same init: ZeRO-3 consolidation must match ZeRO-2's weights
        torch.testing.assert_close(z3[k], z2[k], rtol=1e-4, atol=1e-5, msg=k)
    init = _initial_weights(tmp_path)
    trained = [k for k in z3 if k.startswith(("model.aligner", "model.vision_model", "lm_head"))]
    assert all(not torch.equal(z3[k], init[k]) for k in trained)  # stage 3 trains these
    assert all(torch.equal(z3[k], init[k]) for k in z3 if k.startswith("model.vqmodel"))
    d = scen / "stage3_z3" / "hf"
    model = JanusForConditionalGeneration.from_pretrained(str(d)).eval()
    proc = JanusProcessor.from_pretrained(str(d))
    ids = proc.tokenizer("a red circle", return_tensors="pt").input_ids
    text = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False
    )
    assert text.shape == (1, ids.shape[1] + 4)
    boi = proc.tokenizer.convert_tokens_to_ids("<begin_of_image>")
    prompt = torch.cat([ids, torch.tensor([[boi]])], dim=1)
    n_img = model.config.vision_config.num_image_tokens
    torch.manual_seed(0)
    codes = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        generation_mode="image",
        do_sample=True,
        guidance_scale=2.0,
    )
    assert codes.shape == (1, n_img)
    assert int(codes.max()) < model.config.vq_config.num_embeddings
    img = model.decode_image_tokens(codes)
    size = model.config.vision_config.image_size
    assert img.shape == (1, size, size, 3) and torch.isfinite(img).all()  # channels last


def test_resume_after_kills_is_bitwise_identical(scen, tmp_path):
    """Full fine-tuning, asynchronous saves: SIGKILL in rank 0's commit of the step-4
    checkpoint, SIGKILL mid-step 5 (the loop commits the step-4 save only after step 5: it
    resumes from step 2, or from 4 when rank 0 committed it on the way out), SIGTERM to one
    rank in step 5, then completion. LoRA, synchronous saves:
    SIGKILL mid-step 5, then resume from step 4
    (adapter weights and their optimizer state in the checkpoint). Losses, merged exports and
    adapters equal the uninterrupted runs' (in `scen`) bitwise. One launch completes both."""
    from safetensors.torch import load_file

    from janus_train.trainer.checkpoint import verify_checkpoint
    from janus_train.trainer.distributed import DistInfo

    root = scen  # the uninterrupted references ran in `scen`; the chains get their own dir
    chain = tmp_path
    ck = chain / "resume" / "checkpoints"

    res = run_torchrun([SELF, "resume", str(chain), "kill_in_save"], timeout=200)
    assert res.returncode != 0
    assert (ck / "latest").read_text() == "step_00000002"
    assert (ck / ".tmp-step_00000004" / "step_00000004").is_dir()  # the save that died

    res = run_torchrun([SELF, "resume", str(chain), "kill_mid_step"], timeout=200)
    assert res.returncode != 0
    # The loop had not committed the step-4 save yet (it does after step 5); rank 0, leaving on
    # the collective error, commits it alone when rank 1's files were synced before the kill,
    # else it stays under .tmp- (removed at the next start). Either way `latest` verifies.
    latest = (ck / "latest").read_text()
    assert latest in ("step_00000002", "step_00000004")
    assert verify_checkpoint(ck / latest, DistInfo(rank=0, world_size=1, local_rank=0)) == []
    leftovers = [p.name for p in ck.glob(".tmp-*")]
    assert leftovers == ([".tmp-step_00000004"] if latest == "step_00000002" else []), leftovers

    res = run_torchrun([SELF, "resume", str(chain), "sigterm"], timeout=200)
    assert 75 in res.worker_exit_codes(), res.output[-3000:]
    assert (ck / "latest").read_text() == "step_00000005"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000004", "step_00000005"]

    ck_lora = chain / "resume_lora" / "checkpoints"
    res = run_torchrun([SELF, "resume", str(chain), "kill_mid_step", "lora"], timeout=200)
    assert res.returncode != 0
    assert (ck_lora / "latest").read_text() == "step_00000004"
    states = torch.load(
        ck_lora / "step_00000004" / "zero_pp_rank_0_mp_rank_00_model_states.pt",
        weights_only=False,
    )
    optimized = [k for group in states["param_shapes"] for k in group]  # the optimizer's params
    llm = [k for k in optimized if "language_model" in k]
    assert llm and all(".lora_" in k for k in llm)  # adapters (and their state) in the checkpoint

    res = run_torchrun([SELF, "resume", str(chain), "none", "both"], timeout=300)
    assert res.returncode == 0, res.output[-3000:]

    ref = {r["step"]: r["loss"] for r in _metrics(root / "uninterrupted" / "metrics.jsonl")}
    rows = _metrics(chain / "resume" / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), steps  # rows of replayed steps were dropped on resume
    got = {r["step"]: r["loss"] for r in rows}
    assert got == ref and len(ref) == 6
    a = _load_safetensors(root / "uninterrupted" / "hf")
    b = _load_safetensors(chain / "resume" / "hf")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    ref = {r["step"]: r["loss"] for r in _metrics(root / "uninterrupted_lora" / "metrics.jsonl")}
    got = {}
    for r in _metrics(chain / "resume_lora" / "metrics.jsonl"):
        assert got.get(r["step"], r["loss"]) == r["loss"]
        got[r["step"]] = r["loss"]
    assert got == ref and len(ref) == 6
    for sub, name in (("hf", "model.safetensors"), ("adapter", "adapter_model.safetensors")):
        a = load_file(str(root / "uninterrupted_lora" / sub / name))
        b = load_file(str(chain / "resume_lora" / sub / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub


def test_lora_zero1_run_and_export(scen):
    from safetensors.torch import load_file

    d = scen / "lora_stage3_z1"
    assert json.loads((d / "ds_config.json").read_text())["zero_optimization"]["stage"] == 1
    assert [r["step"] for r in _metrics(d / "metrics.jsonl")] == [1, 2]
    rep = json.loads((d / "trainable.json").read_text())
    assert rep["llm"]["adapter"] == rep["llm"]["trainable"] > 0
    assert rep["und_encoder"]["adapter"] == rep["und_encoder"]["trainable"] > 0
    assert rep["gen_head"]["adapter"] == 0 < rep["gen_head"]["trainable"]
    assert not any(".lora_" in k or "base_layer" in k for k in _load_safetensors(d / "hf"))
    adapter = load_file(str(d / "adapter" / "adapter_model.safetensors"))
    assert any("vision_model" in k and ".lora_A." in k for k in adapter)


def test_lora_zero3_merged_export_equals_peft_forward(scen, tmp_path):
    """ZeRO-3: hf/ is merged from the consolidated weights. Its logits equal peft's own
    unmerged forward of adapter/ on the untrained base, within 1e-5."""
    from peft import PeftModel
    from transformers import JanusForConditionalGeneration

    from janus_train.config import compose, to_run_config
    from janus_train.model import build_model

    d = scen / "uninterrupted_lora"
    merged = JanusForConditionalGeneration.from_pretrained(str(d / "hf")).eval()
    base, proc = build_model(to_run_config(compose()).model, workdir=tmp_path)
    adapted = PeftModel.from_pretrained(base, str(d / "adapter")).eval()
    ids = proc.tokenizer("a red circle left of a blue square", return_tensors="pt").input_ids
    with torch.no_grad():
        want = adapted(input_ids=ids, output_hidden_states=True)
        got = merged(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
    head_got = merged.model.generation_head(got.hidden_states[-1])
    head_want = adapted.base_model.model.model.generation_head(want.hidden_states[-1])
    torch.testing.assert_close(head_got, head_want, rtol=0, atol=1e-5)
    init = _initial_weights(tmp_path)
    hf = _load_safetensors(d / "hf")
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(hf[q], init[q])  # adapters merged into the LLM's base weight
    assert torch.equal(hf["lm_head.weight"], init["lm_head.weight"])  # not adapted: frozen


if __name__ == "__main__":
    scenario, root = sys.argv[1], sys.argv[2]
    if scenario == "main":
        from janus_train.trainer.distributed import exit_finished

        scenario_main(root)
        exit_finished(0)
    elif scenario == "init_from":  # the part of main that _init_from_z3 needs, alone
        from janus_train import train
        from janus_train.trainer.distributed import exit_finished

        extra = ["train.export_at_end=true"]
        assert train.run(make_run(root, "stage3_z3", "stage3", 3, extra=extra)) == 0
        _init_from_z3(root)
        exit_finished(0)
    elif scenario == "resume":
        scenario_resume(root, *sys.argv[3:])
    else:
        raise SystemExit(f"unknown scenario {scenario}")
