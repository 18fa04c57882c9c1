"""The shipped Slurm scripts against a real Slurm: ``munged``, ``slurmctld`` and ``slurmd`` from
Debian's ``slurm-wlm`` and ``munge`` (``.ci/run`` installs them) on localhost, one node, started
once per session in a temporary directory (own munge socket and key, own ports, own
``slurm.conf`` through ``SLURM_CONF``: nothing of the machine's is touched), stopped at the end.

The tiny experiment on 2 CPU ranks, submitted with ``launch/slurm/janus.sbatch`` and
``launch/pipeline.sh`` as a user would (variables and overrides only), through real
``sbatch``/``scancel``/``scontrol``. The scenarios run concurrently on the one node (16 CPUs
declared, jobs take 2), each in its own thread; each test waits for its scenario:

- one job through every way an attempt ends and resumes: ``scancel --signal=USR1 --batch``
  (job.sh checkpoints and requeues), preemption by a job of a higher-priority partition
  (``PreemptMode=REQUEUE``: Slurm requeues, job.sh does not), ``kill -9`` of a rank after progress
  (a crash, requeued), then an attempt that completes: every step logged once per attempt,
  exported, ``COMPLETED`` with 3 restarts;
- ``scancel`` of a running job: ``CANCELLED``, 0 restarts, the ranks' checkpoint written;
- a three-stage pipeline whose first stage has a bad override (``train.no_such_key=1``, checks
  off): that job ``FAILED`` with exit 2 and 0 restarts, the two later stages cancelled by Slurm,
  nothing pending.

Requeued jobs become eligible after Slurm's begin-time delay (~2 min); the tests release them
at once with ``scontrol update JobId=... StartTime=now``. What one node cannot show (several
nodes, the rendezvous host, node counts from the sbatch files) stays in test_launch_slurm.py.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.dist, pytest.mark.slow]

# Each attempt runs 2 steps, then its ranks wait for the test's event (tests/hold_site): no
# race between a run's end and the signal, on a fast or a slow machine. 3 interrupted attempts
# stop by step 9 at the latest (2 steps, then the step the signal's flag rides on, each).
STEPS = 12
HOLD_SITE = Path(__file__).resolve().parent / "hold_site"
SMOKE = [
    "train.synthetic_data=true",
    *(f"experiment.stage{i}.steps={STEPS}" for i in (1, 2, 3)),
    "train.log_every=1",
    *(f"experiment.stage{i}.global_batch_size=4" for i in (1, 2, 3)),
    "train.micro_batch_size=1",
    "train.progress_bar=false",
    "data.num_workers=0",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _why_no_slurm() -> str | None:
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch") if not shutil.which(b)]
    if missing:
        return f"no {', '.join(missing)} (apt-get install slurm-wlm munge; .ci/run does)"
    if os.geteuid() != 0:
        return "slurmd needs root"
    return None


class Cluster:
    def __init__(self, root: Path, env: dict[str, str], host: str):
        self.root, self.env, self.host = root, env, host

    def run(self, *cmd: str, check: bool = True, **kw) -> str:
        res = subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True, **kw)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {res.returncode}\n{res.stdout}{res.stderr}")
        return res.stdout

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", job_id, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, pred, what: str, timeout: float = 120) -> dict[str, str]:
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if pred(info):
                return info
            if time.time() > deadline:
                raise AssertionError(f"job {job_id}: not {what} after {timeout} s: {info}")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    reason = _why_no_slurm()
    if reason:
        pytest.skip(f"real Slurm: {reason}")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log", "munge"):
        (d / sub).mkdir()
    (d / "munge").chmod(0o700)
    key = d / "munge/key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = d / "munge/sock"
    host = socket.gethostname().split(".")[0]
    conf = d / "slurm.conf"
    conf.write_text(
        f"""ClusterName=janustest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=30
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/state/slurmctld.pid
SlurmdPidFile={d}/state/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName={host} NodeAddr=127.0.0.1 CPUs=16 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DRY_RUN"))}
    env["SLURM_CONF"] = str(conf)
    # every daemon in the foreground, a child of this process (in its process group): none
    # outlives a test run that is killed
    munged = subprocess.Popen(
        [
            shutil.which("munged"),
            "--foreground",
            "--force",
            f"--socket={sock}",
            f"--key-file={key}",
            f"--pid-file={d}/munge/pid",
            f"--log-file={d}/munge/log",
            f"--seed-file={d}/munge/seed",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(d / "log/munged.err", "w"),
    )
    deadline = time.time() + 10
    while not sock.exists():
        if munged.poll() is not None or time.time() > deadline:
            err = (d / "log/munged.err").read_text().strip()[:200]
            # installed and root (checked above): a munged that cannot start is a failure
            pytest.fail(f"real Slurm: munged did not start: {err}")
        time.sleep(0.05)
    daemons = [munged] + [
        subprocess.Popen(
            [shutil.which(name), "-D", "-f", str(conf), *extra],
            env=env,
            stdout=open(d / f"log/{name}.out", "w"),
            stderr=subprocess.STDOUT,
        )
        for name, extra in (("slurmctld", ["-i"]), ("slurmd", []))
    ]
    cluster = Cluster(d, env, host)
    try:
        deadline = time.time() + 120
        while "idle" not in cluster.run("sinfo", "-h", "-o", "%t", check=False):
            if time.time() > deadline or any(p.poll() is not None for p in daemons):
                logs = "".join(p.read_text()[-1000:] for p in (d / "log").iterdir())
                pytest.fail(f"slurm did not come up:\n{logs}")
            time.sleep(0.2)
        yield cluster
    finally:
        # jobs first (their processes belong to slurmstepd, not to the daemons), then daemons
        cluster.run("scancel", "--full", "--signal=KILL", "--user=root", check=False)
        cluster.run("scancel", "--user=root", check=False)  # the pending ones
        deadline = time.time() + 20
        while cluster.run("squeue", "-h", check=False).strip() and time.time() < deadline:
            time.sleep(0.2)
        for p in reversed(daemons):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


# ---- scenarios (each in a thread; the tests below wait for them) --------------------------------


def _job_env(cluster: Cluster, tmp: Path, **extra: str) -> dict[str, str]:
    """The job's environment; its ranks hold after 2 steps while ``tmp/hold`` exists."""
    (tmp / "hold").touch()
    try:  # the rendezvous host is the node's name (job.sh): where it does not resolve, loopback
        socket.gethostbyname(cluster.host)
    except OSError:
        extra.setdefault("RDZV_HOST", "127.0.0.1")
    return dict(
        cluster.env,
        EXPERIMENT="tiny",
        GPUS_PER_NODE="2",
        PYTHON=sys.executable,
        WANDB_MODE="disabled",
        RUN_ROOT=str(tmp / "runs"),
        LOG_ROOT=str(tmp / "logs"),
        RDZV_PORT=str(_free_port()),
        JANUS_TEST_HOLD=str(tmp / "hold"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(HOLD_SITE), cluster.env.get("PYTHONPATH")])),
        **extra,
    )


