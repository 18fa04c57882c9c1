"""DeepSeek's release layout both ways (``janus_train.model.deepseek_format``): an export has
exactly the keys and shapes DeepSeek's modules declare (``fixtures/deepseek_tiny_keys.json``,
made from DeepSeek's classes by ``fixtures/make_deepseek_keys.py``); HF -> DeepSeek -> HF is
bitwise, and so is the forward; a DeepSeek-layout directory is detected and converted as
``model.init_from``, and trains a stage; anything else is a one-line error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from janus_train.model import JanusTrainModel
from janus_train.model import deepseek_format as F
from tests.conftest import tiny_run
from tests.helpers import mixed_batch

FIXTURE = Path(__file__).parent / "fixtures" / "deepseek_tiny_keys.json"


@pytest.fixture(scope="module")
def dirs(tiny_model_and_processor, tmp_path_factory):
    """An HF-format tiny directory, its DeepSeek export and that export converted back."""
    model, processor = tiny_model_and_processor
    root = tmp_path_factory.mktemp("dsfmt")
    hf = root / "hf"
    model.save_pretrained(hf)
    processor.save_pretrained(hf)
    ds = F.export_deepseek(hf, root / "deepseek")
    back = F.convert_checkpoint(ds, root / "back")
    return hf, ds, back


def test_export_has_the_keys_deepseeks_modules_declare(dirs):
    _, ds, _ = dirs
    want = json.loads(FIXTURE.read_text())
    assert "deepseek-ai/Janus" in want["source"]
    got = {k: list(v.shape) for k, v in F.load_state(ds).items()}
    assert got == want["keys"]
    cfg = json.loads((ds / "config.json").read_text())
    assert cfg["model_type"] == "multi_modality" and cfg["architectures"] == [
        "MultiModalityCausalLM"
    ]
    assert cfg["vision_config"]["params"]["model_name"] == "siglip_large_patch16_384"
    assert (
        cfg["gen_vision_config"]["cls"] == "VQ-16"
        and cfg["gen_head_config"]["cls"] == "vision_head"
    )
    assert cfg["language_config"]["num_hidden_layers"] == 2
    pre = json.loads((ds / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "VLMImageProcessor" and pre["image_size"] == 32
    assert (ds / "tokenizer.json").is_file() and F.layout_of(ds) == "deepseek"
    proc = json.loads((ds / "processor_config.json").read_text())
    assert proc["sft_format"] == "deepseek" and proc["num_image_tokens"] == 16


def test_round_trip_is_bitwise_and_so_is_the_forward(dirs, tiny_model_and_processor):
    from transformers import JanusForConditionalGeneration

    hf, ds, back = dirs
    a, b = F.load_state(hf), F.load_state(back)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    # independent of the mapping code: the q/k/v rows of DeepSeek's fused qkv, in that order
    qkv = F.load_state(ds)["vision_model.vision_tower.blocks.1.attn.qkv.weight"]
    p = "model.vision_model.encoder.layers.1.self_attn."
    assert torch.equal(
        qkv, torch.cat([a[p + "q_proj.weight"], a[p + "k_proj.weight"], a[p + "v_proj.weight"]])
    )
    m1 = JanusForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).eval()
    m2 = JanusForConditionalGeneration.from_pretrained(back, dtype=torch.float32).eval()
    assert m1.config.to_diff_dict()["text_config"] == m2.config.to_diff_dict()["text_config"]
    batch = mixed_batch(m1, tiny_model_and_processor[1].tokenizer)
    with torch.no_grad():
        o1, o2 = JanusTrainModel(m1)(dict(batch)), JanusTrainModel(m2)(dict(batch))
    assert torch.equal(o1["loss_sum"], o2["loss_sum"]) and float(o1["n_tokens"].sum()) > 0


def test_init_from_accepts_deepseek_layout_and_refuses_the_unknown(dirs, tmp_path, monkeypatch):
    from janus_train.model import build_model
    from janus_train.model.build import check_init_from

    hf, ds, _ = dirs
    monkeypatch.setenv("JANUS_CONVERT_CACHE", str(tmp_path / "cache"))
    run = tiny_run([f"model.init_from={ds}", "model.tokenizer=null"])
    check_init_from(run.model)
    model, _ = build_model(run.model, workdir=tmp_path)
    want = F.load_state(hf)
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    assert len(list((tmp_path / "cache").iterdir())) == 1  # converted once, then reused
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text('{"model_type": "llava"}')
    shutil.copy(hf / "model.safetensors", odd / "model.safetensors")
    (odd / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="model.init_from: .*neither an HF-format") as e:
        check_init_from(tiny_run([f"model.init_from={odd}", "model.tokenizer=null"]).model)
    assert "\n" not in str(e.value)


def test_cli_commands_and_one_line_errors(dirs, tmp_path, monkeypatch, capsys):
    from janus_train.cli.data import main

    hf, ds, _ = dirs
    monkeypatch.setenv("JANUS_CONVERT_CACHE", str(tmp_path / "cache"))
    main(["export-deepseek", str(hf), "--out", str(tmp_path / "ds")])
    assert F.load_state(tmp_path / "ds").keys() == F.load_state(ds).keys()
    main(["convert-checkpoint", str(tmp_path / "ds")])  # into the cache model.init_from uses
    assert F.layout_of(F.cache_dir_for(tmp_path / "ds")) == "hf"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["convert-checkpoint", str(hf)])  # an HF directory is not DeepSeek's layout
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "not in DeepSeek's release layout" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("exp", ["janus_pro_1b", "janus_pro_7b"])  # Janus 1.3B: Pro-1B's dims
def test_real_dimensions_write_deepseeks_own_config_and_map_every_key(
    exp, tiny_model_and_processor
):
    """The released models' dimensions: the DeepSeek config carries only DeepSeek's own fields
    (SigLIP-L and VQ-16 by name, nothing extra), reads back to the same architecture, and every
    key of the full-size model (meta) maps to a distinct DeepSeek key and back."""
    from transformers import JanusForConditionalGeneration

    from janus_train.config import compose, to_run_config
    from janus_train.model.build import build_janus_config

    run = to_run_config(compose([f"experiment={exp}"]))
    jcfg = build_janus_config(run.model, tiny_model_and_processor[1].tokenizer)
    ds = F.deepseek_config_from_hf(jcfg)
    assert ds["vision_config"]["params"] == {
        "image_size": 384,
        "model_name": "siglip_large_patch16_384",
        "select_feature": "same",
        "select_layer": -1,
    }
    assert ds["gen_vision_config"]["params"] == {"image_token_size": 16384, "n_embed": 8}
    assert ds["language_config"]["hidden_size"] == run.model.text.hidden_size
    back = F.hf_config_from_deepseek(ds, tiny_model_and_processor[1].tokenizer)
    for sub in ("text_config", "vision_config", "vq_config"):
        a, b = getattr(jcfg, sub).to_dict(), getattr(back, sub).to_dict()
        assert {k: a[k] for k in a if k != "transformers_version"} == {
            k: b[k] for k in a if k != "transformers_version"
        }, sub
    with torch.device("meta"):
        keys = list(JanusForConditionalGeneration(jcfg).state_dict())
    ds_keys = {F.hf_key_to_ds(k) for k in keys}
    qkv = [k for k in ds_keys if k.endswith("attn.qkv.weight")]
    assert len(qkv) == 24 and len(ds_keys) == len(keys) - 2 * 24 * 2  # q,k,v -> qkv
    assert {F.ds_key_to_hf(k).replace(".qkv.", ".q_proj.") for k in ds_keys} <= set(keys)


def test_sft_format_follows_the_trained_roles():
    """``processor_config.json``'s ``sft_format``: DeepSeek's conversation template with the
    export's roles (``janus/utils/conversation.py``: deepseek_old = User/Assistant)."""
    from types import SimpleNamespace

    from janus_train.model.chat_template import PromptFormat

    def fmt(*a):
        return F._sft_format(SimpleNamespace(chat_template=PromptFormat(*a).jinja()))

    assert fmt("chat", "janus") == "deepseek_old"
    assert fmt("chat", "janus_pro") == "deepseek"
    assert fmt("qa", "janus", None, "plain") == "deepseek"  # no roles: DeepSeek's default
