"""Render tests of the launch scripts: the Slurm jobs run under stub ``srun``/``scontrol``/
``scancel``/``sbatch`` (Python scripts in tmp_path put first on PATH) with ``DRY_RUN=1``, so every
node's task prints the torchrun command it would run. Checks node count, processes per node,
rendezvous endpoint, stage overrides, per-job logs, and the USR1 -> checkpoint -> requeue path.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from janus_train.trainer.checkpoint import EXIT_REQUEUE

REPO = Path(__file__).resolve().parent.parent
JOB_ID = "4242"

# Emulates srun: one task per node (SLURM_NODEID/SLURMD_NODENAME set), stdout to --output with
# %n expanded, each task in its own process group (recorded, so the scancel stub can signal the
# step like slurmstepd does). STUB_SRUN_WAIT=1: run nothing, wait for scancel's signal
# forwarding, then exit with STUB_SRUN_RC (a step that checkpointed on USR1).
SRUN = r"""
import json, os, re, subprocess, sys, time
log = os.environ["STUB_LOG"]
args = sys.argv[1:]
with open(os.path.join(log, "srun.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\n")
opts, i = {}, 0
while args[i].startswith("-"):
    k, _, v = args[i].partition("=")
    opts[k] = v
    i += 1
cmd = args[i:]
hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                       capture_output=True, text=True, check=True).stdout.split()
if os.environ.get("STUB_SRUN_USER_ERROR") == "1":  # a rank stopped on a user error
    with open(os.environ["JANUS_USER_ERROR_FILE"], "w") as f:
        f.write("janus-train: error: model.init_from='/x' is not a directory\n")
if os.environ.get("STUB_SRUN_WAIT") == "1":
    open(os.path.join(log, "srun.started"), "w").close()
    for _ in range(400):
        if os.path.exists(os.path.join(log, "scancel.txt")):
            break
        time.sleep(0.05)
    sys.exit(int(os.environ.get("STUB_SRUN_RC", "1")))
tasks = []
for n in range(int(opts["--nodes"])):
    env = dict(os.environ, SLURM_NODEID=str(n), SLURM_PROCID=str(n), SLURMD_NODENAME=hosts[n])
    out = open(opts["--output"].replace("%n", str(n)), "a")
    tasks.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True))
    with open(os.path.join(log, "step_pgids"), "a") as f:
        f.write(f"{tasks[-1].pid}\n")
rc = max(t.wait() for t in tasks)
sys.exit(int(os.environ.get("STUB_SRUN_RC", rc)))
"""

# `scontrol show hostnames prefix[a-b]` expands the range (a plain name stays itself);
# `scontrol requeue ID` is recorded.
SCONTROL = r"""
import os, re, sys
if sys.argv[1:3] == ["show", "hostnames"]:
    m = re.fullmatch(r"(\w+)\[(\d+)-(\d+)\]", sys.argv[3])
    if m is None:
        print(sys.argv[3])
    else:
        width = len(m.group(2))
        for k in range(int(m.group(2)), int(m.group(3)) + 1):
            print(f"{m.group(1)}{k:0{width}d}")
else:
    with open(os.path.join(os.environ["STUB_LOG"], "scontrol.txt"), "a") as f:
        f.write(" ".join(sys.argv[1:]) + "\n")
