"""DeepSeek's release layout both ways: ``MultiModalityCausalLM`` directories (``deepseek-ai/Janus-*``
on the Hub; ``janus/models/modeling_vlm.py`` of github.com/deepseek-ai/Janus) <-> HF-format
``JanusForConditionalGeneration`` directories, the format everything else here reads and writes.

Module names (DeepSeek -> HF; derived from DeepSeek's modules and transformers'
``convert_janus_weights_to_hf.py``)::

    vision_model.vision_tower.            SigLIP (timm ViT)   model.vision_model.
      patch_embed.proj / pos_embed (1,N,D)                      embeddings.patch_embedding / position_embedding.weight (N,D)
      blocks.i.{norm1,norm2,mlp.fc1,mlp.fc2,attn.proj}          encoder.layers.i.{layer_norm1,layer_norm2,mlp.fc1,mlp.fc2,self_attn.projection_layer}
      blocks.i.attn.qkv (3D rows)                               encoder.layers.i.self_attn.{q,k,v}_proj
      norm                                                      post_layernorm
      attn_pool.*  (unused: DeepSeek builds the tower with ignore_head=True; dropped, exported as zeros)
    aligner.layers.{0,2,4..}              MlpProjector        model.aligner.{fc1,hidden_layers.0,1..}
    gen_vision_model.                     VQ-16               model.vqmodel.
      {encoder,decoder}.conv_blocks.i.res.j / mid.{0,1,2}       encoder.down / decoder.up .i.block.j / mid.{block_1,attn_1,block_2}
      quantize.codebook_used (usage counter buffer; dropped, exported as zeros)
    gen_aligner.layers.{0,2,..}                               model.generation_aligner.{fc1,hidden_layers.0,..}
    gen_head.{output_mlp_projector,vision_head}               model.generation_head.{proj_out,vision_head}
    gen_embed                                                 model.generation_embeddings
    language_model.model. / language_model.lm_head            model.language_model. / lm_head

DeepSeek's code fixes SigLIP-Large and VQ-16 by name (``siglip_large_patch16_384``,
``VQ-16``); other dimensions (the tiny model) are written as extra ``params`` keys, which
DeepSeek's constructors ignore, and read back here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from janus_train.batch import IGNORE

SIGLIP = "siglip_large_patch16_384"
SIGLIP_DIMS = {"width": 1024, "layers": 24, "heads": 16, "patch_size": 16, "mlp_ratio": 4.0}
VQ16_DIMS = {
    "base_channels": 128,
    "channel_multiplier": [1, 1, 2, 2, 4],
    "num_res_blocks": 2,
    "latent_channels": 256,
}
CODEBOOK_USED = 65536
"""Length of DeepSeek's ``VectorQuantizer.codebook_used`` buffer (``vq_model.py``)."""
_VT, _HV = "vision_model.vision_tower.", "model.vision_model."
_VQ_RENAMES = [  # (DeepSeek, HF) inside the VQ
    (r"^encoder\.conv_blocks\.", "encoder.down."),
    (r"^decoder\.conv_blocks\.", "decoder.up."),
    (r"\.res\.", ".block."),
    (r"\.mid\.0\.", ".mid.block_1."),
    (r"\.mid\.1\.", ".mid.attn_1."),
    (r"\.mid\.2\.", ".mid.block_2."),
]
_VQ_RENAMES_BACK = [
    (r"^encoder\.down\.", "encoder.conv_blocks."),
    (r"^decoder\.up\.", "decoder.conv_blocks."),
    (r"\.block\.", ".res."),
    (r"\.mid\.block_1\.", ".mid.0."),
    (r"\.mid\.attn_1\.", ".mid.1."),
    (r"\.mid\.block_2\.", ".mid.2."),
]
_VISION = [  # (DeepSeek suffix of _VT, HF suffix of _HV); {i} a layer index, {p} weight | bias
    ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),
    ("pos_embed", "embeddings.position_embedding.weight"),
    ("blocks.{i}.norm1.{p}", "encoder.layers.{i}.layer_norm1.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layers.{i}.layer_norm2.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layers.{i}.self_attn.projection_layer.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layers.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layers.{i}.mlp.fc2.{p}"),
    ("norm.{p}", "post_layernorm.{p}"),
]
_MLPS = [("aligner", "model.aligner"), ("gen_aligner", "model.generation_aligner")]
_PLAIN = [  # whole-prefix renames (DeepSeek, HF)
    ("gen_head.output_mlp_projector.", "model.generation_head.proj_out."),
    ("gen_head.vision_head.", "model.generation_head.vision_head."),
    ("gen_embed.", "model.generation_embeddings."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
]


class UnknownKey(ValueError):
    pass


def _pattern(template: str) -> re.Pattern:
    rx = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>\w+)")
    return re.compile(rx + "$")


