"""The cost model of ``janus-plan``: per-GPU memory, traffic and FLOP inputs of the Janus model
under one DeepSpeed configuration (stage-level assembly: :mod:`janus_train.plan.estimate`).

Everything is arithmetic on the typed config; the parameter counts come from the real HF Janus
modules built on the meta device (no memory, no weights), so they are exact.

Model states, bytes per parameter (bf16 mixed precision, AdamW), as DeepSpeed's own estimators
``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs`` count them
for trainable parameters (P_t, N ranks):

    ZeRO   bf16 params   gradients            optimizer (fp32 master + m + v)
    0      2 P_t         (2 + 4) P_t          12 P_t
    1      2 P_t         2 P_t + 4 P_t / N    12 P_t / N
    2      2 P_t         (2 + 4) P_t / N      12 P_t / N
    3      2 P_t / N     4 P_t / N            12 P_t / N   + 4 x the largest layer (gathered)

Frozen modules hold only their bf16 weights: 2 P_f per GPU, or 2 P_f / N under ZeRO-3; the VQ
is held outside the engine, whole and in fp32 on every GPU whatever the stage (4 P_vq: its codes
are the generation targets, ``janus_train.model.vq_codes``), and never communicated. With
``offload_optimizer`` gradients and optimizer state live in CPU memory; with ``offload_param``
(ZeRO-3) the parameters too. hpZ adds a secondary copy: 2 (P_t + P_f) / hpz.

Activations (bytes per token, b bytes per activation element, HF Llama decoder with SDPA):
a layer keeps ``b (8 h + 2 h_kv + 4 i)`` (inputs of the norms, q/k/v, attention output, the MLP's
four i-wide tensors) plus in bf16 the fp32 copies the two RMSNorms make (8 h bytes). With
gradient checkpointing a layer keeps only its input (``b h``) and one layer is recomputed at a
time. The heads keep the fp32 log-softmax of every supervised position (vocab x 4 bytes) and
their backward briefly holds two more; with ``model.loss_chunk_tokens`` c (fewer supervised
tokens than c: as unchunked) a head keeps only its input, and its backward holds one recomputed
chunk (c rows of log-softmax and its two gradients) and the chunk's weight gradient beside the
running sum (vocab x h x b). Liger's fused linear cross-entropy
(``model.kernels=liger``, not under ZeRO-3) keeps the input gradient it computes in the forward
(h x b per token) and briefly holds chunks of about tokens x h / vocab rows of logits and their
gradient, plus the fp32 weight-gradient accumulator (vocab x h x 4): read from liger-kernel
0.8.5's code, not measured (no GPU so far). tests/test_plan.py checks this against the peak live
tensor memory of a real forward + backward of the tiny model.

Communication, bytes each GPU sends per optimizer step (ring collectives over k ranks move
``S (k-1)/k`` per GPU for a reduce-scatter, reduce or all-gather of S bytes). Gradients travel
in the reduction dtype (``deepspeed.reduce_fp32``: fp32, 4 bytes, DeepSpeed's
``communication_data_type``), parameters in the training dtype. When each runs, read from
DeepSpeed 0.19's ``runtime/zero/stage_1_and_2.py``, ``stage3.py`` and ``engine.py``:

    ZeRO-0  all-reduce of the gradients after the last backward (exposed)
    ZeRO-1  the backward hooks reduce only at the accumulation boundary
            (``reduce_ready_partitions_and_remove_grads``): the whole reduction overlaps the
            last micro-step's backward only; parameter all-gather after the step (exposed)
    ZeRO-2  reduction in every micro-step's backward (``partition_gradients``), overlapping it;
            parameter all-gather after the step (exposed)
    ZeRO-1/2 reduction: ``use_multi_rank_bucket_allreduce`` (DeepSpeed's default,
            ``deepspeed.bucket_allreduce``) all-reduces each bucket, 2x the bytes of reducing
            each partition to its owner
    ZeRO-3  parameters of at most 1e5 elements persist whole on every rank (all-gathered once
            after the step); the others are all-gathered every micro-step for the forward
            (prefetched, overlapping it) and again for the backward (a checkpointed layer's
            recomputation gathers it, its backward reuses it), except modules whose
            forward-to-backward reuse distance is within ``stage3_max_reuse_distance``; the
            gradient reduce-scatter overlaps the backward; hpZ serves the backward gathers from
            the node's secondary copy (in-node)

tests/test_plan.py checks the bytes and the micro-step each collective runs in against the
collectives of a 2-rank CPU run of ZeRO-1, 2 and 3 (torch.distributed wrapped).

ZeRO++ quantization (ZeRO-3 only; ``deepspeed.quantized_weights`` / ``quantized_gradients``),
read from DeepSpeed 0.19's ``partition_parameters.py``, ``partitioned_param_coordinator.py``,
``stage3.py`` and ``comm/coalesced_collectives.py``:

    qwZ     every non-persistent all-gather, forward and backward (hpZ's in-node one too), moves
            int8 plus an fp32 scale per group of up to 8000 elements (:data:`QWZ_BYTES`); the
            persistent parameters' gather after the step is not quantized. Memory: the int8
            flat buffer beside each gathered layer
    qgZ     with more than one node, each micro-step's gradient reduce-scatter becomes
            ``all_to_all_quant_reduce``: the whole gradient quantized to int4 (0.5 B) and
            all-to-all'ed in the node ((L-1)/L of it sent, L GPUs per node), summed there, the
            1/L result re-quantized to int4 and all-to-all'ed across the M nodes ((M-1)/M
            sent). 1-D tensors (norms, biases: < 0.01% of the parameters here) and tensors whose
            size is not a multiple of 2 x world still reduce-scatter: counted as matrices. The
            fp32 scales (one per row or column: < 0.3%) are not counted. Memory:
            :data:`QGZ_BUFFER_BYTES` per bucket element
    Both need DeepSpeed's CUDA quantizer kernels: no CPU run checks these bytes.

MiCS (``mics_shard_size``) was removed from DeepSpeed 0.19, which this project runs, so it is
not a candidate. Step time (:mod:`janus_train.plan.estimate`): per overlap window, the
longer of its compute and its transfers; compute = model FLOPs (PaLM accounting, as
``speed/mfu`` logs it) plus recomputation, of the busiest rank (:mod:`janus_train.plan.simulate`),
/ (utilisation x peak). Host traffic of offloading is not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from janus_train.model.config import ModelConfig
from janus_train.trainer.config import DeepSpeedConfig

QWZ_BYTES = 1.0 + 4 / 8000
"""ZeRO++ qwZ: bytes per gathered element, an int8 and a share of one fp32 scale per group of
up to 8000 (``partition_parameters.CUDAQuantizer.target_group_size``)."""
QGZ_BUFFER_BYTES = 1.5
"""ZeRO++ qgZ: transient bytes per element of a gradient bucket (``buffer_bytes``)."""
PERSISTENCE_THRESHOLD = 100_000
"""DeepSpeed's ``stage3_param_persistence_threshold`` default (the trainer does not set it)."""
REUSE_DISTANCE = 1_000_000_000
"""DeepSpeed's ``stage3_max_reuse_distance`` default: a gathered parameter used again within
this many parameters is not released between its forward and its backward."""


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts per module group and the dimensions the activation model needs."""

    groups: dict[str, int]
    largest_layer: int
    """Most parameters owned directly by one module (ZeRO-3's gathered working set)."""
    flops_params: int
    """PaLM N: LLM parameters without the token embeddings, plus ``lm_head``."""
    hidden: int
    kv_hidden: int
    intermediate: int
    layers: int
    vocab: int
    image_tokens: int
    codebook: int
    vision_hidden: int
    vision_layers: int
    vision_mlp: int
    und_image_flops: float
    gen_image_flops: float
    persistent: dict[str, int] = field(default_factory=dict)
    """Per group, parameters of at most :data:`PERSISTENCE_THRESHOLD` elements: ZeRO-3 keeps
    them whole on every rank (never gathered per micro-step; all-gathered after the step). Not
    the VQ's: it is held outside the engine."""
    head_params: int = 0
    """``lm_head`` + ``generation_head``: the last modules of the forward."""


class _VocabOnly:
    """Stands in for a tokenizer: sizes do not depend on which ids the special tokens have."""

    def __init__(self, size: int):
        self.size = size

    def get_vocab(self) -> dict[str, int]:
        from janus_train.model.tokenizer import JANUS_SPECIAL_TOKENS

        return {t: i for i, t in enumerate(JANUS_SPECIAL_TOKENS)}

    def __len__(self) -> int:
        return self.size


def _key(cfg: ModelConfig) -> tuple:
    return (
        cfg.image_size,
        tuple(vars(cfg.text).items()),
        tuple(vars(cfg.vision).items()),
        tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in vars(cfg.vq).items()),
    )


