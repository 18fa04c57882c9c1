"""``janus-plan`` and the pipeline's pre-submission checks: model-state memory against
DeepSpeed's own estimators, the activation estimate against the measured peak of live tensor
memory in a real forward + backward of the tiny model, exit statuses, the two shipped cluster
jobs, and ``launch/pipeline.sh`` refusing a stage that cannot run before submitting anything."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import weakref
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from janus_train.config import compose, to_run_config
from janus_train.plan import cli
from janus_train.plan.config import ClusterConfig
from janus_train.plan.costs import communication
from janus_train.plan.estimate import Row, activation_bytes, model_sizes, model_state_bytes
from janus_train.trainer.config import DeepSpeedConfig
from janus_train.trainer.distributed import BatchPlan, build_deepspeed_config

REPO = Path(__file__).resolve().parent.parent


def _run(overrides: list[str]):
    return to_run_config(compose(overrides))


# ---- model states vs DeepSpeed's estimators --------------------------------------------


@pytest.mark.parametrize("nodes", [1, 32])
@pytest.mark.parametrize(
    "zero,offload_opt,offload_param",
    [(2, False, False), (2, True, False), (3, False, False), (3, True, False), (3, True, True)],
)
def test_model_states_within_10pct_of_deepspeed_estimators(zero, offload_opt, offload_param, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    sizes = model_sizes(_run(["experiment=janus_pro_7b"]).model)
    total = sum(sizes.groups.values())
    ds = DeepSpeedConfig(
        zero_stage=zero, offload_optimizer=offload_opt, offload_param=offload_param
    )
    # everything trainable: DeepSpeed's estimators assume so
    ours = sum(model_state_bytes(total, 0, sizes.largest_layer, ds, nodes * 8).values())
    if zero == 2:
        _, ref = estimate_zero2_model_states_mem_needs(total, 8, nodes, cpu_offload=offload_opt)
    else:
        _, ref, _ = estimate_zero3_model_states_mem_needs(
            total,
            sizes.largest_layer,
            8,
            nodes,
            cpu_offload=offload_opt,
            cpu_offload_params=offload_param,
        )
    assert abs(ours - ref) <= 0.10 * ref, (ours / 2**30, ref / 2**30)


def test_frozen_modules_cost_only_bf16_weights_sharded_by_zero3():
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    sizes = model_sizes(_run(["experiment=janus_pro_7b"]).model)
    trainable = sizes.groups["und_adaptor"] + sizes.groups["gen_adaptor"] + sizes.groups["gen_head"]
    frozen = sum(sizes.groups.values()) - trainable
    z2 = model_state_bytes(
        trainable, frozen, sizes.largest_layer, DeepSpeedConfig(zero_stage=2), 256
    )
    _, ref = estimate_zero2_model_states_mem_needs(trainable, 8, 32, cpu_offload=False)
    assert abs(sum(z2.values()) - (ref + 2 * frozen)) <= 0.10 * (ref + 2 * frozen)
    z3 = model_state_bytes(
        trainable, frozen, sizes.largest_layer, DeepSpeedConfig(zero_stage=3), 256
    )
    assert z3["frozen params"] == pytest.approx(2 * frozen / 256)


# ---- activations vs a measured peak --------------------------------------------------------


class PeakLiveBytes(TorchDispatchMode):
    """Bytes of tensor storages created inside the mode and still alive, and their peak.
    Storages that existed before (parameters, gradients, inputs) are never counted."""

    def __init__(self, preexisting):
        super().__init__()
        self.live = self.peak = 0
        self.seen = WeakIdKeyDictionary()
        for t in preexisting:
            if t is not None:
                self.seen[t.untyped_storage()] = None

    def _freed(self, n: int, _ref) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st not in self.seen:
                    n = st.nbytes()
                    self.seen[st] = weakref.ref(st, partial(self._freed, n))
                    self.live += n
                    self.peak = max(self.peak, self.live)
        return out


@pytest.mark.parametrize(
    "checkpointing,every,chunk", [(False, 1, 0), (True, 1, 0), (True, 2, 0), (False, 1, 48)]
)
def test_activation_estimate_within_25pct_of_measured_peak(
    fresh_tiny_model, checkpointing, every, chunk
):
    from janus_train.model import JanusTrainModel, apply_freeze
    from janus_train.model.build import set_checkpoint_every
    from janus_train.model.loss import HeadLoss

    run = _run(
        [
            "experiment=tiny",
            "model=tiny",
            "stage=stage2",
            f"model.gradient_checkpointing={str(checkpointing).lower()}",
        ]
    )
    janus, _ = fresh_tiny_model
    apply_freeze(janus, run.trainable_groups)
    if checkpointing:
        janus.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        set_checkpoint_every(janus, every)  # the tiny LLM has 2 layers: 2 = only the first
    model = JanusTrainModel(janus, head_loss=HeadLoss(chunk)).train()
    T = 384
    ids = torch.randint(10, 400, (1, T), generator=torch.Generator().manual_seed(0))
    batch = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        labels=ids.clone(),
        image_codes=torch.full_like(ids, -100),
        task_ids=torch.zeros_like(ids),
    )

    def step():
        model(batch)["loss_sum"].sum().backward()

    step()  # gradients exist from here on: the measured step only accumulates into them
    params = list(model.parameters())
    meter = PeakLiveBytes([*params, *(p.grad for p in params), *model.buffers(), *batch.values()])
    with meter:
        step()
    sizes = model_sizes(run.model)
    est = activation_bytes(
        sizes,
        Row(T, T - 1, 0, 0),
        checkpointing,
        run.trainable_groups,
        act_bytes=4,
        checkpoint_every=every,
        loss_chunk_tokens=chunk,
    )  # fp32 on CPU
    assert abs(est - meter.peak) <= 0.25 * meter.peak, (est, meter.peak)
    if chunk:  # the planner would be off by far more if it kept the full-logits terms
        full = activation_bytes(sizes, Row(T, T - 1, 0, 0), False, run.trainable_groups, 4)
        assert abs(full - meter.peak) > 0.3 * meter.peak, (full, meter.peak)


def test_chunked_or_fused_loss_drops_the_full_logits_terms():
    """Janus-Pro-1B, a 8192-token text row: the unchunked heads hold 8191 x 102400 fp32
    log-softmax rows for backward; chunks of 1024 or Liger's fused CE do not, and the plan of a
    stage says so (Liger not under ZeRO-3, where the chunked path runs)."""
    s = model_sizes(_run(["experiment=janus_pro_1b", "model.init_from=null"]).model)
    row = Row(8192, 8191, 0, 0)
    groups = ["llm", "gen_head"]
    full = activation_bytes(s, row, True, groups)
    chunked = activation_bytes(s, row, True, groups, loss_chunk_tokens=1024)
    fused = activation_bytes(s, row, True, groups, fused_ce=True)
    logits = 8191 * 102400 * 4
    assert full - chunked >= logits and full - fused >= logits
    assert activation_bytes(s, row, True, groups, loss_chunk_tokens=8191) == full  # one chunk


@pytest.mark.parametrize("kernels", ["none", "liger"])
def test_mixed_stage_activations_are_its_worst_task_alone(kernels):
    """A stage mixing tasks needs the activation memory of its worst task's micro-batch: the
    estimate equals the largest of the same stage run with one task at a time. Janus-Pro-1B
    stage 3 with Liger's fused CE (ZeRO-1) is the case where the row a full-logits model would
    call the worst (text) is not (understanding, once the text row's logits are fused away)."""
    import dataclasses

    from janus_train.plan.estimate import estimate, stage_shape

    cl = ClusterConfig(gpu="a100-80gb")
    run = _run(["experiment=janus_pro_1b", "stage=stage3", f"model.kernels={kernels}"])
    shape = stage_shape(run)
    ds = DeepSpeedConfig(zero_stage=1)
    assert all(n > 0 for n in shape.ratio)
    alone = [
        estimate(dataclasses.replace(shape, ratio=one_task), cl, "zero1", ds, 16)
        for one_task in ((1, 0, 0), (0, 1, 0), (0, 0, 1))
    ]
    mixed = estimate(shape, cl, "zero1", ds, 16).memory["activations"]
    assert mixed == max(e.memory["activations"] for e in alone)


# ---- the command ---------------------------------------------------------------------------


def _plan_lines(script: Path) -> dict[str, tuple[int, str]]:
    out = {}
    for m in re.finditer(
        r"^#PLAN (stage\d) nodes=(\d+) deepspeed=(\S+)$", script.read_text(), re.M
    ):
        out[m.group(1)] = (int(m.group(2)), m.group(3))
    return out


@pytest.mark.parametrize("experiment,nodes", [("janus_pro_1b", 16), ("janus_pro_7b", 32)])
def test_targets_feasible_and_shipped_jobs_follow_the_plan(experiment, nodes, capsys):
    argv = [f"experiment={experiment}", f"nodes={nodes}", "gpus_per_node=8", "gpu=a100-80gb"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("recommended: deepspeed=") == 3 and "INFEASIBLE" not in out
    cluster, overrides, stages, _ = cli.split_args(argv)
    plans = {s: cli.plan_stage(s, cluster, overrides, None) for s in stages}
    shipped = _plan_lines(REPO / f"launch/slurm/{experiment}.sbatch")
    assert shipped == {s: (p.chosen.nodes, p.chosen.preset) for s, p in plans.items()}
    if experiment == "janus_pro_7b":
        st2 = plans["stage2"].chosen
        assert st2.comm_s < st2.compute_s
        st3 = plans["stage3"].chosen
        assert st3.batch is not None and 128 % (st3.world * st3.batch.micro_batch_size) == 0


@pytest.mark.parametrize(
    "experiment,plan_file",
    [
        ("janus_1.3b", "janus_pro_1b"),
        ("janus_pro_1b", "janus_pro_1b"),
        ("janus_pro_7b", "janus_pro_7b"),
    ],
)
def test_shipped_checkpointing_defaults_fit_80gb(experiment, plan_file):
    """Every stage of every shipped model, at the deployment its sbatch file plans (Janus 1.3B
    at Janus-Pro-1B's), fits 80 GB with the model's default activation checkpointing, leaving
    the headroom the defaults were chosen with (BENCHMARKS.md, issue 10)."""
    from janus_train.plan import checkpointing as ck
    from janus_train.plan.estimate import estimate, stage_shape

    cl = ClusterConfig(gpu="a100-80gb")
    deployments = _plan_lines(REPO / f"launch/slurm/{plan_file}.sbatch")
    assert set(deployments) == {"stage1", "stage2", "stage3"}
    for stage, (nodes, preset) in deployments.items():
        run = _run([f"experiment={experiment}", f"stage={stage}", f"deepspeed={preset}"])
        shape = stage_shape(run)
        est = estimate(shape, cl, preset, run.deepspeed, nodes)
        default = ck.label(shape.checkpointing, shape.checkpoint_every)
        assert ck.fits(est), (
            f"{experiment} {stage} on {nodes} nodes ({preset}) with checkpointing {default}: "
            f"{est.total_memory / 2**30:.1f} GiB > {1 - ck.HEADROOM:.0%} of "
            f"{est.usable / 2**30:.1f} usable"
        )
        # the estimate sees model.checkpoint_every: fewer checkpointed layers, more memory
        opts = dict(ck.estimates(shape, cl, preset, run.deepspeed, nodes))
        acts = [opts[name].memory["activations"] for name, _, _ in ck.OPTIONS]
        assert acts == sorted(acts, reverse=True) and len(set(acts)) == len(acts)
        assert opts[default].total_memory == est.total_memory


def test_exit_status_names_the_infeasible_stage(capsys):
    base = ["experiment=janus_pro_7b", "nodes=32", "gpu=a100-80gb", "search_nodes=false"]
    assert cli.main([*base, "stage=stage3", "deepspeed=zero2"]) == 1
    err = capsys.readouterr().err
    assert "stage3 is infeasible" in err and "global batch 128 < 256 ranks" in err
    assert cli.main([*base, "stage=stage3", "deepspeed=zero2", "train.tokens_per_micro=0"]) == 1
    assert "not a multiple of train.micro_batch_size" in capsys.readouterr().err
    assert cli.main([*base, "stage=stage2", "deepspeed=zero1", "gpu=a100-40gb"]) == 1
    err = capsys.readouterr().err
    assert "stage2 is infeasible" in err and "memory" in err
    assert cli.main([*base, "stage=stage2", "deepspeed=zero3_hpz", "gpu=a100-40gb"]) == 0
    assert cli.main(["experiment=janus_pro_7b", "nodez=3"]) == 2
    assert "nodez" in capsys.readouterr().err
    assert cli.main(["experiment=janus_pro_7b", "gpu=v99"]) == 2
    assert "gpu" in capsys.readouterr().err


def test_hpz_preset_reaches_the_deepspeed_json():
    run = _run(["experiment=tiny", "deepspeed=zero3_hpz"])
    plan = BatchPlan(16, 1, 1, 16)
    zero = build_deepspeed_config(run.deepspeed, plan, "bf16", 0.0, 1e-3)["zero_optimization"]
    assert zero["stage"] == 3 and zero["zero_hpz_partition_size"] == 8
    with pytest.raises(ValueError, match="hpz_partition_size"):
        build_deepspeed_config(
            DeepSpeedConfig(zero_stage=2, hpz_partition_size=8), plan, "bf16", 0.0, 1e-3
        )
    cluster = ClusterConfig(nodes=2, gpu="h100")
    assert cluster.spec.peak_bf16 == 989e12


def test_hpz_keeps_backward_gathers_in_the_node():
    args = dict(
        trainable=10**9,
        forward_params=2 * 10**9,
        backward_params=2 * 10**9,
        nodes=4,
        gpus_per_node=8,
        grad_accum=2,
        checkpointing=True,
    )
    plain = communication(DeepSpeedConfig(zero_stage=3), **args)
    hpz = communication(DeepSpeedConfig(zero_stage=3, hpz_partition_size=8), **args)
    across = [sum(t.bytes for t in ts if t.inter_node) for ts in (plain, hpz)]
    ring = 31 / 32  # 32 ranks
    # ZeRO-3: per micro-step one forward and two backward gathers (recompute, backward) of the
    # bf16 parameters plus a gradient reduce-scatter, all across nodes
    assert across[0] == pytest.approx(2 * 2 * (3 * 2e9 + 1e9) * ring)
    # hpZ: the two backward gathers move to NVLink over the node's 8 GPUs
    assert across[1] == pytest.approx(2 * 2 * (2e9 + 1e9) * ring)
    in_node = sum(t.bytes for t in hpz if not t.inter_node)
    assert in_node == pytest.approx(2 * 2 * 2 * 2e9 * 7 / 8)


# ---- launch/pipeline.sh --------------------------------------------------------------------

SBATCH_STUB = """#!/bin/sh
echo "$@" >> "$STUB_LOG"
echo 1001
"""


def _pipeline(tmp_path: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text(SBATCH_STUB)
    (bin_dir / "sbatch").chmod(0o755)
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DRY_RUN"))}
    full.update(
        PATH=f"{bin_dir}:{full['PATH']}",
        STUB_LOG=str(tmp_path / "sbatch.log"),
        PYTHON=sys.executable,
        RUN_ROOT=str(tmp_path / "runs"),
        **env,
    )
    return subprocess.run(
        ["bash", str(REPO / "launch/pipeline.sh"), *args],
        env=full,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_pipeline_refuses_a_stage_that_cannot_run_before_submitting(tmp_path):
    # stage 1: the shipped recipes' shards are not on this machine; stage 2: ZeRO-1 does not fit
    # an A100-40GB; stage 3: batch 128 does not divide over 32 nodes x 8 GPUs
    res = _pipeline(
        tmp_path,
        [],
        LAUNCHER="slurm",
        EXPERIMENT="janus_pro_7b",
        GPU="a100-40gb",
        DEEPSPEED_STAGE2="zero1",
        NODES_STAGE3="32",
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert "stage1 cannot run: recipe" in res.stderr
    assert "stage2 cannot run: planner: memory" in res.stderr
    assert "stage3 cannot run: batch: global batch 128 < 256 ranks" in res.stderr
    assert not (tmp_path / "sbatch.log").exists()
    # as shipped (data not mounted here), every stage passes and goes with its planned nodes
    res = _pipeline(tmp_path, [], LAUNCHER="slurm", EXPERIMENT="janus_pro_7b", CHECK_DATA="0")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count(" ok: ") == 3
    calls = (tmp_path / "sbatch.log").read_text().splitlines()
    assert [re.search(r"--nodes=(\d+)", c).group(1) for c in calls] == ["32", "32", "16"]


def test_local_pipeline_checks_batch_and_init_from_before_running(tmp_path):
    smoke = ["model=tiny", "train.synthetic_data=true", "train.global_batch_size=4"]
    res = _pipeline(tmp_path, smoke, EXPERIMENT="tiny", NPROC_PER_NODE="8", DRY_RUN="1")
    assert res.returncode == 1
    for stage in ("stage1", "stage2", "stage3"):
        assert f"{stage} cannot run: batch: global batch 4 < 8 ranks" in res.stderr
    assert "torchrun.sh" not in res.stdout
    res = _pipeline(
        tmp_path,
        smoke,
        EXPERIMENT="tiny",
        NPROC_PER_NODE="2",
        DRY_RUN="1",
        INIT_FROM=str(tmp_path / "nowhere"),
    )
    assert res.returncode == 1 and "stage1 cannot run: init_from chain" in res.stderr
    res = _pipeline(tmp_path, smoke, EXPERIMENT="tiny", NPROC_PER_NODE="2", DRY_RUN="1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("launch/torchrun.sh") == 3
