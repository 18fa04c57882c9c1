"""Model assembly on HF transformers' Janus classes: random init from a typed config, or
``from_pretrained`` on a local HF-format directory; tokenizer/processor alongside.

Nothing here re-implements a Janus module: the model is always a
``transformers.JanusForConditionalGeneration``.

Under ZeRO-3 the trainer passes a :class:`PartitionedLoad` (this layer never imports DeepSpeed):
``model.init_from`` is then built partitioned and loaded into the partitions (HF's
``from_pretrained`` under ``deepspeed.zero.Init``: rank 0 reads each module's tensors, gathers,
copies and re-partitions it), so no rank ever holds the whole model; the frozen VQ, which the
trainer holds whole and in float32 outside the engine anyway, is read whole from the checkpoint
instead of the partitioned one (:func:`load_whole_vq`)::

    ZeRO-3, init_from:  zero.Init build -> per module: rank 0 reads, gather, copy, partition
                        -> VQ replaced by a whole fp32 one read from the checkpoint
                        -> re-inits (reinit_gen_*) on gathered parameters, rank 0's kept
    otherwise:          whole build (from_pretrained in the training dtype, or random init)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from janus_train import compat
from janus_train.model.attention import (
    build_attn_implementation,
    check_attn_available,
    set_llm_attention,
)
from janus_train.model.compile import compile_decoder_layers
from janus_train.model.config import ModelConfig, assemble_janus_config
from janus_train.model.kernels import apply_kernels, check_kernels_available
from janus_train.model.tokenizer import (
    SpecialTokens,
    check_tokenizer,
    resolve_special_tokens,
    train_tiny_tokenizer,
)
from janus_train.model.vq_codes import VQ_PATH, normalized_codebook

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PartitionedLoad:
    """ZeRO-3's partitioned build, supplied by the trainer
    (``janus_train.trainer.distributed.partitioned_load``).

    ``loading()``: the context HF's ``from_pretrained`` runs in to construct the model
    partitioned (``deepspeed.zero.Init``) and load the checkpoint into the partitions.
    ``gathered(params)``: the context in which ``params`` are whole on every rank; what rank 0
    wrote into them is kept (broadcast) when it exits, so every rank ends with rank 0's values.
    """

    loading: Callable[[], AbstractContextManager]
    gathered: Callable[[list], AbstractContextManager]


def _whole(params: Iterable) -> AbstractContextManager:
    return contextlib.nullcontext()


def build_janus_config(cfg: ModelConfig, tokenizer):
    """A ``JanusConfig`` from the typed dimensions; special-token ids come from `tokenizer`."""
    d = cfg.text.hidden_size
    if cfg.image_size % cfg.vision.patch_size:
        raise ValueError(
            f"model.image_size={cfg.image_size} is not a multiple of "
            f"model.vision.patch_size={cfg.vision.patch_size}"
        )
    vq_down = 2 ** (len(cfg.vq.channel_multiplier) - 1)
    if vq_down != cfg.vision.patch_size:
        raise ValueError(
            f"model.vq.channel_multiplier downsamples by {vq_down} but model.vision.patch_size is "
            f"{cfg.vision.patch_size}: understanding and generation grids must match"
        )
    text = dict(
        vocab_size=max(cfg.text.vocab_size, len(tokenizer)),
        hidden_size=d,
        intermediate_size=cfg.text.intermediate_size,
        num_hidden_layers=cfg.text.num_hidden_layers,
        num_attention_heads=cfg.text.num_attention_heads,
        num_key_value_heads=cfg.text.num_key_value_heads,
        max_position_embeddings=cfg.text.max_position_embeddings,
        rms_norm_eps=cfg.text.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.text.rope_theta},
    )
    vision = dict(
        hidden_size=cfg.vision.hidden_size,
        num_hidden_layers=cfg.vision.num_hidden_layers,
        num_attention_heads=cfg.vision.num_attention_heads,
        mlp_ratio=cfg.vision.mlp_ratio,
        image_size=cfg.image_size,
        patch_size=cfg.vision.patch_size,
        projection_dim=d,
        depth=cfg.vision.aligner_depth,
        num_image_tokens=cfg.num_image_tokens,
    )
    vq = dict(
        embed_dim=cfg.vq.embed_dim,
        num_embeddings=cfg.vq.num_embeddings,
        base_channels=cfg.vq.base_channels,
        channel_multiplier=list(cfg.vq.channel_multiplier),
        num_res_blocks=cfg.vq.num_res_blocks,
        latent_channels=cfg.vq.latent_channels,
        projection_dim=d,
        image_token_embed_dim=d,
        num_hidden_layers=cfg.vq.aligner_depth,
    )
    return assemble_janus_config(tokenizer, text, vision, vq)


def load_processor(path: str | os.PathLike):
    """Tokenizer + image processor from a local directory (no hub access), its tokenizer
    checked by :func:`check_tokenizer` (every entry point loads it here)."""
    from transformers import JanusProcessor

    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer/processor directory {str(path)!r} does not exist")
    processor = JanusProcessor.from_pretrained(str(path), local_files_only=True)
    check_tokenizer(processor.tokenizer)
    return processor


def get_processor(cfg: ModelConfig, workdir: str | os.PathLike | None = None):
    """The processor named by ``cfg.tokenizer`` (default: ``cfg.init_from``).

    ``tiny`` trains a tiny tokenizer locally into ``workdir/tokenizer`` (or reuses it there).
    """
    src = cfg.tokenizer or cfg.init_from
    if src is None:
        raise ValueError("model.tokenizer is unset and model.init_from is unset: no tokenizer")
    if src == "tiny":
        out = Path(workdir or ".") / "tokenizer"
        if not (out / "tokenizer.json").exists():
            train_tiny_tokenizer(
                out, image_size=cfg.image_size, num_image_tokens=cfg.num_image_tokens
            )
        src = str(out)
    elif src == cfg.init_from:
        src = hf_init_from(src)
    return load_processor(src)


def hf_init_from(path: str) -> str:
    """``model.init_from`` as an HF-format directory: a directory in DeepSeek's release layout
    becomes its cached conversion (``model.deepseek_format``); anything else is returned as is."""
    if not Path(path).is_dir():
        return path
    from janus_train.model.deepseek_format import resolve_init_from

    return resolve_init_from(path)


def set_generation_config(model, st: SpecialTokens) -> None:
    """Fill the fields HF's ``generate(generation_mode="image")`` needs (ids found by string)."""
    gc = model.generation_config
    gc.bos_token_id = st.bos
    gc.eos_token_id = st.eos
    gc.pad_token_id = st.pad
    kw = dict(getattr(gc, "generation_kwargs", None) or {})
    kw["boi_token_id"] = st.boi
    gc.generation_kwargs = kw
    # A config marked "from the model config" is reloaded by from_pretrained without its
    # generation_kwargs: mark it as our own so exports keep boi_token_id.
    compat.mark_generation_config_own(gc)