_SIZES: dict[tuple, ModelSizes] = {}


def _sizes(cfg: ModelConfig) -> ModelSizes:
    import torch
    from transformers import JanusForConditionalGeneration

    from janus_train.model.build import build_janus_config
    from janus_train.model.groups import GROUPS
    from janus_train.trainer.metrics import encoder_flops

    jcfg = build_janus_config(cfg, _VocabOnly(cfg.text.vocab_size))
    with torch.device("meta"):
        model = JanusForConditionalGeneration(jcfg)
    groups = {
        g: sum(p.numel() for path in paths for p in model.get_submodule(path).parameters())
        for g, paths in GROUPS.items()
    }
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    persistent = {
        g: sum(
            p.numel()
            for path in paths
            for p in model.get_submodule(path).parameters()
            if p.numel() <= PERSISTENCE_THRESHOLD
        )
        for g, paths in GROUPS.items()
        if g != "vq"  # held outside the engine (trainer.distributed.init_engine)
    }
    heads = sum(p.numel() for p in model.lm_head.parameters())
    heads += sum(p.numel() for p in model.model.generation_head.parameters())
    lm = model.model.language_model
    n = sum(p.numel() for name, p in lm.named_parameters() if "embed_tokens" not in name)
    n += sum(p.numel() for p in model.lm_head.parameters())
    und_f, gen_f = encoder_flops(jcfg)
    t = cfg.text
    return ModelSizes(
        groups=groups,
        largest_layer=largest,
        flops_params=n,
        hidden=t.hidden_size,
        kv_hidden=t.hidden_size * t.num_key_value_heads // t.num_attention_heads,
        intermediate=t.intermediate_size,
        layers=t.num_hidden_layers,
        vocab=jcfg.text_config.vocab_size,
        image_tokens=cfg.num_image_tokens,
        codebook=cfg.vq.num_embeddings,
        vision_hidden=cfg.vision.hidden_size,
        vision_layers=cfg.vision.num_hidden_layers,
        vision_mlp=int(cfg.vision.hidden_size * cfg.vision.mlp_ratio),
        und_image_flops=und_f,
        gen_image_flops=gen_f,
        persistent=persistent,
        head_params=heads,
    )


