"""Freezing by named groups: gradients reach exactly the spec's freeze matrix (§5) after one
backward per stage; frozen modules run in eval mode; trainable.json counts; loading paths."""

from __future__ import annotations

import json

import pytest
import torch

from janus_train.model import (
    GROUPS,
    JanusTrainModel,
    apply_freeze,
    build_model,
    resolve_special_tokens,
    set_train_mode,
    write_trainable_report,
)
from tests.conftest import tiny_run
from tests.helpers import group_of, mixed_batch

# Spec §5, typed out independently of conf/stage/*.yaml.
FREEZE_MATRIX = {
    "stage1": {"und_adaptor", "gen_adaptor", "gen_head"},
    "stage2": {"und_adaptor", "gen_adaptor", "gen_head", "llm"},
    "stage3": {"und_encoder", "und_adaptor", "gen_adaptor", "gen_head", "llm"},
}


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
@pytest.mark.parametrize("gen_emb", [False, True])
def test_gradients_follow_freeze_matrix(fresh_tiny_model, stage, gen_emb):
    model, processor = fresh_tiny_model
    expected = FREEZE_MATRIX[stage] | ({"gen_embeddings"} if gen_emb else set())
    listed = [f"stage.trainable=[{','.join(sorted(expected))}]"] if gen_emb else []
    run = tiny_run([f"stage={stage}", *listed])
    assert set(run.trainable_groups) == expected
    apply_freeze(model, run.trainable_groups)
    set_train_mode(model, run.trainable_groups)
    out = JanusTrainModel(model)(mixed_batch(model, processor.tokenizer))
    out["loss_sum"].sum().backward()
    grad_norm = {g: 0.0 for g in GROUPS}
    for name, p in model.named_parameters():
        group = group_of(name)
        if group in expected:
            assert p.requires_grad and p.grad is not None, name
            grad_norm[group] += float(p.grad.norm())
        else:
            assert not p.requires_grad and p.grad is None, name
    for group in expected:
        assert grad_norm[group] > 0, group


def test_frozen_modules_in_eval_mode_and_idempotent(fresh_tiny_model):
    model, _ = fresh_tiny_model
    groups = ["und_adaptor", "gen_head"]
    apply_freeze(model, ["llm"])
    apply_freeze(model, groups)  # second call fully replaces the first
    set_train_mode(model, groups)
    assert model.model.aligner.training and model.model.generation_head.training
    for m in (model.model.vision_model, model.model.vqmodel, model.model.language_model):
        assert not m.training
        assert all(not p.requires_grad for p in m.parameters())


def test_trainable_report_counts(fresh_tiny_model, tmp_path):
    model, _ = fresh_tiny_model
    report = apply_freeze(model, ["gen_head", "llm"])
    write_trainable_report(report, tmp_path / "trainable.json")
    data = json.loads((tmp_path / "trainable.json").read_text())
    head = sum(p.numel() for p in model.model.generation_head.parameters())
    llm = (
        sum(p.numel() for p in model.model.language_model.parameters())
        + model.lm_head.weight.numel()
    )
    assert data["gen_head"] == {"trainable": head, "frozen": 0}
    assert data["llm"] == {"trainable": llm, "frozen": 0}
    assert data["total"]["trainable"] == head + llm
    assert data["total"]["frozen"] == sum(p.numel() for p in model.parameters()) - head - llm
    assert data["vq"]["trainable"] == 0


@pytest.mark.parametrize(
    "groups,match",
    [(["vq"], "must stay frozen"), (["llm", "vision"], "unknown module group")],
)
def test_bad_trainable_lists(fresh_tiny_model, groups, match):
    model, _ = fresh_tiny_model
    with pytest.raises(ValueError, match=match):
        apply_freeze(model, groups)


def test_from_pretrained_roundtrip_and_reinit_gen_head(fresh_tiny_model, tmp_path):
    model, processor = fresh_tiny_model
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    run = tiny_run([f"model.init_from={ckpt}", "model.tokenizer=null"])
    loaded, proc = build_model(run.model, workdir=tmp_path)
    ref = model.state_dict()
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0, msg=k)
    assert resolve_special_tokens(proc.tokenizer) == resolve_special_tokens(processor.tokenizer)
    assert loaded.generation_config.generation_kwargs[
        "boi_token_id"
    ] == proc.tokenizer.convert_tokens_to_ids("<begin_of_image>")

    run = tiny_run(
        [f"model.init_from={ckpt}", "model.tokenizer=null", "model.reinit_gen_head=true"]
    )
    reinit, _ = build_model(run.model, workdir=tmp_path)
    new = reinit.state_dict()
    for k in ref:
        same = torch.equal(new[k], ref[k])
        if k.startswith("model.generation_head.") and k.endswith("weight"):
            assert not same, k
        elif not k.startswith("model.generation_head."):
            assert same, k


def test_missing_checkpoint_dir_is_a_clear_error(tmp_path):
    run = tiny_run([f"model.init_from={tmp_path / 'nope'}", f"model.tokenizer={tmp_path / 'nope'}"])
    with pytest.raises(FileNotFoundError, match="nope"):
        build_model(run.model, workdir=tmp_path)


def test_tokenizer_without_janus_tokens_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(
        ["plain text only"], trainers.BpeTrainer(vocab_size=300, show_progress=False)
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    with pytest.raises(ValueError, match="<image_placeholder>"):
        resolve_special_tokens(fast)


def test_saved_model_keeps_image_generation_config(fresh_tiny_model, tmp_path):
    """A plain save_pretrained -> from_pretrained keeps the boi_token_id that
    generate(generation_mode="image") needs."""
    from transformers import JanusForConditionalGeneration

    model, processor = fresh_tiny_model
    model.save_pretrained(tmp_path / "m")
    loaded = JanusForConditionalGeneration.from_pretrained(tmp_path / "m", local_files_only=True)
    boi = processor.tokenizer.convert_tokens_to_ids("<begin_of_image>")
    assert loaded.generation_config.generation_kwargs["boi_token_id"] == boi
    assert loaded.generation_config.pad_token_id == processor.tokenizer.pad_token_id
