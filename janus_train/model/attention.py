"""Attention of the LLM over packed rows (``model.attn_implementation``): which implementations
keep packed samples apart, and how.

    value              how samples stay apart                           where
    auto               torch_varlen on CUDA, sdpa elsewhere             default
    torch_varlen       cu_seqlens into PyTorch's own FlashAttention     CUDA (CPU: reference)
                       (``torch.nn.attention.varlen.varlen_attn``, torch >= 2.10; no package)
    flash_attention_2  cu_seqlens into the ``flash-attn`` package       CUDA, where installed
    flash_attention_3  cu_seqlens into ``flash-attn-3``                 CUDA, where installed
    sdpa | eager       HF's block-causal (B, 1, T, T) mask from the     CPU path (any device)
                       ``position_ids`` restarts
    flex_attention     HF's sparse BlockMask from the same restarts,    CUDA (no backward on CPU)
                       built once per LLM forward (one per micro-step)

``torch_varlen`` is registered as a transformers attention function (``AttentionInterface``)
without a mask function, so HF builds no mask and runs no packed-sequence check (no host sync);
the forward passes ``cu_seq_lens_q/k`` and ``max_length_q/k`` computed on the host
(``janus_train.model.forward.BatchIndex``). On CPU tensors it runs
:func:`varlen_attn_reference` (per-sample sdpa, the installed ``varlen_attn``'s signature), so
the CUDA path's plumbing runs in CI. ``torch_varlen`` and ``flex_attention`` are set on the
language model's config only: HF's Janus class declares no flex support, and the SigLIP tower
(no packing) stays on sdpa.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging

import torch
import torch.nn.functional as F

from janus_train.compat import set_attn_implementation

logger = logging.getLogger(__name__)

TORCH_VARLEN = "torch_varlen"
MASK_PACKED_IMPLS = ("eager", "sdpa", "flex_attention")
VARLEN_IMPLS = (TORCH_VARLEN, "flash_attention_2", "flash_attention_3")
PACKED_SAFE_IMPLS = MASK_PACKED_IMPLS + VARLEN_IMPLS
ATTN_IMPLEMENTATIONS = ("auto", *PACKED_SAFE_IMPLS)
LLM_ONLY_IMPLS = (TORCH_VARLEN, "flex_attention")
"""Set on the language model's config after the Janus model is built with sdpa."""


def check_attn_implementation(impl: str | None, field: str = "model.attn_implementation") -> None:
    """Values only (any machine): refuse an implementation that would let packed samples see
    each other."""
    if impl not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"{field}={impl!r} cannot keep packed samples apart (samples would attend to each "
            f"other): use one of {', '.join(ATTN_IMPLEMENTATIONS)}"
        )


def has_torch_varlen() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def resolve_attn_implementation(impl: str, cuda: bool | None = None) -> str:
    """``auto`` -> ``torch_varlen`` on CUDA (where torch has it), ``sdpa`` elsewhere."""
    if impl != "auto":
        return impl
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return TORCH_VARLEN if cuda and has_torch_varlen() else "sdpa"


def check_attn_available(impl: str, cuda: bool | None = None) -> str:
    """The resolved implementation, or a one-line ``ValueError`` when this machine cannot train
    with it (before any model is built)."""
    check_attn_implementation(impl)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    impl = resolve_attn_implementation(impl, cuda)
    field = f"model.attn_implementation={impl}"
    if impl == "flex_attention" and not cuda:
        raise ValueError(
            f"{field} needs CUDA (FlexAttention has no backward on CPU): use sdpa or auto"
        )
    if impl == TORCH_VARLEN and not has_torch_varlen():
        raise ValueError(f"{field} needs torch >= 2.10 (torch.nn.attention.varlen)")
    if impl.startswith("flash_attention_"):
        from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

        pkg, ok = (
            ("flash-attn", is_flash_attn_2_available)
            if impl == "flash_attention_2"
            else ("flash-attn-3", is_flash_attn_3_available)
        )
        if not cuda or not ok():
            raise ValueError(
                f"{field} needs CUDA and the {pkg} package: use auto (PyTorch's own varlen "
                "attention on CUDA, no package)"
            )
    return impl


def _segments(cu: torch.Tensor, max_len: int, name: str) -> list[tuple[int, int]]:
    bounds = cu.tolist()
    if bounds[0] != 0 or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"{name} must start at 0 and not decrease: {bounds}")
    longest = max((b - a for a, b in zip(bounds[:-1], bounds[1:])), default=0)
    if max_len < longest:  # the kernel would read past its tile: wrong results, no error
        raise ValueError(f"max length {max_len} < longest segment {longest} of {name}")
    return list(zip(bounds[:-1], bounds[1:]))


