"""Shared fixtures: the tiny run config and a tiny random Janus model with a local tokenizer."""

from __future__ import annotations

import pytest
import torch

from janus_train.config import RunConfig, compose, to_run_config


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
