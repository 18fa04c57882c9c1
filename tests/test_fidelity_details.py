"""Smaller fidelity points (docs/fidelity.md): first-sentence caption truncation only in the
stage the Janus paper applies it; re-initialised code embeddings are the VQ's normalised
codebook; the pad token's embedding (every CFG-dropped prompt's input) trains, as in DeepSeek's
model whose Llama has no ``padding_idx``."""

from __future__ import annotations

import pytest
import torch

from janus_train.config import compose, to_run_config
from janus_train.model import JanusTrainModel, build_model, resolve_special_tokens
from tests.conftest import tiny_run
from tests.helpers import collate


@pytest.mark.parametrize("exp", ["janus_1.3b", "janus_pro_1b", "janus_pro_7b"])
def test_first_sentence_only_in_stage2(exp):
    got = {
        stage: to_run_config(compose([f"experiment={exp}", f"stage={stage}"])).hparams
        for stage in ("stage1", "stage2", "stage3")
    }
    assert {k: v.first_sentence_prob for k, v in got.items()} == {
        "stage1": 0.0,
        "stage2": 0.25,
        "stage3": 0.0,
    }


def test_builders_take_the_stage_probability(tiny_model_and_processor):
    from janus_train.data.loader import build_context

    _, proc = tiny_model_and_processor
    run = tiny_run(["stage=stage3", "experiment.stage3.first_sentence_prob=0.7"])
    assert build_context(run, proc).first_sentence_prob == 0.7
    run = tiny_run(["stage=stage1", "experiment.stage1.first_sentence_prob=0.0"])
    assert build_context(run, proc).first_sentence_prob == 0.0


def test_reinit_gen_modules_sets_code_embeddings_to_the_normalised_codebook(tiny_workdir):
    plain, _ = build_model(tiny_run().model, workdir=tiny_workdir)
    head_only, _ = build_model(tiny_run(["model.reinit_gen_head=true"]).model, workdir=tiny_workdir)
    full, _ = build_model(tiny_run(["model.reinit_gen_modules=true"]).model, workdir=tiny_workdir)
    cb = full.model.vqmodel.quantize.embedding.weight.detach()
    want = cb / cb.norm(dim=1, keepdim=True)
    torch.testing.assert_close(full.model.generation_embeddings.weight.detach(), want)
    assert torch.equal(
        head_only.model.generation_embeddings.weight, plain.model.generation_embeddings.weight
    )


def test_pad_embedding_gets_gradient_from_cfg_dropped_prompts(tiny_workdir):
    model, proc = build_model(tiny_run().model, workdir=tiny_workdir)
    st = resolve_special_tokens(proc.tokenizer)
    n = model.config.vision_config.num_image_tokens
    head = [st.bos, st.pad, st.pad, st.pad, st.boi]  # an unconditional (CFG-dropped) prompt
    sample = {
        "ids": head + [st.pad] * n,
        "labels": [-100] * (len(head) + n),
        "codes": [-100] * len(head) + [i % 7 for i in range(n)],
        "task": 2,
    }
    model.train()
    out = JanusTrainModel(model)(collate([sample], st.pad))
    out["loss_sum"].sum().backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad is not None and float(grad[st.pad].abs().sum()) > 0
    assert float(grad[st.eos].abs().sum()) == 0  # unused rows stay untouched


def test_official_defaults():
    """CFG training dropout 10% (Janus paper, implementation details), inference guidance 5 and temperature 1 (DeepSeek's
    ``generation_inference.py``: ``cfg_weight=5``, ``temperature=1``)."""
    from janus_train.data.config import DataConfig
    from janus_train.sample import SampleConfig
    from janus_train.trainer.config import TrainConfig

    assert DataConfig().cfg_dropout == 0.1
    assert (SampleConfig().guidance_scale, SampleConfig().temperature) == (5.0, 1.0)
    assert TrainConfig().eval_guidance_scale == 5.0


def test_every_fidelity_row_names_existing_tests():
    """docs/fidelity.md: every table row names at least one test, and each named test exists
    (``file.py::function``; ``::function`` continues the previous file)."""
    import re
    from pathlib import Path

    root = Path(__file__).parents[1]
    rows = [
        line
        for line in (root / "docs" / "fidelity.md").read_text().splitlines()
        if line.startswith("| ") and not line.startswith("| official") and "---" not in line
    ]
    assert len(rows) >= 20
    for row in rows:
        last_cell = row.rstrip(" |").rsplit(" | ", 1)[-1]
        refs = re.findall(r"`(\w+\.py)?::(\w+)`", last_cell)
        assert refs, row
        current = None
        for file, func in refs:
            current = file or current
            assert current, row
            src = (root / "tests" / current).read_text()
            assert re.search(rf"^def {func}\(", src, re.M), f"{current}::{func}"
