"""Single-process unit tests of the trainer's parts: batch arithmetic, DeepSpeed config, AdamW
groups, LR schedule, loss weights, checkpoint commit/prune, stop signals, FLOP accounting, the
synthetic loader, and the dry run (which must exit before building a model)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from janus_train.batch import TASKS, BatchPlan, count_supervised, plan_batch
from janus_train.config import compose, to_run_config
from janus_train.data.synthetic_loader import split_by_ratio
from janus_train.model import JanusTrainModel, apply_freeze, build_model
from janus_train.train import step_weights
from janus_train.trainer import checkpoint as ckpt
from janus_train.trainer import ckpt_save
from janus_train.trainer.config import DeepSpeedConfig
from janus_train.trainer.distributed import build_deepspeed_config
from janus_train.trainer.metrics import FlopCounter, MetricsLogger, peak_flops
from janus_train.trainer.optim import build_param_groups, lr_at
from tests.helpers import concat_batches, synthetic_loader

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    run = to_run_config(
        compose(["stage=stage3", "train.synthetic_data=true", "train.synthetic_seq_len=40"])
    )
    janus, proc = build_model(run.model, workdir=tmp_path_factory.mktemp("tiny"))
    apply_freeze(janus, run.trainable_groups)
    return run, janus, proc


def test_plan_batch_derives_accumulation_and_rejects_bad_arithmetic():
    p = plan_batch(256, 4, 16)
    assert (p.grad_accum, p.loss_scale) == (4, 16.0)
    with pytest.raises(ValueError, match="train.micro_batch_size"):
        plan_batch(100, 4, 16)


def test_deepspeed_config_from_typed_config():
    plan = plan_batch(64, 2, 4)
    ds = build_deepspeed_config(
        DeepSpeedConfig(zero_stage=3, offload_optimizer=True, offload_param=True),
        plan,
        "bf16",
        0.1,
        2e-5,
    )
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 8 and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] is True
    opt = ds["optimizer"]
    assert opt["type"] == "AdamW" and opt["params"]["betas"] == [0.9, 0.95]
    assert opt["params"]["weight_decay"] == 0.1 and opt["params"]["torch_adam"] is False
    with pytest.raises(ValueError, match="offload_param"):
        build_deepspeed_config(
            DeepSpeedConfig(zero_stage=2, offload_param=True), plan, "fp32", 0.0, 1e-3
        )


def test_param_groups_no_decay_on_norms_biases_embeddings(tiny):
    _, janus, _ = tiny
    decay, no_decay = build_param_groups(janus, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in janus.named_parameters()}
    d = {names[id(p)] for p in decay["params"]}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert "model.language_model.embed_tokens.weight" in nd
    assert "model.language_model.norm.weight" in nd
    assert any(n.endswith(".bias") for n in nd) and not any(n.endswith(".bias") for n in d)
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in d
    trainable = {n for n, p in janus.named_parameters() if p.requires_grad}
    assert d | nd == trainable and not d & nd
    assert not any(n.startswith("model.vqmodel") for n in d | nd)  # frozen: not in the optimizer


def test_lr_schedule_warmup_constant_cosine():
    lr = 1e-3
    assert [lr_at(s, lr, 4, 20, "constant") for s in range(4)] == [lr * k / 4 for k in (1, 2, 3, 4)]
    assert lr_at(10, lr, 4, 20, "constant") == lr
    assert lr_at(4, lr, 4, 20, "cosine") == pytest.approx(lr)
    assert lr_at(12, lr, 4, 20, "cosine") == pytest.approx(lr / 2)  # half way: cos(pi/2)
    assert lr_at(20, lr, 4, 20, "cosine", min_lr_ratio=0.1) == pytest.approx(lr * 0.1)
    expected = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 16)))
    assert lr_at(7, lr, 4, 20, "cosine", min_lr_ratio=0.1) == pytest.approx(expected)


def test_step_weights():
    n = torch.tensor([0, 30, 10])
    s = torch.tensor([0.0, 60.0, 50.0], dtype=torch.float64)
    assert float((step_weights(n, "token_mean") * s).sum()) == pytest.approx(110 / 40)
    assert float((step_weights(n, "task_mean_sum") * s).sum()) == pytest.approx(2.0 + 5.0)
    assert step_weights(torch.zeros(3, dtype=torch.long), "token_mean").sum() == 0


def test_checkpoint_commit_prune_and_interrupted_save(tmp_path):
    c = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        src = tmp_path / f".tmp-{ckpt.tag_for(step)}" / ckpt.tag_for(step)
        src.mkdir(parents=True)
        (src / "x").write_text(str(step))
        c.mkdir(exist_ok=True)
        ckpt_save._commit(src, c / ckpt.tag_for(step))
        ckpt_save._prune(c, keep_last=2)
    assert ckpt.read_latest(c) == "step_00000006"
    assert sorted(p.name for p in c.iterdir() if p.is_dir()) == ["step_00000004", "step_00000006"]
    # A save that died before its commit leaves `latest` unchanged.
    (c / ".tmp-step_00000008" / "step_00000008").mkdir(parents=True)
    assert ckpt.read_latest(c) == "step_00000006"
    assert ckpt.read_latest(tmp_path / "none") is None


def test_stop_signal_sets_flag_only():
    stop = ckpt.StopSignal()
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.received == signal.SIGUSR1
    finally:
        stop.restore()


def test_peak_flops_lookup():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Some Accelerator") is None


def test_flop_counter_matches_formula(tiny):
    run, janus, _ = tiny
    fc = FlopCounter(janus)
    t = run.model.text
    d, f, L, V = t.hidden_size, t.intermediate_size, t.num_hidden_layers, janus.lm_head.out_features
    layer = 4 * d * d + 3 * d * f + 2 * d  # q k v o, gate up down, two RMSNorms
    n = L * layer + d + d * V  # + final norm + lm_head
    assert fc.n_params == n
    assert fc.per_token(40) == 6 * n + 12 * L * d * 40
    # SigLIP + aligner on one image: matmul FLOPs counted independently from the dimensions.
    v = run.model.vision
    P, dv, p = run.model.num_image_tokens, v.hidden_size, v.patch_size
    per_layer = 2 * P * (4 * dv * dv + 2 * dv * int(dv * v.mlp_ratio)) + 2 * 2 * P * P * dv
    und = 2 * P * 3 * p * p * dv + v.num_hidden_layers * per_layer + 2 * P * (dv * d + d * d)
    assert fc.und_image == pytest.approx(und, rel=0.02)
    assert fc.gen_image > 0
    if not torch.cuda.is_available():
        assert fc.peak is None and fc.mfu(1e12, 1.0, 1) is None  # CPU: no peak, no MFU
    fc.peak = 1e12
    assert fc.mfu(4e12, 2.0, 4) == pytest.approx(0.5)  # FLOPs / (s x ranks x peak)
    batch = {
        "attention_mask": torch.ones(2, 40),
        "input_ids": torch.zeros(2, 40),
        "pixel_values": torch.zeros(3, 3, 32, 32),
    }
    assert fc.batch_flops(batch) == pytest.approx(80 * fc.per_token(40) + 3 * fc.und_image)


def test_metrics_logger_writes_jsonl_on_rank0_only(tmp_path):
    MetricsLogger(tmp_path, enabled=False).log({"step": 1, "loss": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists()
    m = MetricsLogger(tmp_path, enabled=True)
    m.log({"step": 1, "loss": 1.0})
    m.log({"step": 2, "loss": 0.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]


def test_split_by_ratio():
    assert sorted(split_by_ratio(10, {"und": 2, "text": 3, "gen": 5})) == sorted(
        ["und"] * 2 + ["text"] * 3 + ["gen"] * 5
    )
    assert split_by_ratio(4, {"und": 1, "text": 0, "gen": 3}).count("gen") == 3


def test_synthetic_loader_split_invariant_and_resumable(tiny):
    run, janus, proc = tiny

    def loader(rank, world, accum):
        return synthetic_loader(
            run, proc, rank=rank, plan=BatchPlan(world * accum, 1, accum, world)
        )

    one = concat_batches(loader(0, 1, 4).next_step())
    r0, r1 = loader(0, 2, 2).next_step(), loader(1, 2, 2).next_step()
    two = concat_batches([r0[0], r1[0], r0[1], r1[1]])  # row g = m * world + rank
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
    tasks = {TASKS[int(t[0])] for t in one["task_ids"]}
    assert tasks == {"und", "gen"}  # stage 3 ratio und 5 : text 1 : gen 4 over 4 rows -> 2:0:2
    # count_supervised agrees with the forward's own count on the same batch
    out = JanusTrainModel(janus)(one)
    assert torch.equal(out["n_tokens"], count_supervised(one))
    # state_dict = position: a restored loader continues with the same step
    a = loader(1, 2, 2)
    a.next_step()
    b = loader(1, 2, 2)
    b.load_state_dict(a.state_dict())
    x, y = a.next_step(), b.next_step()
    assert all(torch.equal(x[i][k], y[i][k]) for i in range(2) for k in x[i])


def test_dry_run_validates_and_exits_before_building_the_model(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    # --local_rank=0: what the `deepspeed` launcher appends without --no_local_rank
    base = [
        sys.executable,
        "-m",
        "janus_train.train",
        "--local_rank=0",
        "train.synthetic_data=true",
        f"train.run_dir={tmp_path}/ok",
        "train.dry_run=true",
        "experiment.stage1.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.tokens_per_micro=0",
    ]
    res = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    plan = json.loads("\n".join(lines[lines.index("{") : lines.index("}") + 1]))
    assert plan["deepspeed"]["gradient_accumulation_steps"] == 4
    assert not (tmp_path / "ok").exists()  # nothing written: no run dir, no model, no tokenizer
    bad = base[:5] + [
        f"train.run_dir={tmp_path}/bad",
        "train.dry_run=true",
        "experiment.stage1.global_batch_size=7",
        "train.micro_batch_size=2",
        "train.tokens_per_micro=0",
    ]
    res = subprocess.run(bad, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "train.micro_batch_size" in res.stderr + res.stdout
    assert not (tmp_path / "bad" / "ds_config.json").exists()


class _Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(4, 3)
        self.lin = nn.Linear(3, 3)
        self.norm = nn.LayerNorm(3)


def test_param_groups_drop_empty_and_reject_all_frozen():
    m = _Lin()
    m.lin.weight.requires_grad_(False)
    groups = build_param_groups(m, 0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
    for p in m.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_param_groups(m, 0.1)


def test_eval_media_reach_wandb(tmp_path):
    """The evaluation's image grid and answers are logged to wandb at the eval step (a
    recording stand-in for the wandb run object; the payloads are real wandb media)."""
    import wandb
    from PIL import Image

    logged = []

    class Run:
        def log(self, data, step):
            logged.append((step, data))

    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "generated.png")
    rows = [
        {"question": "q1", "answer": "red", "reference": "red", "correct": True},
        {"question": "q2", "answer": "top", "reference": "left", "correct": False},
    ]
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    logger = MetricsLogger(tmp_path, enabled=True)
    logger.log_eval_media(7, tmp_path)  # wandb off: nothing happens
    assert logged == []
    logger.wandb_run = Run()
    logger.log_eval_media(7, tmp_path)
    ((step, data),) = logged
    assert step == 7
    assert isinstance(data["eval/generated"], wandb.Image)
    table = data["eval/answers"]
    assert isinstance(table, wandb.Table)
    assert table.columns == ["answer", "correct", "question", "reference"]
    assert [r[2] for r in table.data] == ["q1", "q2"]


def test_synthetic_packed_steps_same_samples_for_any_world_and_budget(tiny):
    """Token-budget mode: the step's samples (so its summed loss and token counts) do not
    depend on the world size or the budget; ranks get equal micro-step counts, rows <= budget."""
    run, janus, proc = tiny
    model = JanusTrainModel(janus)
    totals = []
    for world, budget in ((1, 400), (2, 64), (3, 40)):
        steps = [
            synthetic_loader(run, proc, rank=r, plan=BatchPlan(6, 1, 1, world, budget)).next_step()
            for r in range(world)
        ]
        assert len({len(s) for s in steps}) == 1
        mbs = [mb for s in steps for mb in s]
        assert all(mb["input_ids"].shape == (1, mb["input_ids"].shape[1]) for mb in mbs)
        assert all(mb["input_ids"].shape[1] <= budget for mb in mbs)
        with torch.no_grad():
            outs = [model(mb) for mb in mbs]
        totals.append((sum(o["loss_sum"] for o in outs), sum(o["n_tokens"] for o in outs)))
    for loss, n in totals[1:]:
        torch.testing.assert_close(loss, totals[0][0], rtol=1e-5, atol=1e-4)
        assert torch.equal(n, totals[0][1])


def test_bf16_gradients_reduced_in_fp32():
    plan = plan_batch(8, 1, 2, tokens_per_micro=64)
    for stage, prec, want, accum in (
        (2, "bf16", "fp32", None),
        (1, "bf16", "fp32", None),
        (3, "bf16", "fp32", "fp32"),  # tests/test_reduce_fp32.py: what DeepSpeed makes of it
        (2, "fp32", None, None),
        (3, "fp32", None, None),
    ):
        ds = build_deepspeed_config(DeepSpeedConfig(zero_stage=stage), plan, prec, 0.0, 1e-3)
        assert ds.get("communication_data_type") == want
        assert ds.get("data_types", {}).get("grad_accum_dtype") == accum
    off = DeepSpeedConfig(zero_stage=3, offload_optimizer=True, offload_param=True)
    ds = build_deepspeed_config(off, plan, "bf16", 0.0, 1e-3)
    assert ds["communication_data_type"] == "fp32" and "data_types" not in ds
    ds = build_deepspeed_config(
        DeepSpeedConfig(zero_stage=2, reduce_fp32=False), plan, "bf16", 0.0, 1e-3
    )
    assert "communication_data_type" not in ds
    # token-budget plan: DeepSpeed's nominal batch arithmetic stays consistent
    assert (
        ds["train_batch_size"]
        == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
        and ds["gradient_accumulation_steps"] == 4
    )


@pytest.mark.slow
def test_wandb_run_id_survives_a_resume(tmp_path, monkeypatch):
    """``train.wandb=true`` (offline, no API key): the run stopped at step 1 and its resume
    log to one wandb run; its id is saved with the train state."""
    from janus_train import train
    from tests.conftest import tiny_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = tmp_path / "run"

    def run(*extra):
        cfg = tiny_run(
            [
                "stage=stage1",
                "train.synthetic_data=true",
                "train.synthetic_seq_len=32",
                "experiment.stage1.steps=2",
                "experiment.stage1.global_batch_size=2",
                f"train.run_dir={run_dir}",
                "train.log_every=1",
                "train.ckpt_every=1",
                "train.export_at_end=false",
                "train.progress_bar=false",
                "train.wandb=true",
                *extra,
            ]
        )
        assert train.run(cfg) == 0

    run("experiment.stage1.stop_at=1")
    first = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    run()
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(first) == 1 and len(runs) == 2, runs
    ids = {name.rsplit("-", 1)[1] for name in runs}
    assert len(ids) == 1, runs  # the resume continued the same run id
    saved = torch.load(
        run_dir / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt",
        weights_only=False,
    )
    assert saved["janus_train"]["wandb_id"] == ids.pop()


@pytest.mark.parametrize("outcome", ["done", "requeue", "error", "user error"])
def test_main_destroys_the_process_groups_after_a_finished_run(monkeypatch, capsys, outcome):
    """``janus-train``'s ``main`` leaves through ``exit_finished`` with the run's status when
    the run returned (done or requeued): no finalization racing gloo's threads (SIGABRT; see
    ``tests/test_clean_exit.py``); an error keeps its own exit path: a crash raises, a user
    error is one line and exit 2."""
    from janus_train import train

    calls = []
    monkeypatch.delenv("JANUS_DEBUG", raising=False)
    monkeypatch.delenv("JANUS_USER_ERROR_FILE", raising=False)

    def hydra_main():
        if outcome == "error":
            train._error = RuntimeError("boom")
        elif outcome == "user error":
            try:
                plan_batch(7, 2, 1)
            except ValueError as e:  # raised in the package: a user error
                train._error = e
        else:
            train._exit_status = {"done": 0, "requeue": ckpt.EXIT_REQUEUE}[outcome]

    monkeypatch.setattr(train, "_hydra_main", hydra_main)

    def exit_finished(status):
        calls.append(status)
        raise SystemExit(status)

    monkeypatch.setattr(train, "exit_finished", exit_finished)
    monkeypatch.setattr(train, "_exit_status", 0)
    monkeypatch.setattr(train, "_error", None)
    monkeypatch.setattr(sys, "argv", ["janus-train"])
    if outcome == "error":
        with pytest.raises(RuntimeError, match="boom"):
            train.main()
        assert calls == []
    elif outcome == "user error":
        with pytest.raises(SystemExit) as e:
            train.main()
        assert e.value.code == 2 and calls == []
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "janus-train: error:" in err[0] and "micro" in err[0], err
    else:
        with pytest.raises(SystemExit) as e:
            train.main()
        want = 0 if outcome == "done" else ckpt.EXIT_REQUEUE
        assert e.value.code == want and calls == [want]


@pytest.mark.parametrize("value", ["1", "yes", "True", "no"])
def test_dry_run_flag_read_as_hydra_reads_it(monkeypatch, value):
    """A dry run's Hydra files go to a scratch dir (no ``outputs/``) for every spelling of true
    that Hydra + OmegaConf accept for ``train.dry_run`` (``=1``, ``=yes``, ``=True`` once wrote
    ``outputs/``), and for no false one: the oracle is the composed config itself."""
    from janus_train import train

    want = to_run_config(compose([f"train.dry_run={value}"])).train.dry_run
    assert want == (value != "no")  # OmegaConf's reading
    seen = []
    monkeypatch.setattr(train, "_hydra_main", lambda: seen.extend(sys.argv))
    monkeypatch.setattr(train, "exit_finished", lambda status: sys.exit(status))
    monkeypatch.setattr(train, "_exit_status", 0)
    monkeypatch.setattr(train, "_error", None)
    monkeypatch.setattr(sys, "argv", ["janus-train", f"train.dry_run={value}"])
    with pytest.raises(SystemExit):
        train.main()
    assert any(a.startswith("hydra.run.dir=") for a in seen) == want
    assert ("hydra.output_subdir=null" in seen) == want


@pytest.mark.heavy
def test_zero3_offload_trains_a_step(tmp_path):
    """``deepspeed=zero3_offload`` (parameters and optimizer state in CPU memory, DeepSpeed's
    CPU Adam: a C++ op built on first use, hence the heavy tier): two steps run and their
    losses and the exported image head equal the plain ZeRO-3 run's (same init and data; the
    update is only computed elsewhere)."""
    from janus_train import train
    from tests.conftest import tiny_run

    def run(name, zero):
        cfg = tiny_run(
            [
                "stage=stage1",
                f"deepspeed={zero}",
                "train.synthetic_data=true",
                "train.synthetic_seq_len=32",
                "experiment.stage1.steps=2",
                "experiment.stage1.global_batch_size=2",
                f"train.run_dir={tmp_path / name}",
                "train.log_every=1",
                "train.ckpt_every=0",
                "train.export_at_end=true",
                "train.progress_bar=false",
            ]
        )
        assert train.run(cfg) == 0
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return rows

    off, ref = run("offload", "zero3_offload"), run("zero3", "zero3")
    ds = json.loads((tmp_path / "offload" / "ds_config.json").read_text())
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert [r["step"] for r in off] == [1, 2] and all(math.isfinite(r["loss"]) for r in off)
    assert off[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-6)
    assert off[1]["loss"] == pytest.approx(ref[1]["loss"], rel=1e-4)  # after one update
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "offload" / "hf" / "model.safetensors"))
    b = load_file(str(tmp_path / "zero3" / "hf" / "model.safetensors"))
    head = [k for k in a if "generation_head" in k]
    assert head and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in head)


def test_stage_resolved_once_per_run_recipe_statted_once(tmp_path, monkeypatch):
    """``prepare`` resolves the stage once: a one-step run on real shards loads and checks its
    recipe once and stats each shard once (rank 0); the loader trains on that same recipe."""
    from janus_train import config, train
    from janus_train.data import recipe as recipe_mod
    from janus_train.data.synthetic import write_tiny_dataset
    from tests.conftest import tiny_run

    data = tmp_path / "data"
    write_tiny_dataset(data, n_shards=2, per_shard=2, size=(16, 16))
    monkeypatch.setenv("JANUS_DATA_ROOT", str(data))
    loads, stats, recipes = [], [], []
    load, expand, build_loader = config.load_recipe, recipe_mod.expand_shards, train.build_loader
    monkeypatch.setattr(config, "load_recipe", lambda *a, **k: loads.append(a) or load(*a, **k))

    def expand_shards(*a, check=True, stat_shards=True, **k):  # the recipe's shard statting
        out = expand(*a, check=check, stat_shards=stat_shards, **k)
        stats.extend(out if check and stat_shards else [])
        return out

    monkeypatch.setattr(recipe_mod, "expand_shards", expand_shards)
    monkeypatch.setattr(
        train,
        "build_loader",
        lambda cfg, spec, *a: recipes.append(spec.recipe) or build_loader(cfg, spec, *a),
    )
    cfg = tiny_run(
        [
            "stage=stage1",
            "experiment.stage1.steps=1",
            "experiment.stage1.global_batch_size=2",
            "data.num_workers=0",
            "data.seq_len=128",
            "train.tokens_per_micro=128",
            f"train.run_dir={tmp_path / 'run'}",
            "train.export_at_end=false",
            "train.progress_bar=false",
        ]
    )
    assert train.run(cfg) == 0
    assert len(loads) == 1  # was 2: prepare and the loader each loaded and checked it
    shards = sorted(str(p) for p in data.glob("caption/*.tar")) + sorted(
        str(p) for p in data.glob("imagenet/*.tar")
    )
    assert sorted(stats) == sorted(shards)  # each of the 4 shards statted once (was twice)
    (rec,) = recipes
    assert [list(s.shards) for s in rec.sources] == [shards[:2], shards[2:]]