def varlen_attn_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    *,
    return_aux=None,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
    seqused_k: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.12 signature) on any device: each
    segment of ``cu_seq_q`` attends to the same segment of ``cu_seq_k`` with sdpa, nothing
    across segments. query (Nq, H, D), key/value (Nk, Hkv, D) -> (Nq, H, D). ``window_size``
    (-1, -1) full or (-1, 0) causal; the paged and auxiliary options are not modelled."""
    if return_aux is not None or seqused_k is not None or block_table is not None:
        raise NotImplementedError("varlen_attn_reference: no aux/seqused_k/block_table")
    if tuple(window_size) not in ((-1, -1), (-1, 0)):
        raise NotImplementedError(f"varlen_attn_reference: window_size {window_size}")
    cu_seq_k = cu_seq_q if cu_seq_k is None else cu_seq_k
    seg_q = _segments(cu_seq_q, max_q, "cu_seq_q")
    seg_k = _segments(cu_seq_k, max_k, "cu_seq_k")
    if len(seg_q) != len(seg_k):
        raise ValueError(f"cu_seq_q has {len(seg_q)} segments, cu_seq_k {len(seg_k)}")
    h, hk = query.shape[1], key.shape[1]
    if h != hk and not enable_gqa:
        raise ValueError(f"{h} query heads, {hk} key heads: set enable_gqa=True for GQA")
    out = query.new_zeros(query.shape)
    for (qa, qe), (ka, ke) in zip(seg_q, seg_k):
        if qe == qa:
            continue
        o = F.scaled_dot_product_attention(
            query[qa:qe].transpose(0, 1),
            key[ka:ke].transpose(0, 1),
            value[ka:ke].transpose(0, 1),
            is_causal=tuple(window_size) == (-1, 0),
            scale=scale,
            enable_gqa=h != hk,
        )
        out[qa:qe] = o.transpose(0, 1)
    return out


try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
except ImportError:  # pragma: no cover - older torch: torch_varlen is refused at start
    _torch_varlen_attn = None

# kernel -> its parameter names, read once outside any compiled region (a decoder layer under
# torch.compile traces the attention function; inspect.signature there would break the graph)
_PARAMS: dict = {}


def _params(fn) -> frozenset[str]:
    got = _PARAMS.get(fn)
    if got is None:
        got = _PARAMS[fn] = frozenset(inspect.signature(fn).parameters)
    return got


def call_varlen(kernel, q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float | None):
    """Causal varlen attention through ``kernel`` whatever its torch version's signature:
    ``is_causal=True`` (torch 2.10/2.11) or ``window_size=(-1, 0)`` (2.12+); GQA by
    ``enable_gqa`` where the kernel has it, repeated key/value heads otherwise; ``scale`` only
    where accepted (the kernel's default is Llama's head_dim ** -0.5)."""
    params = _params(kernel)
    kw = {}
    if "window_size" in params:
        kw["window_size"] = (-1, 0)
    elif "is_causal" in params:
        kw["is_causal"] = True
    else:
        raise TypeError(f"{kernel.__qualname__} takes neither window_size nor is_causal")
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if "scale" in params:
        kw["scale"] = scale
    elif scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        raise ValueError(f"{kernel.__qualname__} has no scale argument (needs {scale})")
    return kernel(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``torch_varlen`` transformers attention function: query (B, H, T, D), key/value
    (B, Hkv, T, D), the B rows flattened into one token stream cut by ``cu_seq_lens_*``
    -> (B, T, H, D). Every cu/max argument is required: without them the rows would be one
    sequence each and packed samples would see each other."""
    if attention_mask is not None:
        raise ValueError(f"{TORCH_VARLEN}: packed rows get cu_seqlens, not an attention mask")
    missing = [
        n
        for n, x in (
            ("cu_seq_lens_q", cu_seq_lens_q),
            ("cu_seq_lens_k", cu_seq_lens_k),
            ("max_length_q", max_length_q),
            ("max_length_k", max_length_k),
        )
        if x is None
    ]
    if missing:
        raise ValueError(f"{TORCH_VARLEN} needs {', '.join(missing)} (samples would mix)")
    if dropout:
        raise ValueError(f"{TORCH_VARLEN}: attention dropout {dropout} is not supported")
    b, h, t, d = query.shape
    q = query.transpose(1, 2).reshape(b * t, h, d)
    k = key.transpose(1, 2).reshape(b * t, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * t, value.shape[1], d)
    if query.is_cuda:
        kernel = _torch_varlen_attn
        if q.dtype not in (torch.float16, torch.bfloat16):  # FlashAttention: 16-bit only
            dtype = q.dtype
            out = call_varlen(
                kernel, q.bfloat16(), k.bfloat16(), v.bfloat16(), cu_seq_lens_q,
                cu_seq_lens_k, max_length_q, max_length_k, scaling,
            ).to(dtype)  # fmt: skip
            return out.view(b, t, h, d), None
    else:
        kernel = varlen_attn_reference
    out = call_varlen(
        kernel, q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scaling
    )
    return out.view(b, t, h, d), None


def register_attention() -> None:
    """Make ``torch_varlen`` a transformers attention implementation (idempotent). No mask
    function is registered: HF then builds no mask and runs no packed-sequence check."""
    from transformers import AttentionInterface

    for kernel in (_torch_varlen_attn, varlen_attn_reference):
        if kernel is not None:
            _params(kernel)
    AttentionInterface.register(TORCH_VARLEN, varlen_attention_forward)


def set_llm_attention(model, impl: str) -> None:
    """Set the resolved ``impl`` on ``model``'s (a ``JanusForConditionalGeneration``) language
    model for the LLM-only implementations (the Janus model was built with sdpa)."""
    if impl not in LLM_ONLY_IMPLS:
        return
    if impl == TORCH_VARLEN:
        register_attention()
    set_attn_implementation(model.model.language_model.config, impl)


def build_attn_implementation(impl: str) -> str:
    """What the Janus model itself is built with for the resolved ``impl``."""
    return "sdpa" if impl in LLM_ONLY_IMPLS else impl
