"""Selectable activation checkpointing (none | every layer | every k-th layer): the flags land
on the intended decoder layers and gradients equal the un-checkpointed model's."""

from __future__ import annotations

import pytest
import torch

from janus_train.config import compose, to_run_config
from janus_train.model import JanusTrainModel, build_model
from tests.helpers import synthetic_loader


def _grads(tmp_path, overrides):
    run = to_run_config(
        compose(
            [
                "experiment=tiny",
                "stage=stage2",
                "train.synthetic_data=true",
                "train.synthetic_seq_len=40",
                "experiment.stage2.global_batch_size=4",
                "model.text.num_hidden_layers=4",
                *overrides,
            ]
        )
    )
    janus, proc = build_model(run.model, workdir=tmp_path)
    janus.train()
    for m in janus.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = synthetic_loader(run, proc).next_step()[0]
    calls = [0] * 4  # first-norm forwards per layer: 2 where the backward recomputes it

    def hook(i):
        def fn(*_):
            calls[i] += 1

        return fn

    for i, layer in enumerate(janus.model.language_model.layers):
        layer.input_layernorm.register_forward_hook(hook(i))
    JanusTrainModel(janus)(batch)["loss_sum"].sum().backward()
    flags = [layer.gradient_checkpointing for layer in janus.model.language_model.layers]
    assert calls == [2 if f else 1 for f in flags]
    return flags, {n: p.grad for n, p in janus.named_parameters() if p.grad is not None}


def test_checkpoint_every_k_layers_same_gradients(tmp_path):
    flags0, ref = _grads(tmp_path, [])
    assert flags0 == [False] * 4
    for k, want in (
        (1, [True] * 4),
        (2, [True, False, True, False]),
        (3, [True, False, False, True]),
    ):
        flags, got = _grads(
            tmp_path, ["model.gradient_checkpointing=true", f"model.checkpoint_every={k}"]
        )
        assert flags == want
        assert got.keys() == ref.keys()
        for n, g in ref.items():
            torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_checkpoint_every_must_be_positive():
    with pytest.raises(ValueError, match="model.checkpoint_every=0"):
        to_run_config(compose(["model.checkpoint_every=0"]))