def lora_adapter_params(cfg: ModelConfig) -> int:
    """Parameters of ``cfg.lora``'s adapters (0 when off), counted on a meta build."""
    if not cfg.lora.enabled:
        return 0
    import torch
    from transformers import JanusForConditionalGeneration

    from janus_train.model.build import build_janus_config
    from janus_train.model.lora import adapter_param_count

    lo = cfg.lora
    key = (
        _key(cfg),
        tuple(lo.groups),
        tuple(sorted((g, tuple(t)) for g, t in lo.target_modules.items())),
        lo.r,
    )
    if key not in _SIZES:
        with torch.device("meta"):
            model = JanusForConditionalGeneration(
                build_janus_config(cfg, _VocabOnly(cfg.text.vocab_size))
            )
        _SIZES[key] = adapter_param_count(model, lo)
    return _SIZES[key]


def model_sizes(cfg: ModelConfig) -> ModelSizes:
    """Cached per architecture (the meta build takes seconds for 7B)."""
    key = _key(cfg)
    if key not in _SIZES:
        _SIZES[key] = _sizes(cfg)
    return _SIZES[key]


# ---- memory ------------------------------------------------------------------------------


def model_state_bytes(
    trainable: int,
    frozen: int,
    largest_layer: int,
    ds: DeepSpeedConfig,
    world: int,
    precision: str = "bf16",
    vq: int = 0,
) -> dict[str, float]:
    """Per-GPU bytes of parameters, gradients and optimizer state (module docstring table);
    ``frozen`` excludes the ``vq`` parameters, held whole in fp32 outside the engine."""
    z, n = ds.zero_stage, world
    pb = 2 if precision == "bf16" else 4  # parameter / gradient element
    master = 4 if precision == "bf16" else 0  # fp32 master copy and fp32 gradient partition
    out: dict[str, float] = {}
    if z == 3:
        out["trainable params"] = 0.0 if ds.offload_param else pb * trainable / n
        out["frozen params"] = 0.0 if ds.offload_param else pb * frozen / n
        out["gathered layer"] = 2.0 * pb * largest_layer
    else:
        out["trainable params"] = float(pb * trainable)
        out["frozen params"] = float(pb * frozen)
    if ds.offload_optimizer and z >= 1:
        out["gradients"] = 0.0
        out["optimizer"] = 0.0
    elif z == 0:
        out["gradients"] = float((pb + master) * trainable)
        out["optimizer"] = float((master + 8) * trainable)
    elif z == 1:
        out["gradients"] = pb * trainable + master * trainable / n
        out["optimizer"] = (master + 8) * trainable / n
    elif z == 2:
        out["gradients"] = (pb + master) * trainable / n
        out["optimizer"] = (master + 8) * trainable / n
    else:
        out["gradients"] = (master or pb) * trainable / n
        out["optimizer"] = (master + 8) * trainable / n
    if z == 3 and ds.hpz_partition_size > 1:
        out["hpZ secondary copy"] = pb * (trainable + frozen) / ds.hpz_partition_size
    if z == 3 and ds.quantized_weights:  # the int8 flat buffer of a gather, as gathered layer
        out["qwZ int8 gather buffers"] = 2.0 * largest_layer
    out["VQ (fp32, whole)"] = 4.0 * vq
    return out


