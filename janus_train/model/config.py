"""Typed configuration of the model: which architecture to build or which local checkpoint to load."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TextModelConfig:
    """The LLM (Llama architecture, DeepSeek-LLM dimensions)."""

    hidden_size: int = 2048
    """LLM width d; also the width of both adaptors' outputs and the image head's input."""
    intermediate_size: int = 5632
    """Hidden width of each decoder layer's SwiGLU MLP."""
    num_hidden_layers: int = 24
    """Decoder layers."""
    num_attention_heads: int = 16
    """Query heads of each decoder layer (head dim = hidden_size / num_attention_heads)."""
    num_key_value_heads: int = 16
    """Key/value heads (equal to ``num_attention_heads``: multi-head attention; fewer: grouped-
    query attention)."""
    vocab_size: int = 102400
    """Rows of the text embedding table and ``lm_head``; raised to the tokenizer's length where
    that is larger."""
    max_position_embeddings: int = 16384
    """Longest sequence the rotary position tables are built for."""
    rope_theta: float = 10000.0
    """Base frequency of the rotary position embedding."""
    rms_norm_eps: float = 1e-6
    """Epsilon of the LLM's RMSNorms."""


@dataclass
class VisionModelConfig:
    """The understanding encoder (SigLIP) and its adaptor."""

    hidden_size: int = 1024
    """SigLIP encoder width."""
    num_hidden_layers: int = 24
    """SigLIP encoder layers."""
    num_attention_heads: int = 16
    """SigLIP attention heads."""
    mlp_ratio: float = 4.0
    """SigLIP MLP width as a multiple of ``hidden_size``."""
    patch_size: int = 16
    """Pixels per patch side: ``(image_size / patch_size) ** 2`` image tokens per image, for
    understanding and generation alike (the VQ must downsample by the same factor)."""
    aligner_depth: int = 2
    """Layers of the understanding adaptor MLP."""


@dataclass
class VQModelConfig:
    """The generation encoder (LlamaGen VQ-16) and the generation adaptor/head."""

    num_embeddings: int = 16384
    """Codebook size = image-head vocabulary."""
    embed_dim: int = 8
    """Dimension of the codebook vectors (the quantised latent)."""
    base_channels: int = 128
    """Channels of the VQ encoder's and decoder's first level (times ``channel_multiplier``
    per level)."""
    channel_multiplier: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    """Downsample factor is 2 ** (len(channel_multiplier) - 1); must equal the vision patch size."""
    num_res_blocks: int = 2
    """Residual blocks per level of the VQ encoder and decoder."""
    latent_channels: int = 256
    """Channels of the VQ encoder's output, projected to ``embed_dim`` for quantisation."""
    aligner_depth: int = 2
    """Layers of the generation adaptor MLP."""


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on module groups that the stage trains (``model.lora``).

    A group listed in ``groups`` trains through adapters only (its base weights, norms and
    biases stay frozen); the stage's other trainable groups train fully. Adapters are injected
    into the existing modules (no ``PeftModel`` wrapper), after freezing; the export merges them
    into ``hf/`` and writes them unmerged to ``adapter/``."""

    enabled: bool = False
    """Inject adapters (off: every trainable group trains fully)."""
    groups: list[str] = field(default_factory=lambda: ["llm"])
    """Module groups with adapters: llm, und_encoder, und_adaptor, gen_adaptor, gen_head. Each
    must be in the stage's trainable groups; the VQ never gets adapters."""
    target_modules: dict[str, list[str]] = field(default_factory=dict)
    """Per group, the Linear layers that get adapters, by name: a name matches a layer whose
    path inside the group ends with it (a trailing list index ignored: ``hidden_layers`` matches
    ``hidden_layers.0``). A group not listed uses ``janus_train.model.lora.DEFAULT_TARGETS``
    (llm: q/k/v/o_proj, gate/up/down_proj; und_encoder: q/k/v_proj, projection_layer, fc1, fc2;
    adaptors and image head: every Linear)."""
    r: int = 16
    """Rank of every adapter."""
    alpha: float = 32.0
    """Scaling numerator: the update is (alpha / r) * B @ A."""
    dropout: float = 0.05
    """Dropout on the adapter's input (training mode only)."""
    init: str = "default"
    """``default`` (peft's: A Kaiming-uniform, B zero, so training starts from the base model) |
    ``gaussian`` (A normal, B zero) | ``random`` (A and B random: tests only, the adapted model
    then differs from the base)."""
    seed: int = 0
    """Seed of the adapters' random init (identical on every rank)."""


