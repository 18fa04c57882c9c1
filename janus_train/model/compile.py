"""``torch.compile`` of the LLM decoder layers (``model.compile``).

Each decoder layer is compiled on its own (``nn.Module.compile``: the layer's ``__call__``
becomes one compiled region), as torchtitan's ``apply_compile`` and torchtune do: the layers
share one code object, so one compilation serves all of them; everything outside the layers
(encoders, adaptors, heads, the packed-attention mask or cu_seqlens built by HF's
``LlamaModel``) stays eager, so their data-dependent shapes cannot break the graph.

Activation checkpointing composes per layer: HF wraps the layer's ``forward`` in
``torch.utils.checkpoint`` (non-reentrant), which the compiled region traces as a
checkpointed subgraph, so ``model.checkpoint_every`` keeps its meaning. ZeRO-3's parameter
hooks are registered on the layer and its submodules and are excluded from tracing by
DeepSpeed (``torch.compiler.disable``): they still gather and release every submodule's
weights, at the price of a graph break around each hooked submodule, so under ZeRO-3 the
fused regions are the elementwise chains between the Linear layers only.

Shapes: token-budget micro-batches give every micro-step a different row length (and, with
flash varlen attention, a different number of samples). ``dynamic=True`` compiles the layer
once with a symbolic length instead of once per length. Duck shaping is switched off while the
layers trace: with it, a first row whose length equals the hidden size (4096 tokens on
Janus-Pro-7B, 64 on the tiny model) shares one symbol with the hidden size, the weights'
broadcast then pins that symbol to a constant and every other length recompiles. What remains
is one compilation per attention variant HF chooses outside the layer: a row holding a single
unpadded sample gets no mask (the causal fast path), a packed row a block-causal one
(tests/test_compile.py counts the compilations over micro-steps of varying length).
"""

from __future__ import annotations

import logging

from torch import nn

from janus_train import compat

logger = logging.getLogger(__name__)

COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


def check_compile_backend(backend: str, field: str = "model.compile_backend") -> None:
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"{field}={backend!r}: use one of {', '.join(COMPILE_BACKENDS)}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The LLM's decoder layers of a ``JanusForConditionalGeneration``."""
    return model.model.language_model.layers


def compile_decoder_layers(model: nn.Module, backend: str = "inductor") -> int:
    """Compile every LLM decoder layer in place (``layer.compile``, parameters untouched: the
    module tree, its names and state dict stay as they are for DeepSpeed, freezing, LoRA and the
    export). Returns the number of layers compiled."""
    check_compile_backend(backend)
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
        compat.wrap_compiled_call(layer, _without_duck_shapes)
    logger.info("torch.compile: %d decoder layers (backend %s, dynamic)", len(layers), backend)
    return len(layers)


def _without_duck_shapes(fn):
    """``fn`` run with duck shaping off (read when dynamo traces, i.e. on a first call or a
    recompilation; a dictionary update otherwise)."""

    def call(*args, **kwargs):
        with compat.without_duck_shapes():
            return fn(*args, **kwargs)

    return call
