"""Test-only hold for tests/test_slurm_real.py: put on ``PYTHONPATH`` of a job with
``JANUS_TEST_HOLD=<file>``, every Python process of the job imports it at start-up (``site``).
Once ``janus_train.data.synthetic_loader`` is imported, a rank's synthetic loader runs the first
two steps of each attempt (both logged), then waits before each further step while ``<file>``
exists, until a stop signal (SIGUSR1/SIGTERM) reaches the rank's run guard: the run cannot end
before the test's event (a preemption notice, a preemption, a killed rank) has arrived, however
fast or slow the machine. A rank that waits creates ``<file>.reached`` (the test checks it: a
hold that silently stopped applying would bring the race back). The test removes ``<file>`` to
let the last attempt complete. Without the variable this module does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time

HOLD = os.environ.get("JANUS_TEST_HOLD")
TARGET = "janus_train.data.synthetic_loader"
FREE_STEPS = 2


def _install(module) -> None:
    from janus_train.trainer import guard as guard_mod

    guards = []
    enter = guard_mod.RunGuard.__enter__

    def guarded_enter(self):
        guards.append(self)
        return enter(self)

    guard_mod.RunGuard.__enter__ = guarded_enter
    next_step = module.SyntheticStepLoader.next_step
    calls = [0]

    def held_next_step(self):
        calls[0] += 1
        if calls[0] > FREE_STEPS and os.path.exists(HOLD):
            open(HOLD + ".reached", "a").close()
            # a signal handler sets the flag (sleep returns to the interpreter for it)
            while os.path.exists(HOLD) and not (guards and guards[-1].stop_requested):
                time.sleep(0.05)
        return next_step(self)

    module.SyntheticStepLoader.next_step = held_next_step


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None:
            raise ImportError(f"tests/hold_site: {name} not found (moved? update TARGET)")
        exec_module = spec.loader.exec_module

        def exec_then_install(module):
            exec_module(module)
            _install(module)

        spec.loader.exec_module = exec_then_install
        return spec


if HOLD:
    sys.meta_path.insert(0, _Finder())
