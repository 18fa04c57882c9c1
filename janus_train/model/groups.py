"""The named module groups of a ``JanusForConditionalGeneration`` (spec §5): the vocabulary of
``stage.trainable`` and ``model.lora.groups``, read by freezing (:mod:`janus_train.model.freeze`)
and adapters (:mod:`janus_train.model.lora`) alike."""

from __future__ import annotations

# group -> attribute paths on JanusForConditionalGeneration
GROUPS: dict[str, tuple[str, ...]] = {
    "und_encoder": ("model.vision_model",),
    "und_adaptor": ("model.aligner",),
    "vq": ("model.vqmodel",),
    "gen_embeddings": ("model.generation_embeddings",),
    "gen_adaptor": ("model.generation_aligner",),
    "gen_head": ("model.generation_head",),
    "llm": ("model.language_model", "lm_head"),
}
NEVER_TRAINABLE = ("vq",)