def _map(key: str, pairs, src: int) -> str | None:
    for pair in pairs:
        m = _pattern(pair[src]).match(key)
        if m:
            return pair[1 - src].format(**m.groupdict())
    return None


def _mlp_index_to_hf(i: int) -> str:
    if i == 0:
        return "fc1"
    if i % 2:  # odd entries of DeepSeek's Sequential are GELUs: no weights
        raise UnknownKey(f"layers.{i}")
    return f"hidden_layers.{i // 2 - 1}"


def ds_key_to_hf(key: str) -> str | None:
    """DeepSeek key -> HF key (None: a tensor HF does not have). ``attn.qkv`` maps to its q
    projection's name with ``qkv`` kept (split by :func:`deepseek_to_hf_state`)."""
    if key.startswith(_VT):
        rest = key[len(_VT) :]
        if rest.startswith("attn_pool."):
            return None
        m = re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(\w+)", rest)
        if m:
            return f"{_HV}encoder.layers.{m[1]}.self_attn.qkv.{m[2]}"
        hf = _map(rest, _VISION, 0)
        if hf is not None:
            return _HV + hf
    elif key.startswith("gen_vision_model."):
        rest = key[len("gen_vision_model.") :]
        if rest == "quantize.codebook_used":
            return None
        for ds, hf in _VQ_RENAMES:
            rest = re.sub(ds, hf, rest)
        return "model.vqmodel." + rest
    for ds, hf in _MLPS:
        m = re.fullmatch(rf"{ds}\.layers\.(\d+)\.(\w+)", key)
        if m:
            return f"{hf}.{_mlp_index_to_hf(int(m[1]))}.{m[2]}"
    for ds, hf in _PLAIN:
        if key.startswith(ds):
            return hf + key[len(ds) :]
    if key.endswith("rotary_emb.inv_freq"):  # older transformers saved this buffer
        return None
    raise UnknownKey(key)


def hf_key_to_ds(key: str) -> str:
    """HF key -> DeepSeek key (q/k/v projections -> their ``qkv`` key)."""
    if key.startswith(_HV):
        rest = key[len(_HV) :]
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(\w+)", rest)
        if m:
            return f"{_VT}blocks.{m[1]}.attn.qkv.{m[2]}"
        ds = _map(rest, _VISION, 1)
        if ds is not None:
            return _VT + ds
    elif key.startswith("model.vqmodel."):
        rest = key[len("model.vqmodel.") :]
        for hf, ds in _VQ_RENAMES_BACK:
            rest = re.sub(hf, ds, rest)
        return "gen_vision_model." + rest
    for ds, hf in _MLPS:
        m = re.fullmatch(rf"{re.escape(hf)}\.(fc1|hidden_layers\.(\d+))\.(\w+)", key)
        if m:
            i = 0 if m[1] == "fc1" else 2 * (int(m[2]) + 1)
            return f"{ds}.layers.{i}.{m[3]}"
    for ds, hf in _PLAIN:
        if key.startswith(hf):
            return ds + key[len(hf) :]
    raise UnknownKey(key)


