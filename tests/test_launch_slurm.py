"""Render tests of the launch scripts: the Slurm jobs run under stub ``srun``/``scontrol``/
``scancel``/``sbatch`` (Python scripts in tmp_path put first on PATH) with ``DRY_RUN=1``, so every
node's task prints the torchrun command it would run. Checks node count, processes per node,
rendezvous endpoint, stage overrides, per-job logs, and job.sh's decision after each way a step
ends, including what a one-node cluster cannot show quickly (several nodes, the time limit's
SIGTERM, a USR1 near the time limit). tests/test_slurm_real.py drives the same scripts through a
real Slurm.
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
# Hang guards, not speed checks: a loaded 2-core machine may take a minute or more for what
# takes seconds idle (every stub and check is a new Python process)
DEADLINE = 300

# Emulates srun: one task per node (SLURM_NODEID/SLURMD_NODENAME set), stdout to --output with
# %n expanded, each task in its own process group (recorded, so the scancel stub can signal the
# step like slurmstepd does). STUB_SRUN_WAIT=1: run nothing, wait for scancel's signal
# forwarding (or SIGTERM), then exit with STUB_SRUN_RC (a step that checkpointed on USR1).
# STUB_SRUN_PROGRESS=N: rank 0 logged step N (a metrics row in the run dir) before the step ended.
SRUN = r"""
import json, os, re, signal, subprocess, sys, time
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
if os.environ.get("STUB_SRUN_STORAGE_FULL") == "1":  # a checkpoint save ran out of space
    with open(os.environ["JANUS_USER_ERROR_FILE"], "w") as f:
        f.write("storage full: could not write checkpoint /ckpt/step_00000010\n")