"""

SCANCEL = r"""
import os, signal, sys
log = os.environ["STUB_LOG"]
with open(os.path.join(log, "scancel.txt"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\n")
if sys.argv[1] == "--signal=USR1" and os.path.exists(os.path.join(log, "step_pgids")):
    for pgid in open(os.path.join(log, "step_pgids")).read().split():
        os.killpg(int(pgid), signal.SIGUSR1)
"""

# Records its arguments, prints "<id>;cluster" like `sbatch --parsable` on a federation.
SBATCH = r"""
import json, os, sys
path = os.path.join(os.environ["STUB_LOG"], "sbatch.jsonl")
n = sum(1 for _ in open(path)) if os.path.exists(path) else 0
with open(path, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
print(f"{1001 + n};cluster")
"""


@pytest.fixture
def stubs(tmp_path: Path) -> dict[str, str]:
    """Environment with the stubs first on PATH and an empty Slurm log dir."""
    bin_dir, log = tmp_path / "bin", tmp_path / "stublog"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in [
        ("srun", SRUN),
        ("scontrol", SCONTROL),
        ("scancel", SCANCEL),
        ("sbatch", SBATCH),
    ]:
        p = bin_dir / name
        p.write_text(f"#!{sys.executable}\n{body}")
        p.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DRY_RUN"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", STUB_LOG=str(log))
    return env


def slurm_env(env: dict, tmp_path: Path, job: str, nodes: int, **extra: str) -> dict[str, str]:
    """What Slurm puts in a batch job's environment, plus our variables."""
    return dict(
        env,
        SLURM_JOB_ID=JOB_ID,
        SLURM_JOB_NAME=job,
        SLURM_JOB_NUM_NODES=str(nodes),
        SLURM_JOB_NODELIST=f"gpu[001-{nodes:03d}]",
        SLURM_SUBMIT_DIR=str(REPO),
        SLURM_CPUS_ON_NODE="96",
        RUN_ROOT=str(tmp_path / "runs"),
        LOG_ROOT=str(tmp_path / "logs"),
        **extra,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def sbatch_directives(script: Path) -> dict[str, str]:
    out = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH "):
            k, _, v = line.removeprefix("#SBATCH ").partition("=")
            out[k] = v
    return out


def run_job(script: str, env: dict, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / script), *overrides],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "experiment,nodes,gpu",
    [("janus_pro_1b", 16, ""), ("janus_pro_7b", 32, ""), ("janus_pro_7b", 32, "_a100_40gb")],
)
def test_sbatch_renders_one_torchrun_per_node(stubs, tmp_path, experiment, nodes, gpu):
    script = f"launch/slurm/{experiment}{gpu}.sbatch"
    # the "#PLAN stage2" line (janus-plan's choice): preset, then the overrides it applies
    plan = re.search(
        r"^#PLAN stage2 nodes=\d+ deepspeed=(\S+)(.*)$", (REPO / script).read_text(), re.M
    )
    zero, plan_args = plan.group(1), plan.group(2).split()
    d = sbatch_directives(REPO / script)
    assert d["--nodes"] == str(nodes)
    assert d["--ntasks-per-node"] == "1" and d["--gpus-per-node"] == "8"
    assert re.fullmatch(r"B:USR1@\d+", d["--signal"]) and "--requeue" in d
    assert d["--mem"] == "0" and "--exclusive" in d  # whole nodes, all their memory

    init = "/ckpt/stage1/hf"
    env = slurm_env(stubs, tmp_path, experiment, nodes, STAGE="stage2", INIT_FROM=init, DRY_RUN="1")
    res = run_job(script, env, "train.log_every=5")
    assert res.returncode == 0, res.stderr + res.stdout

    srun_calls = (tmp_path / "stublog/srun.jsonl").read_text().splitlines()
    assert len(srun_calls) == 1
    srun_args = json.loads(srun_calls[0])
    assert f"--nodes={nodes}" in srun_args and f"--ntasks={nodes}" in srun_args
    assert "--ntasks-per-node=1" in srun_args and "--kill-on-bad-exit=1" in srun_args
    assert "--cpus-per-task=96" in srun_args

    log_dir = tmp_path / "logs" / f"{experiment}-{JOB_ID}"
    node_logs = sorted(log_dir.glob("node*.r0.log"))
    assert len(node_logs) == nodes
    run_dir = tmp_path / "runs" / experiment / "stage2"
    for log in node_logs:
        cmd = shlex.split(log.read_text().strip())
        assert cmd[1:3] == ["-m", "torch.distributed.run"]
        assert f"--nnodes={nodes}" in cmd and "--nproc-per-node=8" in cmd
        assert "--rdzv-backend=c10d" in cmd and "--rdzv-endpoint=gpu001:29500" in cmd
        assert f"--rdzv-id={JOB_ID}" in cmd and "--max-restarts=0" in cmd
        i = cmd.index("janus_train.train")
        assert cmd[i - 1] == "-m"
        assert cmd[i + 1 :] == [
            f"experiment={experiment}",
            "stage=stage2",
            f"deepspeed={zero}",
            f"train.run_dir={run_dir}",
            f"model.init_from={init}",
            *plan_args,
            "train.log_every=5",
        ]
    assert (log_dir / "commands.txt").is_file()


def test_usr1_checkpoints_then_requeues_and_the_requeued_job_resumes_same_run_dir(stubs, tmp_path):
    script = "launch/slurm/janus_pro_1b.sbatch"
    env = slurm_env(
        stubs, tmp_path, "janus_pro_1b", 16, STAGE="stage1", STUB_SRUN_WAIT="1", STUB_SRUN_RC="1"
    )
    proc = subprocess.Popen(
        ["bash", str(REPO / script)],
        env=env,
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    started = tmp_path / "stublog/srun.started"
    deadline = time.time() + 30
    while not started.exists():
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGUSR1)  # what --signal=B:USR1@600 does
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    # forwarded to the job steps (all ranks), then requeued once the step ended
    assert (tmp_path / "stublog/scancel.txt").read_text().split() == ["--signal=USR1", JOB_ID]
    assert (tmp_path / "stublog/scontrol.txt").read_text().split() == ["requeue", JOB_ID]

    # Slurm restarts the same job id with SLURM_RESTART_COUNT=1: same run dir, so it resumes.
    env2 = slurm_env(
        stubs, tmp_path, "janus_pro_1b", 16, STAGE="stage1", SLURM_RESTART_COUNT="1", DRY_RUN="1"
    )
    res = run_job(script, env2)
    assert res.returncode == 0, res.stderr + res.stdout
    first, second = (tmp_path / f"logs/janus_pro_1b-{JOB_ID}/commands.txt").read_text().splitlines()
    assert first.replace(".r0.log", ".r1.log") == second
    cmd = shlex.split((tmp_path / f"logs/janus_pro_1b-{JOB_ID}/node0.r1.log").read_text())
    assert f"train.run_dir={tmp_path / 'runs/janus_pro_1b/stage1'}" in cmd
    assert not any(JOB_ID in a for a in cmd if a.startswith("train.run_dir="))


@pytest.mark.parametrize(
    "srun_rc,extra,expect_rc,expect_requeue",
    [
        (EXIT_REQUEUE, {}, 0, True),  # the trainer's "requeue me" reached srun (job.sh default)
        (1, {}, 0, True),  # a crash (lost node, collective timeout): resume in a new attempt
        (70, {"MAX_REQUEUES": "3", "SLURM_RESTART_COUNT": "2"}, 0, True),
        (1, {"MAX_REQUEUES": "3", "SLURM_RESTART_COUNT": "3"}, 1, False),  # crashes capped
        (EXIT_REQUEUE, {"SLURM_RESTART_COUNT": "50"}, 1, False),  # MAX_REQUEUES reached
        (2, {}, 2, False),  # a user error fails the same way again: never requeued
        (1, {"STUB_SRUN_USER_ERROR": "1"}, 2, False),  # a rank's user error behind torchrun's 1
    ],
)
def test_requeue_decision_from_exit_code(
    stubs, tmp_path, srun_rc, extra, expect_rc, expect_requeue
):
    env = slurm_env(
        stubs, tmp_path, "janus_pro_7b", 32, STUB_SRUN_RC=str(srun_rc), DRY_RUN="1", **extra
    )
    res = run_job("launch/slurm/janus_pro_7b.sbatch", env)
    assert res.returncode == expect_rc, res.stderr + res.stdout
    requeued = (tmp_path / "stublog/scontrol.txt").exists()
    assert requeued == expect_requeue
    if "STUB_SRUN_USER_ERROR" in extra:
        assert "model.init_from" in res.stderr  # the rank's one line, in the job's log


def test_finished_stage_exits_without_srun_and_bad_overrides_fail(stubs, tmp_path):
    export = tmp_path / "runs/janus_pro_1b/stage3/hf"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    env = slurm_env(stubs, tmp_path, "janus_pro_1b", 16, STAGE="stage3")
    res = run_job("launch/slurm/janus_pro_1b.sbatch", env)
    assert res.returncode == 0 and "complete" in res.stdout
    assert not (tmp_path / "stublog/srun.jsonl").exists()

    res = run_job("launch/slurm/janus_pro_1b.sbatch", env, "stage=stage2")
    assert res.returncode == 2 and "STAGE" in res.stderr


def test_pipeline_slurm_chains_three_jobs_through_exports(stubs, tmp_path):
    # CHECK_DATA=0: the recipes' shards and the 7B checkpoint are not on this machine.
    env = dict(
        stubs,
        LAUNCHER="slurm",
        EXPERIMENT="janus_pro_7b",
        RUN_ROOT=str(tmp_path / "r"),
        SBATCH_ARGS="-p gpu -A proj",
        STAGE3_ARGS="train.ckpt_every=500",
        DEEPSPEED_STAGE1="zero3_hpz",
        CHECK_DATA="0",
        PYTHON=sys.executable,
    )
    res = subprocess.run(
        ["bash", str(REPO / "launch/pipeline.sh"), "train.log_every=20"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr + res.stdout
    calls = [json.loads(x) for x in (tmp_path / "stublog/sbatch.jsonl").read_text().splitlines()]
    assert len(calls) == 3
    root = tmp_path / "r/janus_pro_7b"
    for k, call in enumerate(calls):
        stage = f"stage{k + 1}"
        exports = dict(
            kv.split("=", 1)
            for kv in next(a for a in call if a.startswith("--export="))
            .split("=", 1)[1]
            .split(",")[1:]
        )
        assert exports["STAGE"] == stage and exports["EXPERIMENT"] == "janus_pro_7b"
        assert exports["RUN_ROOT"] == str(tmp_path / "r")
        assert exports.get("INIT_FROM") == (None if k == 0 else f"{root}/stage{k}/hf")
        # stage 1 as overridden, stages 2 and 3 as the sbatch file's #PLAN lines say
        assert exports["DEEPSPEED"] == ["zero3_hpz", "zero3_hpz", "zero3_hpz"][k]
        assert call[call.index("--parsable") + 2] == f"--nodes={[32, 32, 16][k]}"
        dep = [a for a in call if a.startswith("--dependency=")]
        assert dep == ([] if k == 0 else [f"--dependency=afterok:{1000 + k}"])
        assert call[call.index("-p") + 1] == "gpu" and call[call.index("-A") + 1] == "proj"
        i = call.index(str(REPO / "launch/slurm/janus_pro_7b.sbatch"))
        assert call[i + 1 :] == (["train.ckpt_every=500"] if k == 2 else []) + [
            "train.log_every=20"
        ]
    assert (tmp_path / "logs").is_dir()  # the sbatch files' --output directory


def test_torchrun_and_deepspeed_scripts_render(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DRY_RUN", "RDZV_ENDPOINT")}
    env.update(
        DRY_RUN="1",
        NNODES="4",
        NPROC_PER_NODE="8",
        RDZV_ENDPOINT="n1:29400",
        RDZV_ID="exp7",
        TORCHRUN_ARGS="--log-dir ranks --tee 3",
    )
    out = subprocess.run(
        ["bash", str(REPO / "launch/torchrun.sh"), "experiment=tiny", "a=b c"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cmd = shlex.split(out)
    assert cmd[cmd.index("-m", 2) + 1 :] == ["janus_train.train", "experiment=tiny", "a=b c"]
    for flag in [
        "--nnodes=4",
        "--nproc-per-node=8",
        "--rdzv-endpoint=n1:29400",
        "--rdzv-id=exp7",
        "--log-dir",
        "ranks",
    ]:
        assert flag in cmd
    env.pop("RDZV_ENDPOINT")
    res = subprocess.run(
        ["bash", str(REPO / "launch/torchrun.sh")], env=env, capture_output=True, text=True
    )
    assert res.returncode == 2 and "RDZV_ENDPOINT" in res.stderr
    env.update(NNODES="1")
    assert (
        "--standalone"
        in subprocess.run(
            ["bash", str(REPO / "launch/torchrun.sh")], env=env, capture_output=True, text=True
        ).stdout.split()
    )

    hostfile = tmp_path / "hosts"
    hostfile.write_text("n1 slots=8\nn2 slots=8\n")
    env = dict(
        os.environ,
        DRY_RUN="1",
        HOSTFILE=str(hostfile),
        NUM_GPUS="8",
        MASTER_ADDR="10.0.0.1",
        DS_LAUNCHER="openmpi",
    )
    cmd = shlex.split(
        subprocess.run(
            ["bash", str(REPO / "launch/deepspeed.sh"), "stage=stage2"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"]
    for flag in [
        f"--hostfile={hostfile}",
        "--launcher=openmpi",
        "--num_gpus=8",
        "--master_addr=10.0.0.1",
        "--no_local_rank",
    ]:
        assert flag in cmd
    assert cmd[-3:] == ["--module", "janus_train.train", "stage=stage2"]


@pytest.mark.dist
@pytest.mark.slow
def test_slurm_job_really_trains_checkpoints_on_usr1_requeues_and_resumes(stubs, tmp_path):
    """The whole preemption path for real on one emulated node (2 CPU ranks, tiny model):
    USR1 to the batch shell -> scancel stub signals the step's process group -> torchrun.sh
    forwards to the ranks -> checkpoint, exit 75 -> `scontrol requeue`; the requeued attempt
    (same job id, same command) resumes from the checkpoint, finishes and exports."""
    script = "launch/slurm/janus_pro_1b.sbatch"
    # USR1 is handled a few steps after the first logged one (~0.1 s; a tiny step ~30 ms):
    # enough steps that the first attempt cannot finish before, few for the resumed attempt
    steps = 100
    smoke = [
        "model=tiny",
        "train.synthetic_data=true",
        f"train.steps={steps}",
        "train.log_every=1",
        "train.global_batch_size=4",
        "train.micro_batch_size=1",
        "train.progress_bar=false",
    ]
    env = slurm_env(
        stubs,
        tmp_path,
        "janus_pro_1b",
        1,
        EXPERIMENT="tiny",
        GPUS_PER_NODE="2",
        PYTHON=sys.executable,
        WANDB_MODE="disabled",
        RDZV_PORT=str(free_port()),
    )
    env["SLURM_JOB_NODELIST"] = socket.gethostname()  # the rendezvous host must resolve
    run_dir = tmp_path / "runs/tiny/stage1"
    metrics = run_dir / "metrics.jsonl"
    proc = subprocess.Popen(
        ["bash", str(REPO / script), *smoke],
        env=env,
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no step logged within 120 s"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    node_log = (tmp_path / f"logs/janus_pro_1b-{JOB_ID}/node0.r0.log").read_text()
    assert proc.returncode == 0, out + node_log[-3000:]
    assert re.search(rf"exitcode\s*: {EXIT_REQUEUE}\b", node_log), node_log[-3000:]
    assert (tmp_path / "stublog/scontrol.txt").read_text().split() == ["requeue", JOB_ID]
    stopped_at = int((run_dir / "checkpoints/latest").read_text().strip().removeprefix("step_"))
    assert 1 <= stopped_at < steps and not (run_dir / "hf").exists()

    res = run_job(script, dict(env, SLURM_RESTART_COUNT="1"), *smoke)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "complete" in res.stdout and (run_dir / "hf/config.json").is_file()
    logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert logged == list(range(1, steps + 1))  # resumed where it stopped: no step lost or repeated
    assert f"resuming at step {stopped_at}" in (run_dir / "train.log").read_text()
    assert len((tmp_path / "stublog/scontrol.txt").read_text().splitlines()) == 1  # no requeue


def test_torchrun_rendezvous_join_timeout_is_the_trainers_init_timeout():
    env = {
        k: v for k, v in os.environ.items() if k not in ("DRY_RUN", "RDZV_CONF", "INIT_TIMEOUT_S")
    }
    env.update(DRY_RUN="1", NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT="n1:29400")

    def render(*args, **extra):
        out = subprocess.run(
            ["bash", str(REPO / "launch/torchrun.sh"), *args],
            env={**env, **extra},
            capture_output=True,
            text=True,
            check=True,
        )
        return shlex.split(out.stdout)

    cmd = render("experiment=tiny")
    assert "--rdzv-conf=join_timeout=1800" in cmd  # train.init_timeout_s's default
    assert not any(a.startswith("train.init_timeout_s") for a in cmd)
    cmd = render("experiment=tiny", "train.init_timeout_s=240")
    assert "--rdzv-conf=join_timeout=240" in cmd and cmd[-1] == "train.init_timeout_s=240"
    cmd = render("experiment=tiny", INIT_TIMEOUT_S="300", RDZV_CONF="read_timeout=60")
    assert "--rdzv-conf=join_timeout=300,read_timeout=60" in cmd
    assert cmd[-1] == "train.init_timeout_s=300"  # the trainer gets the same value
    cmd = render("experiment=tiny", RDZV_CONF="join_timeout=99")
    assert "--rdzv-conf=join_timeout=99" in cmd

    from janus_train.trainer.config import TrainConfig

    assert TrainConfig().init_timeout_s == 1800  # the script's default is the field's
