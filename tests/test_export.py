"""The export as a complete Hugging Face model repo: sharded safetensors that load back to the
same weights, the processor and tokenizer with the run's chat template, a model card whose
figures come from metrics.jsonl and whose usage code runs as written against the export."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from janus_train.config import prompt_format, resolve_stage
from janus_train.model.chat_template import set_chat_template
from janus_train.trainer.distributed import DistInfo
from janus_train.trainer.export import export_hf, is_exported
from janus_train.trainer.model_card import MODEL_DIR, model_card, read_metrics
from tests.conftest import tiny_run

SYSTEM = "You are a helpful language and vision assistant."
METRICS = [
    {"step": 5, "loss": 3.5, "loss/und": 3.25, "loss/gen": 4.0, "optim/lr": 1e-3},
    {"step": 6, "eval/loss/und": 2.5, "eval/und/accuracy": 0.75},
    {"step": 7, "loss": 2.123456, "loss/und": 1.5, "loss/gen": 2.75, "optim/lr": 1e-3},
]


@pytest.fixture(scope="module")
def exported(tiny_model_and_processor, tmp_path_factory):
    janus, processor = tiny_model_and_processor
    processor = copy.deepcopy(processor)
    root = tmp_path_factory.mktemp("run")
    run = tiny_run(
        [
            f"train.run_dir={root}",
            "stage=stage3",
            f"data.system_prompt={SYSTEM}",
            "experiment.stage3.lr=3e-05",
            "experiment.stage3.global_batch_size=8",
            "train.micro_batch_size=2",
        ]
    )
    set_chat_template(processor, prompt_format(run))
    (root / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in METRICS) + "\n{trunc")
    spec = resolve_stage(run, 2, with_recipe=True, check_shards=False)
    card = model_card(
        spec,
        processor,
        7,
        model=run.model,
        deepspeed=run.deepspeed,
        loss_reduction=run.train.loss_reduction,
        seq_len=run.data.seq_len,
        metrics_path=root / "metrics.jsonl",
    )
    total = sum(t.numel() * 4 for t in janus.state_dict().values())
    out = export_hf(
        janus,
        processor,
        root / "hf",
        zero_stage=0,
        info=DistInfo(0, 1, 0),
        step=7,
        max_shard_size=f"{total // 3 // 1000}KB",
        model_card=card,
    )
    return janus, run, out


def test_sharded_safetensors_load_back_to_the_same_weights(exported):
    from transformers import JanusForConditionalGeneration

    janus, _, out = exported
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert is_exported(out, 7) and not is_exported(out, 6)
    loaded = JanusForConditionalGeneration.from_pretrained(out, local_files_only=True)
    want, got = janus.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_every_shard_within_max_shard_size(exported):
    """``export_max_shard_size`` bounds each shard's tensor bytes (HF's rule: "KB" = 1000
    bytes; only a single tensor larger than the limit may exceed it, alone in its shard)."""
    from safetensors import safe_open

    janus, _, out = exported
    total = sum(t.numel() * 4 for t in janus.state_dict().values())
    limit = total // 3 // 1000 * 1000  # the fixture's max_shard_size, in bytes
    sizes = []
    for shard in sorted(out.glob("model-*-of-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            nbytes = [f.get_tensor(k).nbytes for k in f.keys()]  # noqa: SIM118
        sizes.append(sum(nbytes))
        assert sum(nbytes) <= limit or len(nbytes) == 1, (shard.name, sum(nbytes), limit)
    assert sum(sizes) == total and len(sizes) >= 3


def test_processor_and_tokenizer_carry_the_runs_chat_template(exported):
    from transformers import AutoTokenizer, JanusProcessor

    _, run, out = exported
    want = prompt_format(run).jinja()
    proc = JanusProcessor.from_pretrained(out, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert proc.chat_template == tok.chat_template == want
    assert not proc.use_default_system_prompt  # the template renders the system prompt
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == f"{SYSTEM}\n\n<|User|>: hi\n\n<|Assistant|>:"


def test_model_card_figures_and_format(exported):
    _, run, out = exported
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "# tiny — stage3 (step 7)" in card
    assert "random initialisation (`model=tiny`)" in card
    assert "| steps | 7 of " in card
    assert "8 samples per step over 2 GPUs, micro-batches packed to at most 4096 tokens" in card
    assert "lr 3e-05" in card
    recipe = run.hparams.data_recipe
    assert f"Data recipe `{recipe}`" in card and "| understanding |" in card
    # the last training record and the last held-out record, not earlier ones
    assert "Training, step 7" in card and "| `loss` | 2.123 |" in card
    assert "| `loss/gen` | 2.75 |" in card and "3.5" not in card
    assert "Held-out evaluation, step 6" in card and "| `eval/und/accuracy` | 0.75 |" in card
    assert f"{SYSTEM}\n\n<|User|>: <image_placeholder>\nWhat is it?\n\n<|Assistant|>:" in card
    assert "<|User|>: a red circle at the top left.\n\n<|Assistant|>:<begin_of_image>" in card
    assert read_metrics(out / "missing.jsonl") == (None, None)


def test_model_card_usage_code_runs_against_the_export(exported, tmp_path, monkeypatch):
    """The card's "how to load" is executed as written (path substituted): understanding and
    text-to-image with plain transformers."""
    _, _, out = exported
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    assert MODEL_DIR in code
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (48, 40), (200, 30, 30)).save("image.png")
    exec(compile(code.replace(MODEL_DIR, str(out)), "README.md", "exec"), {})
    assert Image.open("generated.png").size == (32, 32)


def test_bad_shard_size_fails_at_config_time():
    with pytest.raises(ValueError, match="train.export_max_shard_size='big'"):
        tiny_run(["train.export_max_shard_size=big"])


@pytest.mark.slow
def test_a_run_saves_its_processor_and_exports_card_and_template(
    tmp_path, tiny_model_and_processor
):
    """janus-train wiring: run_dir/processor at the start, hf/ with README.md and the template,
    every shard within train.export_max_shard_size, weights in train.export_dtype (the VQ's
    fp32). The run starts from a checkpoint in
    DeepSeek's release layout (``model.init_from``, converted on first use), and its export
    goes back to that layout and returns bitwise."""
    from safetensors import safe_open

    from janus_train.model import deepseek_format as F

    model, processor = tiny_model_and_processor
    model = copy.deepcopy(model)
    with torch.no_grad():  # unlike any random init: the VQ stays frozen, so it must come out
        model.model.vqmodel.quant_conv.weight.add_(1.0)
    model.save_pretrained(tmp_path / "hf0")
    processor.save_pretrained(tmp_path / "hf0")
    ds = F.export_deepseek(tmp_path / "hf0", tmp_path / "deepseek")
    run_dir = tmp_path / "run"  # fixed micro-batches here: the card's other batch wording
    cmd = [
        sys.executable,
        "-m",
        "janus_train.train",
        "experiment=tiny",
        "model=tiny",
        "stage=stage2",
        "train.synthetic_data=true",
        "experiment.stage2.steps=1",
        "experiment.stage2.global_batch_size=1",
        f"train.run_dir={run_dir}",
        "train.log_every=1",
        "train.export_max_shard_size=2MB",
        "train.export_dtype=bf16",  # janus-train passes it to the export (an fp32 run here)
        "train.progress_bar=false",
        "train.tokens_per_micro=0",
        f"model.init_from={ds}",
        "model.tokenizer=null",
        "experiment.stage2.warmup_steps=0",  # the one step moves the weights
    ]
    env = {**os.environ, "JANUS_CONVERT_CACHE": str(tmp_path / "cache")}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    (converted,) = (tmp_path / "cache").iterdir()
    start, end = F.load_state(converted), F.load_state(run_dir / "hf")
    init = F.load_state(tmp_path / "hf0")
    assert start.keys() == init.keys() and all(torch.equal(v, init[k]) for k, v in start.items())
    llm = [k for k in start if k.startswith("model.language_model.layers.")]
    assert {end[k].dtype for k in llm} == {torch.bfloat16}
    assert any(not torch.equal(start[k].bfloat16(), end[k]) for k in llm)  # the LLM trained
    q = "model.vqmodel.quant_conv.weight"
    assert torch.equal(end[q], init[q])
    back = F.convert_checkpoint(F.export_deepseek(run_dir / "hf", tmp_path / "ds2"), tmp_path / "b")
    back = F.load_state(back)
    assert back.keys() == end.keys() and all(torch.equal(v, end[k]) for k, v in back.items())
    want = prompt_format(tiny_run(["stage=stage2"])).jinja()
    for d in (run_dir / "processor", run_dir / "hf"):
        assert (d / "chat_template.jinja").read_text() == want
    shards = list((run_dir / "hf").glob("model-*.safetensors"))
    assert len(shards) > 1
    for shard in shards:  # export_max_shard_size=2MB: HF's MB is 10**6 bytes of tensors
        with safe_open(str(shard), "pt") as f:
            nbytes = [f.get_tensor(k).nbytes for k in f.keys()]  # noqa: SIM118
        assert sum(nbytes) <= 2 * 10**6 or len(nbytes) == 1, (shard.name, sum(nbytes))
    card = (run_dir / "hf" / "README.md").read_text()
    assert "# tiny — stage2 (step 1)" in card and "Synthetic batches" in card
    assert "1 samples per step over 1 GPUs, 1 per GPU x 1 accumulation" in card
    assert "; exported in bfloat16 (the VQ in fp32) |" in card  # the files' dtype, not the run's


@pytest.mark.slow
def test_demo_report_asks_the_export_with_plain_transformers(
    tiny_model_and_processor, tmp_path, monkeypatch
):
    """The demo report's final evaluation scores the held-out questions with janus-sample and
    again with plain transformers + the export's template: the same answers."""
    from janus_demo import synth
    from janus_demo.report import final_eval

    small = dict(n_caption=4, n_conversation=4, n_chat=2, n_text=2, n_imagenet=4, n_heldout=8)
    synth.synthesize(synth.SynthConfig(out=str(tmp_path / "data"), **small))
    monkeypatch.setenv("JANUS_EVAL_DATA_ROOT", str(tmp_path / "data" / "heldout"))
    janus, processor = tiny_model_and_processor
    processor = copy.deepcopy(processor)
    set_chat_template(processor, prompt_format(tiny_run(["stage=stage3"])))
    export = tmp_path / "hf"
    janus.save_pretrained(export)
    processor.save_pretrained(export)
    res = final_eval(export, tmp_path / "final_eval", n_und=6, n_gen=1, guidance=1.0)
    assert res["und/same_answers_as_janus_sample"] == 1.0
    assert res["und/accuracy_plain_transformers"] == res["und/accuracy"]