def deepseek_to_hf_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DeepSeek state dict as HF ``JanusForConditionalGeneration`` keys and shapes."""
    out = {}
    for k, v in sd.items():
        hf = ds_key_to_hf(k)
        if hf is None:
            continue
        if ".self_attn.qkv." in hf:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[hf.replace(".qkv.", f".{name}.")] = part.clone()
        elif hf.endswith("position_embedding.weight"):
            out[hf] = v.squeeze(0)
        else:
            out[hf] = v
    return out


def hf_to_deepseek_state(sd: dict[str, torch.Tensor], mlp_ratio: float) -> dict[str, torch.Tensor]:
    """An HF state dict in DeepSeek's keys and shapes, with the tensors DeepSeek declares and HF
    lacks (SigLIP's unused attention-pool head, the VQ's usage counter) as zeros."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        ds = hf_key_to_ds(k)
        if ".attn.qkv." in ds:
            qkv.setdefault(ds, {})[k.rsplit(".", 2)[-2]] = v
        elif ds.endswith("pos_embed"):
            out[ds] = v.unsqueeze(0)
        else:
            out[ds] = v
    for ds, parts in qkv.items():
        out[ds] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    d = out[f"{_VT}norm.weight"].shape[0]
    h = int(d * mlp_ratio)
    dtype = out[f"{_VT}norm.weight"].dtype
    pool = {
        "latent": (1, 1, d), "q.weight": (d, d), "q.bias": (d,), "kv.weight": (2 * d, d),
        "kv.bias": (2 * d,), "proj.weight": (d, d), "proj.bias": (d,), "norm.weight": (d,),
        "norm.bias": (d,), "mlp.fc1.weight": (h, d), "mlp.fc1.bias": (h,),
        "mlp.fc2.weight": (d, h), "mlp.fc2.bias": (d,),
    }  # fmt: skip
    for name, shape in pool.items():
        out[f"{_VT}attn_pool.{name}"] = torch.zeros(shape, dtype=dtype)
    out["gen_vision_model.quantize.codebook_used"] = torch.zeros(CODEBOOK_USED)
    return out


# --------------------------------------------------------------------------- directories


def layout_of(path: str | os.PathLike) -> str:
    """``"hf"`` or ``"deepseek"`` from ``config.json`` (``model_type``), else from the weight
    names; anything else is a one-line ``ValueError``."""
    d = Path(path)
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    mt = cfg.get("model_type")
    if mt == "janus":
        return "hf"
    if mt == "multi_modality" or "MultiModalityCausalLM" in cfg.get("architectures", []):
        return "deepseek"
    if mt is not None:
        keys: set[str] = set()
    else:  # no model_type: the weight names decide
        keys = set(_weight_keys(d))
    if any(k.startswith("gen_vision_model.") for k in keys):
        return "deepseek"
    if any(k.startswith("model.vqmodel.") for k in keys):
        return "hf"
    raise ValueError(
        f"{str(d)!r} is neither an HF-format Janus directory (config.json model_type 'janus') "
        f"nor DeepSeek's release layout (model_type 'multi_modality'; model_type here: {mt!r})"
    )


def _weight_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors")) or sorted(d.glob("pytorch_model*.bin"))


def _weight_keys(d: Path) -> list[str]:
    from safetensors import safe_open

    keys = []
    for f in _weight_files(d):
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as fh:
                keys += list(fh.keys())
        else:
            keys += list(torch.load(f, map_location="meta", weights_only=True))
    return keys


