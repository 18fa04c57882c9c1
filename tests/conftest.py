"""Shared fixtures: the tiny run config and a tiny random Janus model with a local tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

from janus_train import compat
from janus_train.config import RunConfig, compose, to_run_config


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs the unit tier on 2 workers) each worker takes its
    share of the cores for torch's intra-op threads: every worker using them all would
    oversubscribe the machine."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        torch.set_num_threads(threads)
        # ...and so does every process a test starts (training runs, CLIs): with more OpenMP
        # threads than free cores, torch's threads spin-wait on each other (a Linear + relu loop
        # ran 9x slower with 2 threads than with 1 while another job held a core; the demo
        # end-to-end run went from ~1 min to 26 min)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def tiny_run(overrides: list[str] | None = None) -> RunConfig:
    return to_run_config(compose(["experiment=tiny", "model=tiny", *(overrides or [])]))


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_model_and_processor(tiny_workdir):
    """A session-wide tiny model (do not mutate: use `fresh_tiny_model` for that)."""
    from janus_train.model import build_model

    torch.manual_seed(0)
    return build_model(tiny_run().model, workdir=tiny_workdir)


@pytest.fixture()
def fresh_tiny_model(tiny_workdir):
    from janus_train.model import build_model

    model, processor = build_model(tiny_run().model, workdir=tiny_workdir)
    return model, processor


_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture(autouse=True)
def _no_process_group_leaks():
    """A test that runs the trainer in-process (a world of one) must not leave its process group
    (whose store holds MASTER_PORT) nor its rendezvous variables to later tests: a subprocess
    inheriting MASTER_PORT would fail to bind it (EADDRINUSE); nor ZeRO-3's ``F.linear``."""
    import torch.distributed as dist

    before = {k: os.environ.get(k) for k in _DIST_ENV}
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    # DeepSpeed caches its groups at module level, also when the trainer destroyed its group
    compat.reset_deepspeed_groups()
    compat.restore_torch_linear()  # an in-process ZeRO-3 engine leaves its F.linear patch
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