def buffer_bytes(ds: DeepSpeedConfig) -> float:
    """DeepSpeed's bucket buffers: the gradient reduce bucket (two with ``overlap_comm``) and,
    for ZeRO-1/2, the parameter all-gather bucket; bf16 elements."""
    if ds.zero_stage == 0:
        return 0.0
    reduce = (2 if ds.overlap_comm else 1) * 2.0 * ds.reduce_bucket_size
    if ds.zero_stage == 3 and ds.quantized_gradients:
        # all_to_all_quant_reduce: a bucket's int4 copy and the in-node all-to-all's output
        # (0.5 + 0.5 B per element), the 1/8-sized node sums, and the fp32 result of 1/8
        reduce += QGZ_BUFFER_BYTES * ds.reduce_bucket_size
    return reduce + (2.0 * ds.reduce_bucket_size if ds.zero_stage in (1, 2) else 0.0)


@dataclass(frozen=True)
class Row:
    """A micro-batch row for the activation estimate: ``tokens`` through the LLM, of which
    ``text_sup`` are predicted by ``lm_head`` and ``image_sup`` by the image head, with
    ``und_images`` understanding images."""

    tokens: int
    text_sup: int
    image_sup: int
    und_images: int


def activation_bytes(
    s: ModelSizes,
    row: Row,
    checkpointing: bool,
    trainable: list[str],
    act_bytes: int = 2,
    checkpoint_every: int = 1,
    loss_chunk_tokens: int = 0,
    fused_ce: bool = False,
) -> float:
    """Peak bytes of activations and backward temporaries of one row (module docstring).
    ``checkpoint_every`` k: only every k-th decoder layer is checkpointed
    (``model.checkpoint_every``); ``loss_chunk_tokens``: the heads' chunked cross-entropy;
    ``fused_ce``: Liger's fused linear cross-entropy instead."""
    b, h = act_bytes, s.hidden
    fp32_copies = 0 if b >= 4 else 4 * h  # an RMSNorm's fp32 input copy, bf16 only
    layer_full = b * (8 * h + 2 * s.kv_hidden + 4 * s.intermediate) + 2 * fp32_copies
    final = b * h + 2 * b * h + fp32_copies  # last layer output, final norm
    n_ckpt = -(-s.layers // checkpoint_every) if checkpointing else 0
    saved = n_ckpt * b * h + (s.layers - n_ckpt) * layer_full + final
    saved *= row.tokens
    c = loss_chunk_tokens

    def head(n_sup: int, vocab: int) -> tuple[float, float]:
        """(kept for backward per supervised token: log-softmax, backward temporaries)"""
        grads = 8 * vocab + (0 if b >= 4 else 2 * vocab)
        if fused_ce and n_sup:
            rows = min(n_sup, -(-n_sup * h // vocab))
            return b * h, rows * (b * vocab + 4 * vocab) + 4.0 * vocab * h
        if 0 < c < n_sup:
            return 0.0, c * (4 * vocab + grads) + b * vocab * h
        return 4.0 * vocab, n_sup * grads

    text_kept, text_tmp = head(row.text_sup, s.vocab)
    image_kept, image_tmp = head(row.image_sup, s.codebook)
    # text: the head's input; image: input, projection, GELU
    saved += row.text_sup * (b * h + text_kept) + row.image_sup * (3 * b * h + image_kept)
    # aligner (always trains) on each understanding image, SigLIP only when it trains
    v, m = s.vision_hidden, s.vision_mlp
    per_img_tok = b * (v + 2 * h)
    if "und_encoder" in trainable:
        vit_layer = b * (9 * v + 2 * m)
        per_img_tok += s.vision_layers * (b * v if checkpointing else vit_layer)
    saved += max(1, row.und_images) * s.image_tokens * per_img_tok
    # backward temporaries: the heads' logits gradients, or one recomputed layer
    head_tmp = text_tmp + image_tmp
    recompute = row.tokens * layer_full if n_ckpt else 0
    return saved + max(head_tmp, recompute)


# ---- communication -------------------------------------------------------------------------

PHASES = ("forward", "backward", "last backward", "after step")
"""When a transfer runs, as DeepSpeed 0.19 schedules it: overlapping every micro-step's forward
or backward, the last micro-step's backward only, or after the optimizer step (nothing to hide
behind)."""


@dataclass(frozen=True)
class Transfer:
    what: str
    bytes: float
    """Bytes each GPU sends per optimizer step (all micro-steps)."""
    inter_node: bool
    phase: str
    """One of :data:`PHASES`."""
    per_micro: bool = False
    """Runs once per micro-step (``bytes`` is the step's total)."""

    @property
    def exposed(self) -> bool:
        return self.phase == "after step"


def reduce_bytes(ds: DeepSpeedConfig, precision: str) -> int:
    """Bytes per gradient element on the wire: DeepSpeed's ``communication_data_type`` is fp32
    with ``deepspeed.reduce_fp32`` (and in fp32 runs), else the bf16 gradient's 2."""
    return 4 if (ds.reduce_fp32 or precision != "bf16") else 2


def zero3_backward_gathers(pre: int, layer: int, layers: int, heads: int) -> int:
    """Parameters ZeRO-3 gathers again for the backward: modules in forward order (``pre``:
    encoders, adaptors, embeddings; ``layers`` decoder layers of ``layer``; ``heads``), walked
    from the end; a module whose forward-to-backward reuse distance (twice the parameters that
    run after it, plus its own) is within :data:`REUSE_DISTANCE` stays gathered. A checkpointed
    layer's recomputation gathers it and its backward reuses it at once: one gather either way.
    Non-persistent parameters only."""
    seq = [pre] + [layer] * layers + [heads]
    later, out = 0, 0
    for x in reversed(seq):
        if 2 * later + x > REUSE_DISTANCE:
            out += x
        later += x
    return out


def _zero3_transfers(
    ds: DeepSpeedConfig,
    trainable: int,
    forward_params: int,
    backward_params: int,
    nodes: int,
    gpus_per_node: int,
    a: float,
    pb: int,
    gb: int,
) -> list[Transfer]:
    """ZeRO-3's per-micro-step gathers and gradient reduction (hpZ, qwZ, qgZ as configured);
    ``a`` micro-steps, ``pb`` / ``gb`` bytes per parameter / reduced gradient element."""
    n = nodes * gpus_per_node
    ring, inter = (n - 1) / n, nodes > 1
    qw = ds.quantized_weights
    wb = QWZ_BYTES if qw else pb  # qwZ: every non-persistent gather, forward and backward
    q = " (qwZ int8)" if qw else ""
    out = [
        Transfer(
            f"forward parameter all-gather{q} x{a:g}",
            a * wb * forward_params * ring,
            inter,
            "forward",
            per_micro=True,
        )
    ]
    bwd = a * wb * backward_params
    hpz = ds.hpz_partition_size
    label = f"backward all-gather{q} x{a:g}"
    if hpz > 1 and gpus_per_node % hpz == 0:
        out.append(
            Transfer(f"{label} (hpZ, in-node)", bwd * (hpz - 1) / hpz, False, "backward", True)
        )
    else:
        out.append(Transfer(label, bwd * ring, inter, "backward", True))
    if ds.quantized_gradients and inter:
        # qgZ (stage3 __avg_scatter_grads -> all_to_all_quant_reduce, only across nodes):
        # int4 (0.5 B) all-to-all of each whole gradient in the node, then the node's sums,
        # 1/gpus_per_node of them, int4 all-to-all across the nodes
        L, M = gpus_per_node, nodes
        out.append(
            Transfer(
                f"gradient all-to-all (qgZ int4, in-node) x{a:g}",
                a * 0.5 * trainable * (L - 1) / L,
                False,
                "backward",
                per_micro=True,
            )
        )
        out.append(
            Transfer(
                f"gradient all-to-all (qgZ int4) x{a:g}",
                a * 0.5 * trainable / L * (M - 1) / M,
                True,
                "backward",
                per_micro=True,
            )
        )
    else:
        out.append(
            Transfer(
                f"gradient reduce-scatter ({gb} B) x{a:g}",
                a * gb * trainable * ring,
                inter,
                "backward",
                per_micro=True,
            )
        )
    return out


def _zero12_transfers(
    ds: DeepSpeedConfig, trainable: int, a: float, pb: int, gb: int, ring: float, inter: bool
) -> list[Transfer]:
    """ZeRO-1/2's gradient reduction and the parameter all-gather after the step; ``a``
    micro-steps, ``ring`` the ring factor (n - 1) / n, ``inter``: across nodes."""
    gather = Transfer(
        "parameter all-gather after the step", pb * trainable * ring, inter, "after step"
    )
    # use_multi_rank_bucket_allreduce (default): all-reduce of each bucket; else a reduce
    # of each partition to its owner
    op, k = ("all-reduce", 2) if ds.bucket_allreduce else ("reduce", 1)
    if ds.zero_stage == 1:  # hooks reduce only at the accumulation boundary
        red = Transfer(
            f"gradient {op} ({gb} B) in the last backward",
            k * gb * trainable * ring,
            inter,
            "last backward",
        )
    else:
        red = Transfer(
            f"gradient {op} ({gb} B) x{a:g}",
            a * k * gb * trainable * ring,
            inter,
            "backward",
            per_micro=True,
        )
    return [red, gather]


def communication(
    ds: DeepSpeedConfig,
    trainable: int,
    forward_params: int,
    backward_params: int,
    nodes: int,
    gpus_per_node: int,
    grad_accum: float,
    precision: str = "bf16",
    persistent: int = 0,
) -> list[Transfer]:
    """Per-GPU traffic of one optimizer step (module docstring). ``forward_params`` /
    ``backward_params``: non-persistent parameters ZeRO-3 gathers for the forward / again for
    the backward (:func:`zero3_backward_gathers`); ``persistent``: ZeRO-3's persistent
    parameters (all groups); ``grad_accum``: micro-steps per step (the simulated mean with
    token budgets)."""
    n = nodes * gpus_per_node
    pb = 2 if precision == "bf16" else 4
    gb = reduce_bytes(ds, precision)
    ring = (n - 1) / n
    inter = nodes > 1
    z, a = ds.zero_stage, grad_accum
    if n == 1:
        return []
    if z == 0:
        # engine.allreduce_gradients at the boundary, after the backward (buffered fallback)
        return [Transfer("gradient all-reduce", 2 * gb * trainable * ring, inter, "after step")]
    if z in (1, 2):
        return _zero12_transfers(ds, trainable, a, pb, gb, ring, inter)
    out = _zero3_transfers(
        ds, trainable, forward_params, backward_params, nodes, gpus_per_node, a, pb, gb
    )
    if persistent:
        out.append(
            Transfer(
                "persistent parameter all-gather after the step",
                pb * persistent * ring,
                inter,
                "after step",
            )
        )
    return out
