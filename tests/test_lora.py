"""LoRA (``model.lora``) on the tiny model, one process: which parameters change, the merged
HF export against the adapted model, the peft-layout adapter loaded by peft itself, packing,
config errors naming the field, and the shipped LoRA experiments.

Multi-process coverage (ZeRO-1/2/3 runs, the gradient-equivalence test with adapters, resume
after SIGKILL, the ZeRO-3 merged export) lives in tests/test_train_dist.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from janus_train.config import prompt_format
from janus_train.model import JanusTrainModel, apply_freeze, build_model, set_train_mode
from janus_train.model.lora import is_adapter_param, lora_layers
from janus_train.trainer.optim import build_param_groups
from tests.conftest import tiny_run
from tests.helpers import group_of, mixed_batch

STAGE3_LORA = ["stage=stage3", "model.lora.enabled=true", "model.lora.groups=[llm,und_encoder]"]


def _adapted(tmp_path, extra=()):
    run = tiny_run([*STAGE3_LORA, *extra])
    model, proc = build_model(run.model, workdir=tmp_path)
    report = apply_freeze(model, run.trainable_groups, run.model.lora)
    return run, model, proc, report


def _train(model, run, batch, steps=3, lr=1e-2):
    """A few AdamW steps of the training forward, frozen groups in eval mode as in training."""
    tm = JanusTrainModel(model)
    opt = torch.optim.AdamW(build_param_groups(tm, 0.0), lr=lr, betas=(0.9, 0.95))
    set_train_mode(model, run.trainable_groups)
    for _ in range(steps):
        out = tm(batch)
        loss = out["loss_sum"].sum() / out["n_tokens"].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_only_adapters_and_fully_trained_groups_change(tmp_path):
    run, model, proc, report = _adapted(tmp_path)
    batch = mixed_batch(model, proc.tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, run, batch)
    after = model.state_dict()
    full = {"und_adaptor", "gen_adaptor", "gen_head"}  # stage 3's trainable minus the LoRA groups
    adapters = [k for k in after if is_adapter_param(k)]
    assert adapters and all(group_of(k) in {"llm", "und_encoder"} for k in adapters)
    for k in after:
        changed = not torch.equal(before[k], after[k])
        if is_adapter_param(k):
            assert changed, k
        elif group_of(k) in full and k.endswith("weight"):
            assert changed, k
        elif group_of(k) not in full:  # LoRA groups' base weights, norms; VQ; code embeddings
            assert not changed, k
    # the report counts adapters as trainable, per group
    n_adapter = sum(after[k].numel() for k in adapters)
    assert sum(g["adapter"] for g in report.values()) == n_adapter
    assert report["llm"]["trainable"] == report["llm"]["adapter"] > 0
    assert report["gen_head"]["adapter"] == 0 and report["gen_head"]["frozen"] == 0
    assert report["vq"]["trainable"] == 0
    # every Linear the defaults name in the LoRA groups is adapted; nothing outside them
    names = set(lora_layers(model))
    assert "model.language_model.layers.0.mlp.down_proj" in names
    assert "model.vision_model.encoder.layers.1.self_attn.projection_layer" in names
    assert not any(n.startswith(("lm_head", "model.vqmodel", "model.aligner")) for n in names)


def test_freeze_with_lora_is_idempotent(tmp_path):
    run, model, _, report = _adapted(tmp_path)
    n = len(lora_layers(model))
    again = apply_freeze(model, run.trainable_groups, run.model.lora)
    assert len(lora_layers(model)) == n and again == report


def test_adapter_init_is_seeded_not_global_rng(tmp_path):
    torch.manual_seed(1)
    _, a, _, _ = _adapted(tmp_path)
    torch.manual_seed(2)
    _, b, _, _ = _adapted(tmp_path)
    _, c, _, _ = _adapted(tmp_path, ["model.lora.seed=5"])
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    keys = [k for k in sa if ".lora_A." in k]
    assert all(torch.equal(sa[k], sb[k]) for k in keys)  # ranks build the same adapters
    assert any(not torch.equal(sa[k], sc[k]) for k in keys)


def _logits(model, batch):
    """Text logits over every position and image-head logits on the hidden states, eval mode:
    the plain HF modules, no project code."""
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            output_hidden_states=True,
        )
        return out.logits, model.model.generation_head(out.hidden_states[-1])


def test_merged_export_equals_adapted_model_and_adapter_loads_in_peft(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import JanusForConditionalGeneration

    from janus_train.trainer.distributed import DistInfo
    from janus_train.trainer.export import export_hf

    run, model, proc, _ = _adapted(tmp_path, ["model.lora.dropout=0.1"])
    batch = mixed_batch(model, proc.tokenizer)
    _train(model, run, batch)
    batch = {k: v for k, v in batch.items() if k != "position_ids"}
    want_text, want_img = _logits(model, batch)

    out = export_hf(model, proc, tmp_path / "run" / "hf", 0, DistInfo(0, 1, 0), step=3)
    merged = JanusForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()
    assert not any("lora" in type(m).__name__.lower() for m in merged.modules())
    plain, _ = build_model(run.model, workdir=tmp_path)
    assert load_file(str(out / "model.safetensors")).keys() == plain.state_dict().keys()
    got_text, got_img = _logits(merged, batch)
    assert want_text.abs().max() > 1e-2
    torch.testing.assert_close(got_text, want_text, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_img, want_img, rtol=0, atol=1e-5)
    # the merge is not a no-op: the untrained base gives other logits
    assert (_logits(plain.eval(), batch)[0] - want_text).abs().max() > 1e-3

    # adapter/ beside hf/: peft rebuilds the trained model from the untrained base
    adir = tmp_path / "run" / "adapter"
    cfg = json.loads((adir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == run.model.lora.r
    assert sorted(cfg["modules_to_save"]) == sorted(
        ["model.aligner", "model.generation_aligner", "model.generation_head"]
    )
    peft_model = PeftModel.from_pretrained(plain, str(adir)).eval()
    got_text, got_img = _logits(peft_model.base_model.model, batch)
    torch.testing.assert_close(got_text, want_text, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_img, want_img, rtol=0, atol=1e-5)


def test_export_without_lora_writes_no_adapter(tmp_path, fresh_tiny_model):
    from janus_train.trainer.distributed import DistInfo
    from janus_train.trainer.export import export_hf

    model, proc = fresh_tiny_model
    apply_freeze(model, ["gen_head"])
    export_hf(model, proc, tmp_path / "hf", 0, DistInfo(0, 1, 0), step=1)
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert not (tmp_path / "adapter").exists()


def test_packed_rows_with_adapters(tmp_path):
    """The packing contract holds with adapters in the LLM (random B: adapters are active)."""
    from janus_train.model import resolve_special_tokens
    from tests.helpers import check_packed_row_equals_samples_alone

    _, model, proc, _ = _adapted(tmp_path, ["model.lora.init=random", "model.lora.dropout=0"])
    model.eval()
    tok = proc.tokenizer
    check_packed_row_equals_samples_alone((model, tok, resolve_special_tokens(tok)))


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["stage=stage1", "model.lora.groups=[llm]"], "model.lora.groups"),  # llm frozen
        (["stage=stage3", "model.lora.groups=[vq]"], "model.lora.groups"),
        (["stage=stage3", "model.lora.groups=[gen_embeddings]"], "model.lora.groups"),
        (["stage=stage3", "model.lora.groups=[]"], "model.lora.groups"),
        (
            ["stage=stage3", "+model.lora.target_modules.gen_head=[proj_out]"],
            "model.lora.target_modules.gen_head",
        ),  # not in groups
        (["stage=stage3", "model.lora.r=0"], "model.lora.r"),
        (["stage=stage3", "model.lora.dropout=1.0"], "model.lora.dropout"),
        (["stage=stage3", "model.lora.init=zeros"], "model.lora.init"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        tiny_run(["model.lora.enabled=true", *overrides])


@pytest.mark.parametrize(
    "targets,match",
    [
        ("[q_proj,nope]", r"\['nope'\] match no Linear"),
        ("[patch_embedding]", "Conv2d; adapters go on Linear"),
    ],
)
def test_bad_target_modules_name_the_field(tmp_path, targets, match):
    extra = ["model.lora.groups=[und_encoder]", f"+model.lora.target_modules.und_encoder={targets}"]
    with pytest.raises(ValueError, match=r"model\.lora\.target_modules\.und_encoder: .*" + match):
        _adapted(tmp_path, extra)


def test_disabled_lora_changes_nothing(fresh_tiny_model):
    model, _ = fresh_tiny_model
    run = tiny_run(["stage=stage3"])
    assert not run.model.lora.enabled
    report = apply_freeze(model, run.trainable_groups, run.model.lora)
    assert not lora_layers(model) and "adapter" not in report["llm"]


@pytest.mark.parametrize(
    "exp,model,batch",
    [
        ("janus_pro_7b_lora_sft", "janus_pro_7b", 64),
        ("janus_pro_7b_lora_sft_1gpu", "janus_pro_7b", 16),
        ("janus_pro_1b_lora_sft", "janus_pro_1b", 64),
    ],
)
def test_shipped_lora_experiments_compose(exp, model, batch, monkeypatch, tmp_path):
    from janus_train.config import compose, to_run_config
    from janus_train.data.recipe import load_recipe

    run = to_run_config(compose([f"experiment={exp}"]))  # stage 3 without naming it
    assert (run.experiment.name, run.model.name, run.stage.name) == (exp, model, "stage3")
    assert run.stage.sft and prompt_format(run).style == "chat"
    hp = run.hparams
    assert (hp.ratio.und, hp.ratio.text, hp.ratio.gen) == (5, 1, 4)  # the paper's stage 3
    assert hp.global_batch_size == batch and run.train.tokens_per_micro == 4096
    assert run.model.lora.enabled and set(run.model.lora.groups) == {"llm", "und_encoder"}
    assert set(run.trainable_groups) - set(run.model.lora.groups) == {
        "und_adaptor",
        "gen_adaptor",
        "gen_head",
    }
    assert run.model.init_from.endswith(
        {"janus_pro_7b": "Janus-Pro-7B", "janus_pro_1b": "Janus-Pro-1B"}[model]
    )
    assert run.model.gradient_checkpointing
    # shard names as the converters write them by default (janus-data convert llava/text/captions)
    for sub in ("llava", "text", "captions"):
        (tmp_path / "finetune" / sub).mkdir(parents=True)
        (tmp_path / "finetune" / sub / f"{sub}-000000.tar").touch()
    monkeypatch.setenv("JANUS_DATA_ROOT", str(tmp_path))
    recipe = load_recipe(hp.data_recipe)
    assert {s.task for s in recipe.sources} == {"understanding", "text", "generation"}


def test_memory_estimate_counts_adapters_by_arithmetic(capsys):
    """benchmarks/lora_memory.py on Janus-Pro-1B (meta device): the adapter count equals
    r x (in + out) summed over the layers the defaults name, computed here from the dimensions."""
    import importlib.util
    import re

    from janus_train.config import CONF_DIR

    path = CONF_DIR.parent / "benchmarks" / "lora_memory.py"
    spec = importlib.util.spec_from_file_location("lora_memory", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["experiment=janus_pro_1b_lora_sft"])
    out = capsys.readouterr().out
    adapters = int(re.search(r"of which ([\d,]+) in adapters", out).group(1).replace(",", ""))
    r, d, ff, layers = 32, 2048, 5632, 24  # Janus-Pro-1B LLM (spec §1)
    dv, vlayers = 1024, 24  # SigLIP-L: q, k, v, projection (dv -> dv), fc1 / fc2 (dv <-> 4 dv)
    llm = layers * r * (4 * (d + d) + 2 * (d + ff) + (ff + d))
    siglip = vlayers * r * (4 * (dv + dv) + 2 * (dv + 4 * dv))
    assert adapters == llm + siglip
    assert "| **total** |" in out


def test_demo_lora_script_needs_the_stage2_export(tmp_path):
    import subprocess

    from janus_train.config import CONF_DIR

    script = CONF_DIR.parent / "launch" / "demo_lora.sh"
    res = subprocess.run(
        ["bash", str(script)],
        env={"DEMO_OUT": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "runs/tiny/stage2/hf" in res.stderr


def test_planner_counts_adapters_and_7b_fits_one_80gb_gpu(capsys):
    """janus-plan: LoRA groups' weights count as frozen, adapters as trainable (equal to the
    parameters peft injects into a meta build, counted by apply_freeze); the shipped one-GPU
    7B experiment is feasible on an 80 GB GPU."""
    import torch
    from transformers import JanusForConditionalGeneration

    from janus_train.cli import plan as cli
    from janus_train.config import compose, to_run_config
    from janus_train.model.build import build_janus_config
    from janus_train.plan.costs import _VocabOnly
    from tests.helpers import stage_shape_of

    run = to_run_config(compose(["experiment=janus_pro_1b_lora_sft"]))
    with torch.device("meta"):
        janus = JanusForConditionalGeneration(
            build_janus_config(run.model, _VocabOnly(run.model.text.vocab_size))
        )
    report = apply_freeze(janus, run.trainable_groups, run.model.lora)
    shape = stage_shape_of(run)
    assert shape.trainable == sum(g["trainable"] for g in report.values())
    assert shape.frozen + shape.vq == sum(g["frozen"] for g in report.values())  # VQ: own row

    argv = [
        "experiment=janus_pro_7b_lora_sft_1gpu",
        "stage=stage3",
        "nodes=1",
        "gpus_per_node=1",
        "gpu=a100-80gb",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "recommended: nodes=1 deepspeed=" in out, out