if os.environ.get("STUB_SRUN_PROGRESS"):
    run_dir = next(a.split("=", 1)[1] for a in args if a.startswith("train.run_dir="))
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": int(os.environ["STUB_SRUN_PROGRESS"])}) + "\n")
if os.environ.get("STUB_SRUN_WAIT") == "1":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(int(os.environ.get("STUB_SRUN_RC", "1"))))
    with open(os.path.join(log, "srun.started"), "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + 300  # a hang guard: the test signals at once
    while time.monotonic() < deadline:
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
# `scontrol show job ID` prints STUB_JOB_INFO; `scontrol requeue ID` is recorded.
SCONTROL = r"""
import os, re, sys
if sys.argv[1:3] == ["show", "job"]:
    print(os.environ.get("STUB_JOB_INFO", "JobState=RUNNING Restarts=0 TimeLimit=UNLIMITED"))
elif sys.argv[1:3] == ["show", "hostnames"]:
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
        SLURM_GPUS_ON_NODE="8",
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
        timeout=DEADLINE,
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
    deadline = time.time() + DEADLINE
    while not started.exists():
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGUSR1)  # what --signal=B:USR1@600 does
    out, _ = proc.communicate(timeout=DEADLINE)
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
    "srun_rc,extra,expect_rc,expect_requeue,says",
    [
        # the trainer's "requeue me" reached srun (job.sh default)
        (EXIT_REQUEUE, {}, 0, True, "checkpointed at step 0"),
        # a crash (lost node, collective timeout) after progress: resume in a new attempt
        (1, {"STUB_SRUN_PROGRESS": "7"}, 0, True, "after progress past step 0"),
        # a crash before training advanced (start-up): would loop, fails the job instead
        (1, {}, 1, False, "before training advanced past step 0"),
        (
            70,
            {"MAX_REQUEUES": "3", "SLURM_RESTART_COUNT": "2", "STUB_SRUN_PROGRESS": "3"},
            0,
            True,
            "restart 3 of at most 3",
        ),
        (
            1,
            {"MAX_REQUEUES": "3", "SLURM_RESTART_COUNT": "3", "STUB_SRUN_PROGRESS": "3"},
            1,
            False,
            "reached MAX_REQUEUES=3",
        ),  # crashes capped
        (EXIT_REQUEUE, {"SLURM_RESTART_COUNT": "50"}, 1, False, "MAX_REQUEUES=50"),
        (2, {}, 2, False, "user error"),  # fails the same way again: never requeued
        # a rank's user error behind torchrun's 1
        (1, {"STUB_SRUN_USER_ERROR": "1", "STUB_SRUN_PROGRESS": "3"}, 2, False, "model.init_from"),
        # a checkpoint that did not fit: the line (behind torchrun's 1), or the status itself
        (1, {"STUB_SRUN_STORAGE_FULL": "1", "STUB_SRUN_PROGRESS": "9"}, 3, False, "storage full"),
        (3, {}, 3, False, "storage full"),
    ],
)
def test_requeue_decision_from_exit_code(
    stubs, tmp_path, srun_rc, extra, expect_rc, expect_requeue, says
):
    env = slurm_env(
        stubs, tmp_path, "janus_pro_7b", 32, STUB_SRUN_RC=str(srun_rc), DRY_RUN="1", **extra
    )
    res = run_job("launch/slurm/janus_pro_7b.sbatch", env)
    assert res.returncode == expect_rc, res.stderr + res.stdout
    requeued = (tmp_path / "stublog/scontrol.txt").exists()
    assert requeued == expect_requeue
    assert says in res.stderr + res.stdout


@pytest.mark.parametrize(
    "job_info,says",
    [
        ("JobState=COMPLETING Reason=None Restarts=0 TimeLimit=UNLIMITED", "cancelled (scancel"),
        (
            "JobState=COMPLETING Reason=TimeLimit Restarts=0 RunTime=1-00:00:41 TimeLimit=1-00:00:00",
            "time limit reached (Reason=TimeLimit",
        ),
        ("JobState=COMPLETING Reason=None Restarts=1 TimeLimit=UNLIMITED", "requeued by Slurm"),
        ("", "cause unknown (scontrol show job 4242 answered nothing)"),  # no guess
    ],
)
def test_sigterm_is_never_requeued_and_the_log_says_why_from_scontrol(
    stubs, tmp_path, job_info, says
):
    """SIGTERM reaches the batch shell and the step alike (scancel, the time limit, Slurm's own
    requeue): the step ends with the trainer's 75, job.sh reads `scontrol show job` and exits."""
    env = slurm_env(
        stubs,
        tmp_path,
        "janus_pro_1b",
        16,
        STUB_SRUN_WAIT="1",
        STUB_SRUN_RC=str(EXIT_REQUEUE),
        STUB_JOB_INFO=job_info,
    )
    proc = subprocess.Popen(
        ["bash", str(REPO / "launch/slurm/janus_pro_1b.sbatch")],
        env=env,
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    started = tmp_path / "stublog/srun.started"
    deadline = time.time() + DEADLINE
    while not (started.exists() and started.read_text()):
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(int(started.read_text()), signal.SIGTERM)
    out, _ = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 143, out
    assert says in out, out
    assert not (tmp_path / "stublog/scontrol.txt").exists()  # no `scontrol requeue`


@pytest.mark.parametrize(
    "job_info,says",
    [
        ("RunTime=23:51:10 TimeLimit=1-00:00:00", "time limit near: 530 s left"),
        ("RunTime=01:00:00 TimeLimit=1-00:00:00", "preemption notice, not the time limit"),
        ("RunTime=00:10 TimeLimit=UNLIMITED", "preemption notice: no time limit"),
    ],
)
def test_usr1_log_line_tells_time_limit_from_preemption_notice(stubs, tmp_path, job_info, says):
    env = slurm_env(
        stubs,
        tmp_path,
        "janus_pro_1b",
        16,
        STUB_SRUN_WAIT="1",
        STUB_SRUN_RC="1",
        STUB_JOB_INFO=f"JobState=RUNNING Restarts=0 {job_info}",
    )
    proc = subprocess.Popen(
        ["bash", str(REPO / "launch/slurm/janus_pro_1b.sbatch")],
        env=env,
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    started = tmp_path / "stublog/srun.started"
    deadline = time.time() + DEADLINE
    while not (started.exists() and started.read_text()):
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 0 and f"SIGUSR1 ({says}" in out, out
    assert (tmp_path / "stublog/scontrol.txt").read_text().split() == ["requeue", JOB_ID]


def test_processes_per_node_without_gpu_gres_is_not_a_guess(stubs, tmp_path):
    """No GPUS_PER_NODE and no SLURM_GPUS_ON_NODE: each node's torchrun.sh counts its GPUs
    (nvidia-smi), else starts one process; GPUS_PER_NODE sets it."""
    env = slurm_env(stubs, tmp_path, "janus", 1, EXPERIMENT="tiny", DRY_RUN="1")
    del env["SLURM_GPUS_ON_NODE"]
    no_gpu = tmp_path / "no_gpu_bin"
    no_gpu.mkdir()
    (no_gpu / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")
    (no_gpu / "nvidia-smi").chmod(0o755)
    env["PATH"] = f"{no_gpu}:{env['PATH']}"
    for extra, nproc in (({}, "1"), ({"GPUS_PER_NODE": "2"}, "2")):
        res = run_job("launch/slurm/janus.sbatch", dict(env, **extra))
        assert res.returncode == 0, res.stderr + res.stdout
        node0 = (tmp_path / f"logs/janus-{JOB_ID}/node0.r0.log").read_text().splitlines()[-1]
        assert f"--nproc-per-node={nproc}" in shlex.split(node0)
    res = run_job("launch/slurm/janus.sbatch", {k: v for k, v in env.items() if k != "EXPERIMENT"})
    assert res.returncode != 0 and "EXPERIMENT" in res.stderr


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
        timeout=DEADLINE,
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
        # a failed or cancelled stage makes Slurm cancel the later ones (none left pending)
        assert ("--kill-on-invalid-dep=yes" in call) == (k > 0)
        assert call[call.index("-p") + 1] == "gpu" and call[call.index("-A") + 1] == "proj"
        i = call.index(str(REPO / "launch/slurm/janus_pro_7b.sbatch"))
        assert call[i + 1 :] == (["train.ckpt_every=500"] if k == 2 else []) + [
            "train.log_every=20"
        ]
    assert (tmp_path / "logs").is_dir()  # the sbatch files' --output directory
    assert res.stdout.count("Slurm cancels it if job") == 2


def test_pipeline_slurm_tiny_checks_with_cluster_env_and_uses_the_generic_script(stubs, tmp_path):
    """The tiny experiment has no sbatch file of its own: launch/slurm/janus.sbatch. Its shards
    are found only through CLUSTER_ENV (JANUS_DATA_ROOT), which the checks source as the jobs do."""
    from janus_train.data.synthetic import write_tiny_dataset

    write_tiny_dataset(tmp_path / "data")
    cluster_env = tmp_path / "cluster_env.sh"
    cluster_env.write_text(f"export JANUS_DATA_ROOT={tmp_path / 'data'}\n")
    env = dict(
        stubs,
        LAUNCHER="slurm",
        EXPERIMENT="tiny",
        GPUS_PER_NODE="2",
        STAGES="stage1",
        CLUSTER_ENV=str(cluster_env),
        PYTHON=sys.executable,
    )
    env.pop("JANUS_DATA_ROOT", None)
    res = subprocess.run(
        ["bash", str(REPO / "launch/pipeline.sh")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert res.returncode == 0, res.stderr + res.stdout
    (call,) = [json.loads(x) for x in (tmp_path / "stublog/sbatch.jsonl").read_text().splitlines()]
    assert call[-1] == str(REPO / "launch/slurm/janus.sbatch") and "--nodes=1" in call
    assert "GPUS_PER_NODE" not in next(a for a in call if a.startswith("--export="))  # ALL has it
    # without CLUSTER_ENV the same check finds no shards and nothing is submitted
    res = subprocess.run(
        ["bash", str(REPO / "launch/pipeline.sh")],
        env={k: v for k, v in env.items() if k != "CLUSTER_ENV"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert res.returncode == 1 and "stage1 cannot run" in res.stderr, res.stderr


@pytest.mark.parametrize(
    "override,says",
    [
        ("train.no_such_key=1", "Key 'no_such_key' not in 'TrainConfig'"),
        ("experiment.stage1.steps=abc", "could not be converted to Integer"),
        ("deepspeed=zero9", "Could not find 'deepspeed/zero9'"),
    ],
)
def test_hydra_composition_errors_exit_2_and_are_recorded_for_job_sh(
    monkeypatch, capsys, tmp_path, override, says
):
    """Hydra's own errors (before the app runs) are user errors like the app's: one line, exit 2,
    and the line in JANUS_USER_ERROR_FILE, so job.sh never requeues them."""
    from janus_train import train

    status = tmp_path / "user_error.r0"
    for k in ("JANUS_DEBUG", "HYDRA_FULL_ERROR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("JANUS_USER_ERROR_FILE", str(status))
    monkeypatch.setattr(train, "_error", None)
    monkeypatch.setattr(
        sys, "argv", ["janus-train", "experiment=tiny", "train.dry_run=true", override]
    )
    with pytest.raises(SystemExit) as e:
        train.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    line = status.read_text().strip()
    assert line.startswith("janus-train: error: ") and says in line, line
    assert "HYDRA_FULL_ERROR" not in os.environ  # set for the composition only


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


def test_pipeline_checks_each_stage_with_its_plan_line(stubs, tmp_path):
    """The check runs what the job runs: the #PLAN line's overrides after its preset
    (checkpointing, token budget, reduction) join the stage's check. Janus-Pro-7B on the
    A100-40GB file fits only with those (stage 1 with the model's default checkpointing needs
    more than the 40 GB GPU has); with another preset they are not applied, as in the job."""
    env = dict(
        stubs,
        LAUNCHER="slurm",
        EXPERIMENT="janus_pro_7b",
        SBATCH_SCRIPT=str(REPO / "launch/slurm/janus_pro_7b_a100_40gb.sbatch"),
        RUN_ROOT=str(tmp_path / "r"),
        CHECK_DATA="0",
        PYTHON=sys.executable,
    )

    def pipeline(**extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(REPO / "launch/pipeline.sh")],
            env=dict(env, **extra),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )

    res = pipeline(STAGES="stage1")
    assert res.returncode == 0, res.stderr + res.stdout
    assert len((tmp_path / "stublog/sbatch.jsonl").read_text().splitlines()) == 1
    # the stage's own args come after the plan's, as in the job: without checkpointing it does
    # not fit, so the plan's overrides are what made it pass (not a check that accepts anything)
    res = pipeline(STAGES="stage1", STAGE1_ARGS="model.gradient_checkpointing=false")
    assert res.returncode != 0 and "stage1 cannot run" in res.stdout + res.stderr, res.stdout