@dataclass
class ModelConfig:
    """What to build. ``init_from`` set: load that local HF-format directory (the tokenizer and
    processor too, unless ``tokenizer`` names another directory). Unset: random init from the
    dimensions below, with the tokenizer from ``tokenizer`` (a local directory)."""

    name: str = "tiny"
    """Label of the model preset (its ``conf/model`` file); selects nothing."""
    init_from: str | None = None
    """Local HF-format directory (``save_pretrained`` layout) to load weights from."""
    tokenizer: str | None = None
    """Local directory with tokenizer + processor; defaults to ``init_from``. The special value
    ``tiny`` trains a tiny tokenizer locally into the run dir (tests, demo)."""
    image_size: int = 384
    """Input resolution of both encoders; understanding and generation use the same grid."""
    text: TextModelConfig = field(default_factory=TextModelConfig)
    vision: VisionModelConfig = field(default_factory=VisionModelConfig)
    vq: VQModelConfig = field(default_factory=VQModelConfig)
    reinit_gen_head: bool = False
    """Re-initialise generation_head (and the generation adaptor/embeddings when
    ``reinit_gen_modules``) after loading, e.g. for a checkpoint that lacks them."""
    reinit_gen_modules: bool = False
    """Also re-initialise the generation adaptor (random) and the code embeddings (from the VQ's
    L2-normalised codebook, the codebook embeddings of the Janus paper's architecture section)."""
    train_pad_embedding: bool = False
    """Let the pad token's text embedding (the input of every CFG-dropped prompt) train with the
    LLM. False: its gradient is zero (``padding_idx``, as HF's converted checkpoints set it), so
    a loaded checkpoint's pad row, and with it the unconditional branch's input, stays as
    released. True: as DeepSeek's model code builds its Llama (no ``padding_idx``); the
    unconditional input then moves during stages 2-3. The papers do not say (docs/fidelity.md)."""
    gradient_checkpointing: bool = False
    """Activation checkpointing (recompute in backward) of the decoder layers (and SigLIP)."""
    checkpoint_every: int = 1
    """With ``gradient_checkpointing``: checkpoint every k-th LLM decoder layer (1 = all,
    ``full``; 2 = half of them, ...): memory traded for less recompute. The pair selects
    ``none`` (``gradient_checkpointing: false``) | ``full`` (true, k = 1) | every k layers; the
    shipped per-model defaults come from ``janus-plan``'s memory estimate (BENCHMARKS.md)."""
    compile: bool = False
    """``torch.compile`` each LLM decoder layer (``janus_train.model.compile``): fused RMSNorm,
    SwiGLU and RoPE elementwise chains; one compilation for all layers and row lengths
    (dynamic shapes). Composes with checkpointing and every ZeRO stage."""
    compile_backend: str = "inductor"
    """With ``compile``: ``inductor`` (generates kernels; needs a C++ compiler on CPU, Triton
    on GPU) | ``aot_eager`` (traces without generating kernels: tests) | ``eager``."""
    attn_implementation: str = "auto"
    """How the LLM keeps packed samples apart (``janus_train.model.attention``): ``auto``
    (``torch_varlen`` on CUDA, ``sdpa`` elsewhere) | ``torch_varlen`` (PyTorch's own
    FlashAttention varlen kernel with cu_seqlens, torch >= 2.10, no package; CPU: a per-sample
    reference) | ``sdpa`` | ``eager`` (a block-causal mask: the CPU path) | ``flex_attention``
    (a sparse BlockMask, CUDA) | ``flash_attention_2`` | ``flash_attention_3`` (cu_seqlens;
    CUDA with the flash-attn package). Anything else is refused (samples could attend to each
    other), and what this machine cannot run is refused before a model is built."""
    kernels: str = "none"
    """``none`` | ``liger``: Liger Kernel's fused RMSNorm, SwiGLU and RoPE in the LLM and its
    fused linear cross-entropy for ``lm_head`` and the image head's last Linear (CUDA only;
    ``pip install 'janus-train[gpu]'``). Under ZeRO-3, or with LoRA on a head, the heads use the
    chunked path of ``loss_chunk_tokens`` instead (Liger reads the weights outside the module)."""
    loss_chunk_tokens: int = 0
    """> 0: the heads' cross-entropy in chunks of this many tokens, each chunk's fp32 logits
    recomputed in backward (pure PyTorch, any device): one chunk's logits in memory instead of
    every supervised token's, for one more head matmul. 0: all at once."""
    seed: int = 0
    """Seed of the random init (same weights on every rank)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters (off by default)."""

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.vision.patch_size) ** 2


def assemble_janus_config(tokenizer, text: dict, vision: dict, vq: dict):
    """The one place a ``transformers.JanusConfig`` is put together (from the typed config in
    ``build.build_janus_config``, from DeepSeek's ``config.json`` in ``deepseek_format``):
    ``text``, ``vision``, ``vq`` are the keyword arguments of ``LlamaConfig``,
    ``JanusVisionConfig``, ``JanusVQVAEConfig``; every special-token id comes from
    ``tokenizer`` by its string; ``lm_head`` is untied from the embeddings."""
    from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    from janus_train.model.tokenizer import resolve_special_tokens

    st = resolve_special_tokens(tokenizer)
    return JanusConfig(
        text_config=LlamaConfig(
            **text,
            bos_token_id=st.bos,
            eos_token_id=st.eos,
            pad_token_id=st.pad,
            tie_word_embeddings=False,
        ),
        vision_config=JanusVisionConfig(**vision),
        vq_config=JanusVQVAEConfig(**vq),
        image_token_id=st.image,
        tie_word_embeddings=False,
    )
