"""Smaller fidelity points (docs/fidelity.md): first-sentence caption truncation only in the
stage the Janus paper applies it; re-initialised code embeddings are the VQ's normalised
codebook; the pad token's embedding (every CFG-dropped prompt's input) trains only with
``model.train_pad_embedding``."""

from __future__ import annotations

import copy

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
    from tests.helpers import stage_context

    _, proc = tiny_model_and_processor
    run = tiny_run(["stage=stage3", "experiment.stage3.first_sentence_prob=0.7"])
    assert stage_context(run, proc).first_sentence_prob == 0.7
    run = tiny_run(["stage=stage1", "experiment.stage1.first_sentence_prob=0.0"])
    assert stage_context(run, proc).first_sentence_prob == 0.0


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


@pytest.mark.parametrize("trainable", [False, True])
def test_pad_embedding_trains_only_when_asked(tiny_workdir, tiny_model_and_processor, trainable):
    """``model.train_pad_embedding``: after a CFG-dropped step the pad row's gradient is zero
    and an AdamW step leaves the row bitwise as it was (false, the default), or the row gets a
    gradient and moves (true, the tiny demo's setting). Both models come from ``build_model``."""
    if trainable:  # the tiny experiment's value: the session's model was built with it
        assert tiny_run().model.train_pad_embedding
        model, proc = copy.deepcopy(tiny_model_and_processor[0]), tiny_model_and_processor[1]
    else:
        run = tiny_run(["model.train_pad_embedding=false"])
        model, proc = build_model(run.model, workdir=tiny_workdir)
    st = resolve_special_tokens(proc.tokenizer)
    n = model.config.vision_config.num_image_tokens
    head = [st.bos, st.pad, st.pad, st.pad, st.boi]  # an unconditional (CFG-dropped) prompt
    sample = {
        "ids": head + [st.pad] * n,
        "labels": [-100] * (len(head) + n),
        "codes": [-100] * len(head) + [i % 7 for i in range(n)],
        "task": 2,
    }
    emb = model.get_input_embeddings().weight
    with torch.no_grad():  # a released checkpoint's pad row is not zero
        emb[st.pad] = torch.linspace(-1, 1, emb.shape[1])
    before = emb.detach().clone()
    model.train()
    out = JanusTrainModel(model)(collate([sample], st.pad))
    out["loss_sum"].sum().backward()
    assert float(emb.grad[st.bos].abs().sum()) > 0  # the step did reach the embeddings
    assert (float(emb.grad[st.pad].abs().sum()) > 0) is trainable
    torch.optim.AdamW([emb], lr=1e-2, weight_decay=0.0).step()
    assert torch.equal(emb[st.pad], before[st.pad]) is not trainable
    assert torch.equal(emb[st.eos], before[st.eos])  # unused rows stay untouched


def test_presets_keep_the_released_pad_row():
    """The default is false and only the tiny experiment (the demo) sets it."""
    from pathlib import Path

    from janus_train.model.config import ModelConfig

    assert ModelConfig().train_pad_embedding is False
    conf = Path(__file__).parents[1] / "conf"
    setting = sorted(
        str(f.relative_to(conf))
        for f in conf.rglob("*.yaml")
        if "train_pad_embedding" in f.read_text()
    )
    assert setting == ["experiment/tiny.yaml"]


def test_official_defaults():
    """CFG training dropout 10% (Janus paper, implementation details), inference guidance 5 and temperature 1 (DeepSeek's
    ``generation_inference.py``: ``cfg_weight=5``, ``temperature=1``)."""
    from janus_train.data.config import DataConfig
    from janus_train.sample import SampleConfig
    from janus_train.trainer.config import EvalConfig

    assert DataConfig().cfg_dropout == 0.1
    assert (SampleConfig().guidance_scale, SampleConfig().temperature) == (5.0, 1.0)
    assert EvalConfig().guidance_scale == 5.0


KINDS = ("code", "paper", "choice")


def test_every_fidelity_row_has_a_kind_and_existing_tests():
    """docs/fidelity.md: every table row has five cells, a kind (code / paper / choice; a
    choice gives its reason, ``why:``) and names at least one test, and each named test exists
    (``file.py::function``; ``::function`` continues the previous file)."""
    import re
    from pathlib import Path

    root = Path(__file__).parents[1]
    lines = (root / "docs" / "fidelity.md").read_text().splitlines()
    header = (
        "| behaviour | kind | where (DeepSeek / paper; for a choice, why) | project module | test |"
    )
    assert header in lines
    rows = [ln for ln in lines if ln.startswith("| ") and ln != header and "---" not in ln]
    assert len(rows) >= 28
    kinds = set()
    for row in rows:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]
        assert len(cells) == 5, row
        kind, where, last_cell = cells[1], cells[2], cells[4]
        assert kind in KINDS, row
        assert (kind == "choice") == where.startswith("why: "), row
        kinds.add(kind)
        refs = re.findall(r"`(\w+\.py)?::(\w+)`", last_cell)
        assert refs, row
        current = None
        for file, func in refs:
            current = file or current
            assert current, row
            src = (root / "tests" / current).read_text()
            assert re.search(rf"^def {func}\(", src, re.M), f"{current}::{func}"
    assert kinds == set(KINDS)