def reinit_generation_modules(
    model,
    include_embeddings_and_adaptor: bool,
    gathered: Callable[[list], AbstractContextManager] = _whole,
) -> None:
    """Random re-initialisation of the image head (and optionally the generation adaptor) with
    HF's own initialiser; the code embeddings (with the adaptor) become the VQ's L2-normalised
    codebook, the "codebook embeddings" the Janus paper's generation adaptor maps (its
    architecture section) and what DeepSeek's quantizer outputs, so they are meaningful while
    frozen (the default). ``gathered``: :attr:`PartitionedLoad.gathered` for a partitioned model
    (the initialiser draws the same numbers from the whole tensors as on an unpartitioned one;
    rank 0's are kept). The VQ is read whole (never partitioned: :func:`load_whole_vq`)."""
    mods = [model.model.generation_head]
    if include_embeddings_and_adaptor:
        mods += [model.model.generation_aligner]
    emb = model.model.generation_embeddings.weight
    params = [p for mod in mods for p in mod.parameters()]
    with gathered(params + ([emb] if include_embeddings_and_adaptor else [])):
        for mod in mods:
            for sub in mod.modules():
                compat.reinit_with_hf_initializer(model, sub)
        if include_embeddings_and_adaptor:
            with torch.no_grad():
                emb.copy_(normalized_codebook(model.model.vqmodel).to(emb.dtype))


