"""Run a script or module under ``torchrun --nproc_per_node N`` on CPU (gloo): the reusable
multi-process helper of the test suite.

    res = run_torchrun(["tests/test_train_dist.py", "scenario", str(tmp_path)], nproc=2)
    assert res.returncode == 0, res.output

Workers see ``CUDA_VISIBLE_DEVICES=""`` and one thread each (the CI machine has 2 cores);
``worker_exit_codes`` parses torchrun's failure report (e.g. the requeue status 75).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TorchrunResult:
    returncode: int
    output: str

    def worker_exit_codes(self) -> list[int]:
        """Exit codes torchrun reported for failed workers (empty when all succeeded)."""
        return [int(x) for x in re.findall(r"exitcode\s*:\s*(-?\d+)", self.output)]


def torchrun_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")])),
    )
    env.update(extra or {})
    return env


def torchrun_cmd(args: list[str], nproc: int = 2, module: bool = False) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "--max_restarts=0",
    ]
    if module:
        cmd.append("-m")
    return cmd + list(args)


def run_torchrun(
    args: list[str],
    nproc: int = 2,
    module: bool = False,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike = REPO,
) -> TorchrunResult:
    """Run ``args`` (a script path and its arguments, or a module with ``module=True``) under
    torchrun with ``nproc`` CPU workers; raises ``subprocess.TimeoutExpired`` on a hang: no
    output for ``timeout`` seconds (see ``run_guarded``)."""
    res = run_guarded(
        torchrun_cmd(args, nproc, module), silence=timeout, env=torchrun_env(env), cwd=cwd
    )
    return TorchrunResult(res.returncode, res.stdout)


def wait_while_talking(
    proc: subprocess.Popen, last_line: list[float], silence: float, cap: float | None = None
) -> int:
    """Wait for ``proc`` like ``proc.wait``, as a hang guard that a slow machine cannot trip: it
    raises ``subprocess.TimeoutExpired`` only when no output line arrived for ``silence`` seconds
    (``last_line[0]``: the monotonic time of the newest line, kept by the caller's reader) or the
    run exceeded ``cap`` (default ``4 * silence``: a run that talks forever). A fixed wall-clock
    timeout fails a correct run on a loaded 2-core machine (a 700-step demo run took 16 min with
    other jobs running, against 90 s idle)."""
    cap = 4 * silence if cap is None else cap
    start = time.monotonic()
    while True:
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            now = time.monotonic()
            if now - last_line[0] > silence or now - start > cap:
                raise subprocess.TimeoutExpired(proc.args, now - start) from None


def _kill_group(proc: subprocess.Popen, pids=()) -> None:
    """SIGKILL the command's process group (it runs in its own session) and any ``pids``."""
    try:
        os.killpg(proc.pid, 9)
    except OSError:
        pass
    for p in pids:
        try:
            os.kill(p, 9)
        except OSError:
            pass


def run_guarded(
    cmd: list[str],
    silence: float = 300,
    cap: float | None = None,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, stdout=PIPE, stderr=STDOUT, text=True)`` with the hang guard of
    ``wait_while_talking`` instead of a wall-clock timeout; on a hang the whole process group is
    killed and ``subprocess.TimeoutExpired`` carries the output so far."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    last = [time.monotonic()]

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            last[0] = time.monotonic()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = wait_while_talking(proc, last, silence, cap)
    except subprocess.TimeoutExpired as e:
        _kill_group(proc)
        reader.join(timeout=10)
        raise subprocess.TimeoutExpired(cmd, e.timeout, output="".join(lines)) from None
    except BaseException:  # Ctrl-C, a failing test: its own session gets no SIGINT, so kill it
        _kill_group(proc)
        raise
    reader.join(timeout=30)
    return subprocess.CompletedProcess(cmd, rc, "".join(lines))


def _children() -> dict[int, list[int]]:
    """ppid -> child pids, from /proc (Linux)."""
    out: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(d))
    return out


def _start_time(pid: int) -> str | None:
    """Start time of a live (non-zombie) process, None when gone: tells a pid from its reuse."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


@dataclass
class WatchedRun:
    returncode: int
    output: str
    seconds_after_marker: float | None
    """Seconds from the first output line containing the marker to the exit of the command."""
    descendants: dict[int, str]
    """Every process seen below the command while it ran: pid -> start time."""

    def survivors(self) -> list[int]:
        return [p for p, t in self.descendants.items() if _start_time(p) == t]


def run_watched(
    cmd: list[str],
    marker: str,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike = REPO,
    on_line=None,
) -> WatchedRun:
    """Run ``cmd``, recording every descendant process (polled) and when ``marker`` first
    appears in its output; ``on_line(line, proc)`` sees each output line. Kills the whole tree
    and raises ``subprocess.TimeoutExpired`` when no output line came for ``timeout`` seconds
    (``wait_while_talking``)."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=torchrun_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen: dict[int, str] = {}
    lines: list[str] = []
    marked: list[float] = []
    last = [time.monotonic()]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            tree = _children()
            stack = list(tree.get(proc.pid, []))
            while stack:
                p = stack.pop()
                t = _start_time(p)
                if t is not None:
                    seen.setdefault(p, t)
                stack += tree.get(p, [])
            time.sleep(0.05)

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            last[0] = time.monotonic()
            if not marked and marker in line:
                marked.append(time.monotonic())
            if on_line is not None:
                on_line(line, proc)

    threads = [
        threading.Thread(target=poll, daemon=True),
        threading.Thread(target=read, daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        rc = wait_while_talking(proc, last, timeout)
    except BaseException:  # a hang, Ctrl-C or a failing on_line: the tree runs in its own session
        _kill_group(proc, list(seen))
        raise
    finally:
        done.set()
    t_exit = time.monotonic()
    threads[1].join(timeout=10)
    return WatchedRun(rc, "".join(lines), t_exit - marked[0] if marked else None, seen)


class ZeroFilesEngine:
    """Stands in for a DeepSpeed engine in checkpoint-protocol scenarios under torchrun: the
    files of a ZeRO save (rank 0 the model file, each rank its optimizer file), written through
    ``checkpoint_engine`` as DeepSpeed does, and read back; ``w`` stands for the weights."""

    def __init__(self) -> None:
        import torch
        import torch.distributed as dist

        self.rank = dist.get_rank()
        self.w = torch.zeros(50_000)
        self.checkpoint_engine = self

    def save(self, state_dict, path) -> None:
        import torch

        torch.save(state_dict, path)

    def save_checkpoint(self, save_dir, tag, client_state, save_latest) -> None:
        import torch.distributed as dist

        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            self.checkpoint_engine.save(
                {"w": self.w, "client": client_state}, str(d / "mp_rank_00_model_states.pt")
            )
        name = f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt"
        self.checkpoint_engine.save({"exp_avg": self.w * 2}, str(d / name))
        dist.barrier()

    def load_checkpoint(self, load_dir, tag, **_):
        import torch

        d = Path(load_dir) / tag
        sd = torch.load(d / "mp_rank_00_model_states.pt", weights_only=False)
        torch.load(d / f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt", weights_only=False)
        self.w = sd["w"]
        return str(d), sd["client"]
