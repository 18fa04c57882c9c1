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
    torchrun with ``nproc`` CPU workers; raises ``subprocess.TimeoutExpired`` on a hang."""
    proc = subprocess.run(
        torchrun_cmd(args, nproc, module),
        cwd=cwd,
        env=torchrun_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    return TorchrunResult(proc.returncode, proc.stdout)


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
    and raises ``subprocess.TimeoutExpired`` after ``timeout``."""
    import threading
    import time

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
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in [proc.pid, *seen]:
            try:
                os.kill(p, 9)
            except OSError:
                pass
        raise
    finally:
        done.set()
    t_exit = time.monotonic()
    threads[1].join(timeout=10)
    return WatchedRun(rc, "".join(lines), t_exit - marked[0] if marked else None, seen)
