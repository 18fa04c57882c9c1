"""The suite's own subprocess helpers (``tests/dist_utils.py``): what the multi-process tests'
hang guards do, checked on plain child processes (no torch, no torchrun)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.dist_utils import _start_time, run_guarded


def test_hang_guard_fails_on_silence_not_on_a_slow_run():
    """The suite's subprocess hang guard (``dist_utils.wait_while_talking``) fails a run that
    stops talking for ``silence`` seconds, whole process group killed, output kept, but not one
    that keeps printing for longer than ``silence`` in all."""
    # 4.2 s in all, 0.3 s gaps: longer than the 3 s of silence allowed, never silent that long
    # (the bare interpreter's start-up counts as silence: 3 s leaves room on a loaded machine)
    talk = "import time\nfor i in range(14):\n    print(i, flush=True); time.sleep(0.3)\n"
    res = run_guarded([sys.executable, "-c", talk], silence=3.0)
    assert res.returncode == 0 and res.stdout.split() == [str(i) for i in range(14)]
    hang = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('started', p.pid, flush=True)\ntime.sleep(60)\n"
    )
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as e:
        run_guarded([sys.executable, "-c", hang], silence=2.0)
    assert time.monotonic() - t0 < 30 and "started" in e.value.output
    grandchild = int(e.value.output.split()[1])
    deadline = time.monotonic() + 10
    while _start_time(grandchild) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _start_time(grandchild) is None  # the process group went with it
    with pytest.raises(subprocess.TimeoutExpired):  # the cap: talking forever is a hang too
        run_guarded([sys.executable, "-c", "while True: print('.', flush=True)"], silence=30, cap=2)


def test_every_torchrun_worker_script_leaves_through_exit_finished():
    """A test file that torchruns itself must end its worker's ``__main__`` branch with
    ``exit_finished`` (``janus_train.trainer.distributed``), as the trainer does: letting Python
    finalise a rank with gloo's threads alive aborts it now and then ("terminate called without
    an active exception", SIGABRT), which failed ``test_plan``'s traffic run on a loaded machine."""
    import ast
    from pathlib import Path

    missing = []
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        text = path.read_text()
        if "run_torchrun(" not in text or "__main__" not in text:
            continue
        for node in ast.parse(text).body:
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                if "exit_finished(" not in ast.unparse(node) and not _worker_exits(text, node):
                    missing.append(path.name)
    assert missing == [], f"torchrun worker scripts ending without exit_finished: {missing}"


def _worker_exits(text: str, main: object) -> bool:
    """The functions the ``__main__`` branch calls end with ``exit_finished`` themselves."""
    import ast

    called = {
        n.func.id
        for n in ast.walk(main)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }
    defs = [n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name in called]
    return bool(defs) and all("exit_finished(" in ast.unparse(d) for d in defs)