@pytest.mark.parametrize(
    "module_dtype,choice,want",
    [
        (torch.bfloat16, "auto", torch.bfloat16),  # a bf16 run's default: as trained
        (torch.bfloat16, "fp32", torch.float32),
        (torch.float32, "bf16", torch.bfloat16),
    ],
)
def test_export_dtype(tiny_model_and_processor, tmp_path, module_dtype, choice, want):
    """``train.export_dtype``: every floating tensor of the safetensors files in the chosen dtype
    (``auto``: the module's, i.e. the training dtype), equal to the module's weights cast to it,
    except the VQ, fp32 and bitwise as built (held outside the engine as the trainer does);
    config.json records the dtype, and ``from_pretrained`` on the directory loads in it."""
    from safetensors.torch import load_file
    from transformers import JanusForConditionalGeneration

    from janus_train.model.vq_codes import detach_vq

    janus, processor = tiny_model_and_processor
    model = copy.deepcopy(janus)
    detach_vq(model)
    model.to(module_dtype)  # as DeepSpeed casts the engine's module
    out = export_hf(model, processor, tmp_path / "hf", 0, DistInfo(0, 1, 0), step=1, dtype=choice)
    files = load_file(str(out / "model.safetensors"))
    ref, mod = janus.state_dict(), model.state_dict()
    vq = [k for k in files if k.startswith("model.vqmodel.")]
    rest = [k for k in files if k not in vq and files[k].is_floating_point()]
    assert vq and rest and set(files) == set(ref)
    assert all(files[k].dtype == torch.float32 and torch.equal(files[k], ref[k]) for k in vq)
    assert all(files[k].dtype == want and torch.equal(files[k], mod[k].to(want)) for k in rest)
    name = str(want).removeprefix("torch.")
    assert json.loads((out / "config.json").read_text())["dtype"] == name
    loaded = JanusForConditionalGeneration.from_pretrained(out, local_files_only=True)
    assert loaded.lm_head.weight.dtype == want
    assert torch.equal(loaded.lm_head.weight, files["lm_head.weight"])


def test_bad_export_dtype_fails_at_config_time():
    with pytest.raises(ValueError, match="train.export_dtype='fp16'"):
        tiny_run(["train.export_dtype=fp16"])