def load_state(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = _weight_files(d)
    if not files:
        raise FileNotFoundError(f"{str(d)!r} has no weights (*.safetensors, pytorch_model*.bin)")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            sd.update(load_file(str(f)))
        else:
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
    return sd


def hf_config_from_deepseek(cfg: dict, tokenizer):
    """DeepSeek's ``config.json`` (dict) -> ``JanusConfig`` (special-token ids from the
    tokenizer, as transformers' converter does)."""
    from janus_train.model.config import assemble_janus_config

    try:
        lang, vis = cfg["language_config"], cfg["vision_config"]["params"]
        al, gal = cfg["aligner_config"]["params"], cfg["gen_aligner_config"]["params"]
        gv, gh = cfg["gen_vision_config"]["params"], cfg["gen_head_config"]["params"]
    except KeyError as e:
        raise ValueError(f"DeepSeek config.json lacks {e.args[0]!r}") from None
    if vis.get("model_name", SIGLIP) != SIGLIP or cfg["gen_vision_config"].get("cls") != "VQ-16":
        raise ValueError(
            f"DeepSeek config.json: vision {vis.get('model_name')!r} / gen vision "
            f"{cfg['gen_vision_config'].get('cls')!r}: only {SIGLIP!r} / 'VQ-16' are known"
        )
    sig = {k: vis.get(k, v) for k, v in SIGLIP_DIMS.items()}
    select = int(vis.get("select_layer", -1))
    layers = sig["layers"] + select + 1 if select <= 0 else min(sig["layers"], select)
    text_keys = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
        "rms_norm_eps", "rope_theta",
    )  # fmt: skip
    text = {k: lang[k] for k in text_keys if k in lang}
    image_size = int(vis.get("image_size", 384))
    vision = dict(
        hidden_size=sig["width"],
        num_hidden_layers=layers,
        num_attention_heads=sig["heads"],
        mlp_ratio=float(sig["mlp_ratio"]),
        patch_size=sig["patch_size"],
        image_size=image_size,
        projection_dim=al["n_embed"],
        depth=al.get("depth", 2),
        num_image_tokens=(image_size // sig["patch_size"]) ** 2,
    )
    vq = dict(
        embed_dim=gv["n_embed"],
        num_embeddings=gv["image_token_size"],
        projection_dim=gal["n_embed"],
        num_hidden_layers=gal.get("depth", 2),
        image_token_embed_dim=gh["image_token_embed"],
        **{k: gv.get(k, v) for k, v in VQ16_DIMS.items()},
    )
    return assemble_janus_config(tokenizer, text, vision, vq)


def deepseek_config_from_hf(config) -> dict:
    """``JanusConfig`` -> DeepSeek's ``config.json`` dict (``MultiModalityConfig``)."""
    t, v, q = config.text_config, config.vision_config, config.vq_config
    params = {
        "image_size": v.image_size,
        "model_name": SIGLIP,
        "select_feature": "same",
        "select_layer": -1,
    }
    dims = {
        "width": v.hidden_size,
        "layers": v.num_hidden_layers,
        "heads": v.num_attention_heads,
        "patch_size": v.patch_size,
        "mlp_ratio": float(v.mlp_ratio),
    }
    params.update({k: x for k, x in dims.items() if x != SIGLIP_DIMS[k]})  # only if not SigLIP-L
    gen_vision = {"image_token_size": q.num_embeddings, "n_embed": q.embed_dim}
    vq_dims = {
        "base_channels": q.base_channels,
        "channel_multiplier": list(q.channel_multiplier),
        "num_res_blocks": q.num_res_blocks,
        "latent_channels": q.latent_channels,
    }
    gen_vision.update({k: x for k, x in vq_dims.items() if x != VQ16_DIMS[k]})
    mlp = {"projector_type": "mlp_gelu", "n_embed": t.hidden_size}

    def sub(cls, model_type, p):
        return {"cls": cls, "model_type": model_type, "params": p}

    return {
        "architectures": ["MultiModalityCausalLM"],
        "model_type": "multi_modality",
        "torch_dtype": "bfloat16",
        "vision_config": sub("CLIPVisionTower", "vision", params),
        "aligner_config": sub(
            "MlpProjector", "aligner", {**mlp, "input_dim": v.hidden_size, "depth": v.depth}
        ),
        "gen_vision_config": sub("VQ-16", "gen_vision", gen_vision),
        "gen_aligner_config": sub(
            "MlpProjector",
            "gen_aligner",
            {**mlp, "input_dim": q.embed_dim, "depth": q.num_hidden_layers},
        ),
        "gen_head_config": sub(
            "vision_head",
            "gen_head",
            {
                "n_embed": t.hidden_size,
                "image_token_embed": q.image_token_embed_dim,
                "image_token_size": q.num_embeddings,
            },
        ),
        "language_config": {
            "model_type": "llama",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": (t.rope_parameters or {}).get("rope_theta", 10000.0),
            "torch_dtype": "bfloat16",
        },
    }


IMAGE_TOKENS = {
    "image_token": "<image_placeholder>",
    "boi_token": "<begin_of_image>",
    "eoi_token": "<end_of_image>",
}


def processor_from_deepseek(src: Path, num_image_tokens: int):
    """``JanusProcessor`` from a DeepSeek directory's tokenizer and ``preprocessor_config.json``
    (``VLMImageProcessor`` fields), as transformers' converter builds it."""
    from transformers import AutoTokenizer, JanusImageProcessor, JanusProcessor

    tok = AutoTokenizer.from_pretrained(
        str(src), local_files_only=True, extra_special_tokens=IMAGE_TOKENS
    )
    pp_path = src / "preprocessor_config.json"
    pp = json.loads(pp_path.read_text()) if pp_path.is_file() else {}
    kw = {
        k: pp[k] for k in ("do_normalize", "image_mean", "image_std", "rescale_factor") if k in pp
    }
    if "image_size" in pp:
        kw["size"] = {"height": pp["image_size"], "width": pp["image_size"]}
    return JanusProcessor(
        image_processor=JanusImageProcessor(**kw), tokenizer=tok, num_image_tokens=num_image_tokens
    )


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """A DeepSeek-layout directory -> an HF-format directory at ``dst`` (config, safetensors,
    processor with tokenizer), written to a temporary sibling and renamed into place."""
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if layout_of(src) != "deepseek":
        raise ValueError(f"{str(src)!r} is not in DeepSeek's release layout (config.json)")
    cfg = json.loads((src / "config.json").read_text())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    jcfg = hf_config_from_deepseek(cfg, tok)
    sd = deepseek_to_hf_state(load_state(src))
    _check_keys(sd, jcfg, str(src))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        jcfg.save_pretrained(tmp)
        save_file(
            {k: v.contiguous() for k, v in sd.items()}, tmp / "model.safetensors", {"format": "pt"}
        )
        processor_from_deepseek(src, jcfg.vision_config.num_image_tokens).save_pretrained(tmp)
        (tmp / "CONVERTED_FROM").write_text(str(src.resolve()) + "\n")
        try:
            os.rename(tmp, dst)
        except OSError:
            if not (dst / "model.safetensors").is_file():  # not another process's result
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _check_keys(sd: dict, jcfg, where: str) -> None:
    """The converted keys and shapes are exactly those of the model ``jcfg`` builds."""
    from transformers import JanusForConditionalGeneration

    with torch.device("meta"):
        want = {
            k: tuple(v.shape) for k, v in JanusForConditionalGeneration(jcfg).state_dict().items()
        }
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if got != want:
        missing = sorted(set(want) - set(got))[:3]
        extra = sorted(set(got) - set(want))[:3]
        shape = [k for k in set(got) & set(want) if got[k] != want[k]][:3]
        raise ValueError(
            f"{where}: weights do not match its config.json (missing {missing}, unexpected "
            f"{extra}, other shapes {shape})"
        )


def cache_dir_for(src: str | os.PathLike) -> Path:
    """Where a DeepSeek directory's HF conversion is cached: ``$JANUS_CONVERT_CACHE`` (default
    ``~/.cache/janus_train/converted``) / name-hash of the path, config and weight files."""
    src = Path(src).resolve()
    h = hashlib.sha256(str(src).encode())
    h.update((src / "config.json").read_bytes())
    for f in _weight_files(src):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    root = os.environ.get("JANUS_CONVERT_CACHE") or Path.home() / ".cache/janus_train/converted"
    return Path(root) / f"{src.name}-{h.hexdigest()[:12]}"


def resolve_init_from(path: str | os.PathLike) -> str:
    """``model.init_from`` as an HF-format directory: itself, or a DeepSeek-layout directory's
    cached conversion (converted on first use; concurrent ranks may both convert, one rename
    wins)."""
    if layout_of(path) == "hf":
        return str(path)
    dst = cache_dir_for(path)
    if not (dst / "model.safetensors").is_file():
        convert_checkpoint(path, dst)
    return str(dst)


def _sft_format(processor) -> str:
    """DeepSeek's conversation template with the roles the export's chat template uses
    (``conversation.py``: ``deepseek_old`` User/Assistant, ``deepseek`` <|User|>/<|Assistant|>;
    an export without roles, stages 1-2, gets DeepSeek's default ``deepseek``)."""
    from janus_train.model.chat_template import user_prefix

    template = getattr(processor, "chat_template", None) or ""
    return "deepseek_old" if json.dumps(user_prefix("janus")) in template else "deepseek"


PREPROCESSOR_FIELDS = ("image_mean", "image_std", "rescale_factor", "do_normalize")


def export_deepseek(hf_dir: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """An HF-format Janus directory (a stage's ``hf/`` export) -> DeepSeek's release layout at
    ``dst``: ``config.json`` (``MultiModalityConfig``), ``model.safetensors`` in DeepSeek's
    keys, the tokenizer files, ``preprocessor_config.json`` (``VLMImageProcessor``) and
    ``processor_config.json`` (``VLChatProcessor``)."""
    from safetensors.torch import save_file
    from transformers import JanusConfig, JanusProcessor

    from janus_train.model.tokenizer import check_tokenizer

    src, dst = Path(hf_dir), Path(dst)
    if layout_of(src) != "hf":
        raise ValueError(f"{str(src)!r} is not an HF-format Janus directory (config.json)")
    jcfg = JanusConfig.from_pretrained(str(src), local_files_only=True)
    processor = JanusProcessor.from_pretrained(str(src), local_files_only=True)
    check_tokenizer(processor.tokenizer)
    sd = hf_to_deepseek_state(load_state(src), jcfg.vision_config.mlp_ratio)
    dst.mkdir(parents=True, exist_ok=True)
    ds_cfg = deepseek_config_from_hf(jcfg)
    dtype = str(sd["language_model.lm_head.weight"].dtype).removeprefix("torch.")
    ds_cfg["torch_dtype"] = ds_cfg["language_config"]["torch_dtype"] = dtype  # as written
    (dst / "config.json").write_text(json.dumps(ds_cfg, indent=2) + "\n")
    save_file(
        {k: v.contiguous() for k, v in sd.items()}, dst / "model.safetensors", {"format": "pt"}
    )
    processor.tokenizer.save_pretrained(dst)
    ip = processor.image_processor
    pp = {k: getattr(ip, k) for k in PREPROCESSOR_FIELDS if hasattr(ip, k)}
    pp.update(
        image_size=jcfg.vision_config.image_size,
        min_size=14,
        image_processor_type="VLMImageProcessor",
        processor_class="VLChatProcessor",
    )
    (dst / "preprocessor_config.json").write_text(json.dumps(pp, indent=2) + "\n")
    (dst / "processor_config.json").write_text(
        json.dumps(
            {
                "add_special_token": False,
                "ignore_id": IGNORE,  # DeepSeek's label ignore id, the same as ours
                "image_tag": IMAGE_TOKENS["image_token"],
                "mask_prompt": True,
                "num_image_tokens": jcfg.vision_config.num_image_tokens,
                "processor_class": "VLChatProcessor",
                "sft_format": _sft_format(processor),
            },
            indent=2,
        )
        + "\n"
    )
    return dst
