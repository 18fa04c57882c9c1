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
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--max_restarts=0"]
    if module:
        cmd.append("-m")
    return cmd + list(args)


def run_torchrun(args: list[str], nproc: int = 2, module: bool = False, timeout: float = 300,
                 env: dict[str, str] | None = None, cwd: str | os.PathLike = REPO
                 ) -> TorchrunResult:
    """Run ``args`` (a script path and its arguments, or a module with ``module=True``) under
    torchrun with ``nproc`` CPU workers; raises ``subprocess.TimeoutExpired`` on a hang."""
    proc = subprocess.run(
        torchrun_cmd(args, nproc, module), cwd=cwd, env=torchrun_env(env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )
    return TorchrunResult(proc.returncode, proc.stdout)