def load_whole_vq(vq_config, path: str | os.PathLike) -> torch.nn.Module:
    """The VQ of the HF-format checkpoint at ``path``, whole and in float32, built outside any
    ``zero.Init``: its tensors memory-mapped from the safetensors files (an fp32 checkpoint's
    are used in place, a bf16 one's are cast: the VQ's float32 copy every rank holds anyway,
    ``vq_codes.detach_vq``). Raises ``ValueError`` naming ``path`` when its safetensors lack a
    VQ tensor or hold an unexpected one."""
    from safetensors import safe_open
    from transformers import JanusVQVAE

    prefix = VQ_PATH + "."
    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                if k.startswith(prefix):
                    state[k[len(prefix) :]] = sf.get_tensor(k).float()
    with torch.device("meta"):
        vq = JanusVQVAE(vq_config)
    res = vq.load_state_dict(state, strict=False, assign=True)
    meta = [n for n, t in [*vq.named_parameters(), *vq.named_buffers()] if t.is_meta]
    if res.unexpected_keys or meta:
        raise ValueError(
            f"model.init_from={str(path)!r}: its safetensors lack VQ tensor(s) "
            f"{[prefix + k for k in meta][:3]} or hold unexpected {res.unexpected_keys[:3]}"
        )
    return vq.eval()


def set_pad_embedding_trainable(model, trainable: bool, pad_id: int) -> None:
    """``model.train_pad_embedding``. The pad token's text embedding is the input of every
    classifier-free-guidance-dropped prompt. HF's Llama passes ``pad_token_id`` as the
    embedding's ``padding_idx``, which zeroes that row's gradient (HF's converted Janus
    checkpoints carry ``pad_token_id``); DeepSeek's released code builds its Llama from a config
    without one (``padding_idx`` None), and whether its training config had one is not public.
    ``trainable`` False (the default) keeps a checkpoint's pad row exactly as loaded (its
    unconditional branch input unchanged); True lets it train with the LLM."""
    model.get_input_embeddings().padding_idx = None if trainable else pad_id


def set_checkpoint_every(model, k: int) -> None:
    """Keep activation checkpointing on every k-th LLM decoder layer only (HF enables it on all
    of them); ``k`` <= 0 is refused."""
    if k <= 0:
        raise ValueError(f"model.checkpoint_every={k}: must be >= 1 (1 = every layer)")
    for i, layer in enumerate(model.model.language_model.layers):
        layer.gradient_checkpointing = i % k == 0


def loads_partitioned(init_from: str) -> bool:
    """Whether, given a :class:`PartitionedLoad`, the HF-format directory ``init_from`` is
    loaded partitioned: only safetensors are (``pytorch_model*.bin``: whole, warned)."""
    return any(Path(init_from).glob("*.safetensors"))


def _load_init_from(cfg: ModelConfig, dtype, attn: str, partitioned: PartitionedLoad | None):
    """``from_pretrained`` of ``cfg.init_from`` (an HF-format directory), partitioned when
    ``partitioned`` is given and the checkpoint is safetensors; (model, partitioned or None)."""
    from transformers import JanusForConditionalGeneration

    if not Path(cfg.init_from).is_dir():
        raise FileNotFoundError(f"model.init_from={cfg.init_from!r} is not a directory")
    if partitioned and not loads_partitioned(cfg.init_from):
        logger.warning(
            "model.init_from=%s holds no safetensors: loaded whole on every rank, not "
            "partitioned (convert it with save_pretrained)",
            cfg.init_from,
        )
        partitioned = None
    with partitioned.loading() if partitioned else contextlib.nullcontext():
        model = compat.from_pretrained_keeping_fp32(
            JanusForConditionalGeneration,
            cfg.init_from,
            [VQ_PATH],
            local_files_only=True,
            dtype=dtype,
            attn_implementation=build_attn_implementation(attn),
        )
    if partitioned:  # the partitioned VQ (its dtype the engine's) gives way to a whole one
        model.model.vqmodel = load_whole_vq(model.config.vq_config, cfg.init_from)
    return model, partitioned