def _sbatch(cluster: Cluster, tmp: Path, env: dict, *args: str) -> str:
    out = cluster.run(
        "sbatch",
        "--parsable",
        "-c",
        "2",
        f"--output={tmp}/%x-%j.out",
        *args,
        env=env,
        cwd=REPO,
    )
    return out.strip().split(";")[0]


def _logged_steps(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    return [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x.strip()]


def _wait_step_past(cluster: Cluster, job: str, metrics: Path, step: int) -> int:
    """Until rank 0 logs a step after ``step`` (in this attempt: rows past the resume step)."""
    deadline = time.time() + 150
    while True:
        logged = _logged_steps(metrics)
        if logged and logged[-1] > step:
            return logged[-1]
        info = cluster.job(job)
        assert info.get("JobState") in ("RUNNING", "PENDING", "CONFIGURING"), str(info)
        assert time.time() < deadline, f"job {job}: no step after {step} within 150 s"
        time.sleep(0.1)


def _stepds(job: str) -> list[str]:
    prefix = f"slurmstepd: [{job}.".encode()
    found = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and (p / "cmdline").read_bytes().startswith(prefix):
                found.append(p.name)
        except OSError:
            pass
    return found


def _wait_gone(job: str, timeout: float = 90) -> None:
    """Until no process of the job is left on the node (its batch shell has exited)."""
    deadline = time.time() + timeout
    while _stepds(job):
        assert time.time() < deadline, f"job {job}: still on the node after {timeout} s"
        time.sleep(0.1)


def _release(cluster: Cluster, job: str, restarts: int) -> None:
    """Wait for the requeued job (Restarts=restarts, pending), then make it eligible now.

    Slurm's own delay (cred_expire, 120 s) keeps a requeued job from starting while slurmd still
    holds the previous attempt's revoked credential: a job started within the same second as the
    revocation is killed ("Job credential revoked"). So: the previous attempt's slurmstepd
    processes gone, then one more second."""
    cluster.wait(
        job,
        lambda i: i.get("Restarts") == str(restarts) and i.get("JobState") == "PENDING",
        f"requeued ({restarts} restarts)",
    )
    _wait_gone(job)
    time.sleep(1.1)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")


def _rank_pids(run_dir: Path) -> list[int]:
    """The training ranks of a run: processes running janus_train.train with its run dir,
    not the torchrun agent nor the launch scripts."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in argv]
        if (
            f"train.run_dir={run_dir}" in text
            and "janus_train.train" in text
            and "torch.distributed.run" not in text
            and not text[0].endswith("bash")
        ):
            pids.append(int(p.name))
    return pids


def _only_running(cluster: Cluster, job: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        running = cluster.run("squeue", "-h", "-t", "RUNNING,COMPLETING", "-o", "%i").split()
        if running == [job]:
            return
        assert time.time() < deadline, f"other jobs still running: {running}"
        time.sleep(0.2)


def scenario_lifecycle(cluster: Cluster, tmp: Path, others_done) -> dict:
    env = _job_env(cluster, tmp)
    job = _sbatch(cluster, tmp, env, "--job-name=life", "launch/slurm/janus.sbatch", *SMOKE)
    run_dir = tmp / "runs/tiny/stage1"
    metrics = run_dir / "metrics.jsonl"
    # attempt 0: a preemption notice by hand -> job.sh forwards it, checkpoints, requeues
    _wait_step_past(cluster, job, metrics, 0)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    _release(cluster, job, 1)
    stops = [int((run_dir / "checkpoints/latest").read_text().strip().removeprefix("step_"))]
    # attempt 1: preempted by a job of the higher-priority partition (Slurm requeues it)
    _wait_step_past(cluster, job, metrics, stops[0])
    others_done()  # the urgent job takes the whole node: it would preempt them too
    _only_running(cluster, job)
    cluster.run(
        "sbatch", "-p", "urgent", "--exclusive", "--output=/dev/null", "--wrap=true", cwd=tmp
    )
    _release(cluster, job, 2)
    stops.append(int((run_dir / "checkpoints/latest").read_text().strip().removeprefix("step_")))
    # attempt 2: a rank dies (SIGKILL) after progress: a crash, requeued by job.sh
    crashed_after = _wait_step_past(cluster, job, metrics, stops[1])
    pids = _rank_pids(run_dir)
    assert len(pids) == 2, pids
    os.kill(pids[0], signal.SIGKILL)
    cluster.wait(job, lambda i: i.get("Restarts") == "3", "requeued after the crash")
    assert (tmp / "hold.reached").exists(), "the ranks never held (tests/hold_site)"
    (tmp / "hold").unlink()  # the last attempt runs to the end
    _release(cluster, job, 3)
    # attempt 3: resumes from the preemption's checkpoint and completes
    info = cluster.wait(job, lambda i: i.get("JobState") == "COMPLETED", "completed")
    return dict(
        info=info,
        stops=stops,
        crashed_after=crashed_after,
        out=(tmp / f"life-{job}.out").read_text(),
        run_dir=run_dir,
        logs=tmp / f"logs/life-{job}",
    )


def scenario_scancel(cluster: Cluster, tmp: Path) -> dict:
    env = _job_env(cluster, tmp)
    job = _sbatch(cluster, tmp, env, "--job-name=cancel", "launch/slurm/janus.sbatch", *SMOKE)
    run_dir = tmp / "runs/tiny/stage1"
    _wait_step_past(cluster, job, run_dir / "metrics.jsonl", 0)
    cluster.run("scancel", job)
    info = cluster.wait(job, lambda i: i.get("JobState") == "CANCELLED", "cancelled")
    _wait_gone(job)  # job.sh has decided (a requeue comes before its end) and the ranks saved
    return dict(
        info=cluster.job(job),
        first=info,
        out=(tmp / f"cancel-{job}.out").read_text(),
        run_dir=run_dir,
        queue=cluster.run("squeue", "-h", "-j", job, "-o", "%T"),
    )


def scenario_pipeline(cluster: Cluster, tmp: Path) -> dict:
    env = _job_env(
        cluster,
        tmp,
        LAUNCHER="slurm",
        CHECK="0",  # its checks would refuse the bad override: this is a direct submission
        SBATCH_ARGS=f"-c 2 --output={tmp}/%x-%j.out",
        STAGE1_ARGS="train.no_such_key=1",
    )
    res = subprocess.run(
        ["bash", str(REPO / "launch/pipeline.sh"), *SMOKE],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    jobs = re.findall(r"submitted as job (\d+)", res.stdout)
    assert len(jobs) == 3, res.stdout
    cluster.wait(jobs[0], lambda i: i.get("JobState") == "FAILED", "failed")
    later = [
        cluster.wait(j, lambda i: i.get("JobState") == "CANCELLED", "cancelled", timeout=60)
        for j in jobs[1:]
    ]
    _wait_gone(jobs[0])  # job.sh has decided: a requeue would come before its end
    return dict(
        stdout=res.stdout,
        jobs=jobs,
        first=cluster.job(jobs[0]),
        later=later,
        out=(tmp / f"tiny-stage1-{jobs[0]}.out").read_text(),
        pending=cluster.run("squeue", "-h", "-t", "PENDING", "-o", "%i").split(),
        error_file=tmp / f"logs/tiny-stage1-{jobs[0]}/user_error.r0",
    )


@pytest.fixture(scope="module")
def scenarios(slurm, tmp_path_factory):
    pool = concurrent.futures.ThreadPoolExecutor(3)
    dirs = {k: tmp_path_factory.mktemp(k) for k in ("life", "cancel", "pipe")}
    cancel = pool.submit(scenario_scancel, slurm, dirs["cancel"])
    pipe = pool.submit(scenario_pipeline, slurm, dirs["pipe"])

    def others_done():
        concurrent.futures.wait([cancel, pipe], timeout=150)

    life = pool.submit(scenario_lifecycle, slurm, dirs["life"], others_done)
    yield dict(life=life, cancel=cancel, pipe=pipe)
    pool.shutdown(wait=True, cancel_futures=True)


def test_usr1_preemption_crash_each_requeue_once_and_the_run_completes(scenarios):
    r = scenarios["life"].result(timeout=300)
    info, out = r["info"], r["out"]
    assert info["Restarts"] == "3" and info["ExitCode"] == "0:0", (info, out)
    assert (r["run_dir"] / "hf/config.json").is_file()
    # the log says what happened, from what Slurm reported
    assert "SIGUSR1 (preemption notice: no time limit" in out, out
    assert "requeueing job" in out and "restart 1 of at most" in out, out
    assert "requeued by Slurm (preemption with PreemptMode=REQUEUE" in out, out
    assert "step crashed (rc=1, not a user error" in out and "restart 3 of at most" in out, out
    assert out.count("requeueing job") == 2, out  # USR1 and the crash; Slurm did the preemption
    # USR1 and preemption both checkpointed; the crash did not, so the last attempt resumed from
    # the preemption's checkpoint and repeated the crashed steps
    s0, s1 = r["stops"]
    assert 1 <= s0 < s1 < r["crashed_after"] < STEPS, r
    train_log = (r["run_dir"] / "train.log").read_text()
    for s in (s0, s1):
        assert f"resuming at step {s}" in train_log
    assert train_log.count(f"resuming at step {s1}") == 2  # after the preemption and the crash
    logged = _logged_steps(r["run_dir"] / "metrics.jsonl")
    assert logged == list(range(1, STEPS + 1))  # rows past the resume step are dropped
    assert sorted(p.name for p in r["logs"].glob("node0.r*.log")) == [
        f"node0.r{k}.log" for k in range(4)
    ]


def test_scancel_cancels_without_requeue_and_the_ranks_checkpoint(scenarios):
    r = scenarios["cancel"].result(timeout=300)
    info = r["info"]
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", (info, r["out"])
    assert r["queue"].strip() in ("", "CANCELLED"), r["queue"]
    assert "cancelled (scancel or an administrator" in r["out"], r["out"]
    assert "requeueing" not in r["out"]
    # the ranks got SIGTERM and checkpointed in KillWait: a resubmission resumes
    assert (r["run_dir"] / "checkpoints/latest").read_text().startswith("step_")


def test_pipeline_user_error_fails_once_and_later_stages_are_cancelled(scenarios):
    r = scenarios["pipe"].result(timeout=300)
    first = r["first"]
    assert first["JobState"] == "FAILED" and first["Restarts"] == "0", (first, r["out"])
    assert first["ExitCode"] == "2:0"
    assert "user error, not requeueing" in r["out"] and "no_such_key" in r["out"], r["out"]
    assert "no_such_key" in r["error_file"].read_text()
    for info in r["later"]:
        assert info["JobState"] == "CANCELLED" and info["Reason"] == "DependencyNeverSatisfied"
    assert not set(r["jobs"]) & set(r["pending"])
    assert "Slurm cancels it if job" in r["stdout"]