def build_model(
    cfg: ModelConfig,
    workdir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    partitioned: PartitionedLoad | None = None,
):
    """Build ``(JanusForConditionalGeneration, processor)``.

    Random init uses ``cfg.seed`` so every rank builds identical weights. ``dtype``: the dtype
    ``model.init_from`` is read in, the training dtype (``torch.bfloat16`` for a bf16 run, whose
    engine would cast every parameter to bf16 anyway): HF's loader builds the model on the meta
    device and fills it tensor by tensor from the memory-mapped safetensors files, casting each
    on the way, so no fp32 copy of the weights is ever held (DeepSpeed keeps its fp32 master
    copy in the optimizer, partitioned under ZeRO). A random init is built in fp32 as before.

    ``partitioned`` (ZeRO-3, from the trainer): ``model.init_from`` is built and loaded
    partitioned (module docstring); the parameters come back as DeepSpeed's partitioned ones
    (``ds_shape``, ``ds_numel``), the VQ whole. A random init is built whole even then: its
    seeded weights are the same under every ZeRO stage (a model large enough to need
    partitioning starts from a checkpoint).
    """
    from transformers import JanusForConditionalGeneration

    check_kernels_available(cfg)
    attn = check_attn_available(cfg.attn_implementation)
    if cfg.init_from:
        cfg = dataclasses.replace(cfg, init_from=hf_init_from(cfg.init_from))
    processor = get_processor(cfg, workdir)
    tokenizer = processor.tokenizer
    st = resolve_special_tokens(tokenizer)
    if cfg.init_from:
        model, partitioned = _load_init_from(cfg, dtype, attn, partitioned)
        if model.config.image_token_id != st.image:
            raise ValueError(
                f"checkpoint {cfg.init_from!r} has image_token_id={model.config.image_token_id} "
                f"but the tokenizer maps {st.image} to <image_placeholder>"
            )
    else:
        partitioned = None  # a random init is built whole (docstring)
        jcfg = build_janus_config(cfg, tokenizer)
        compat.set_attn_implementation(jcfg, build_attn_implementation(attn))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = JanusForConditionalGeneration(jcfg)
    if cfg.reinit_gen_head or cfg.reinit_gen_modules:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            reinit_generation_modules(
                model, cfg.reinit_gen_modules, partitioned.gathered if partitioned else _whole
            )
    set_llm_attention(model, attn)
    set_pad_embedding_trainable(model, cfg.train_pad_embedding, st.pad)
    set_generation_config(model, st)
    apply_kernels(model, cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        set_checkpoint_every(model, cfg.checkpoint_every)
    if cfg.compile:
        compile_decoder_layers(model, cfg.compile_backend)
    n_img = model.config.vision_config.num_image_tokens
    if n_img != processor.num_image_tokens:
        raise ValueError(
            f"model has {n_img} image tokens per image but the processor inserts "
            f"{processor.num_image_tokens}: model.image_size / patch size disagree with the processor"
        )
    return model, processor


def check_init_from(cfg: ModelConfig) -> None:
    """``model.init_from`` (and ``model.tokenizer`` when it is a directory) hold what
    :func:`build_model` reads: config, weights, tokenizer. Checked before any model is built
    (also by ``train.dry_run``); the error names the field instead of HF's hub-download hint."""
    if cfg.tokenizer and cfg.tokenizer != "tiny" and not Path(cfg.tokenizer).is_dir():
        raise FileNotFoundError(f"model.tokenizer={cfg.tokenizer!r} is not a directory")
    if not cfg.init_from:
        return
    d = Path(cfg.init_from)
    if not d.is_dir():
        raise FileNotFoundError(f"model.init_from={cfg.init_from!r} is not a directory")
    missing = []
    if not (d / "config.json").is_file():
        missing.append("config.json")
    if not any(d.glob("*.safetensors")) and not any(d.glob("pytorch_model*.bin")):
        missing.append("weights (*.safetensors)")
    if (
        not cfg.tokenizer
        and not (d / "tokenizer.json").is_file()
        and not (d / "tokenizer_config.json").is_file()
    ):
        missing.append("tokenizer (tokenizer.json; or set model.tokenizer)")
    if missing:
        raise FileNotFoundError(
            f"model.init_from={cfg.init_from!r} lacks {', '.join(missing)}: expected an "
            f"HF-format Janus directory (a stage's run_dir/hf export or a converted release) "
            f"or DeepSeek's release layout"
        )
    from janus_train.model.deepseek_format import layout_of

    try:
        layout_of(d)
    except ValueError as e:
        raise ValueError(f"model.init_from: {e}") from None
