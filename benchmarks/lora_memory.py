"""GPU memory estimate (arithmetic, no GPU) of a LoRA fine-tuning experiment on one GPU:
parameter counts from the real model built on the meta device with the experiment's adapters
(``apply_freeze``'s own report), bytes per parameter as DeepSpeed ZeRO-2 + bf16 holds them, and
activation terms for one token-budget micro-step with gradient checkpointing.

    python benchmarks/lora_memory.py [experiment=janus_pro_7b_lora_sft_1gpu] [override ...]

Assumptions (each one a line of the printed table):
* DeepSpeed casts every parameter to bf16 before moving the module to the GPU: frozen weights
  cost 2 bytes each, nothing else.
* Trainable parameters (adapters and fully trained groups): bf16 weight 2 + bf16 gradient 2 +
  fp32 master 4 + AdamW moments 8 + fp32 gradient partition 4 = 20 bytes (ZeRO-2 on one rank
  partitions nothing).
* Activations, one micro-step = one packed row of ``train.tokens_per_micro`` tokens T, gradient
  checkpointing per decoder layer: the layer inputs T x d (bf16) for every layer, plus one
  layer's recomputed intermediates (q, k, v, attention out, gate, up, act, product, the adapters'
  dropout copies of their inputs) and its gradients (x 2).
* Text logits only on supervised positions (``JanusTrainModel``): worst case every token of the
  row supervised, fp32 logits + their gradient + the bf16 logits.
* SigLIP: the row's images (T / (image tokens + 2)) through 24 layers, ~24 saved tensors of
  576 x width per layer in bf16 (no checkpointing assumed: an upper bound).
* CUDA context, cuBLAS workspaces and allocator fragmentation: a flat 6 GB.
"""

from __future__ import annotations

import tempfile

GB = 1e9


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "overrides",
        nargs="*",
        default=["experiment=janus_pro_7b_lora_sft_1gpu"],
        help="Hydra overrides of the experiment to estimate (default: %(default)s)",
    )
    overrides = ap.parse_args(argv).overrides

    import torch

    from janus_train.config import compose, to_run_config
    from janus_train.model.build import build_janus_config
    from janus_train.model.freeze import apply_freeze
    from janus_train.model.tokenizer import train_tiny_tokenizer

    run = to_run_config(compose(overrides))
    m = run.model
    with tempfile.TemporaryDirectory() as tmp:
        # special-token ids only: the vocabulary size comes from the model config (102400)
        tok = train_tiny_tokenizer(
            tmp, image_size=m.image_size, num_image_tokens=m.num_image_tokens
        ).tokenizer
    from transformers import JanusForConditionalGeneration

    with torch.device("meta"):
        janus = JanusForConditionalGeneration(build_janus_config(m, tok))
    report = apply_freeze(janus, run.trainable_groups, m.lora)
    frozen = sum(g["frozen"] for g in report.values())
    trainable = sum(g["trainable"] for g in report.values())
    adapter = sum(g.get("adapter", 0) for g in report.values())

    d, L, ff = m.text.hidden_size, m.text.num_hidden_layers, m.text.intermediate_size
    T = run.train.tokens_per_micro
    n_img = m.num_image_tokens
    vocab = max(m.text.vocab_size, len(tok))
    rows = [
        ("frozen weights, bf16 (2 B)", frozen, 2 * frozen),
        (
            "trainable: bf16 weight + bf16 grad + fp32 master + Adam m, v + fp32 grad (20 B)",
            trainable,
            20 * trainable,
        ),
        ("LLM layer inputs kept by checkpointing: L x T x d x 2 B", None, L * T * d * 2),
        (
            "one layer recomputed + its gradients: 2 x T x (8 d + 4 ff) x 2 B",
            None,
            2 * T * (8 * d + 4 * ff) * 2,
        ),
        ("text logits, all T supervised: T x vocab x (4 + 4 + 2) B", None, T * vocab * 10),
        (
            "SigLIP, T / (N+2) images: 24 layers x 24 x N x 1024 x 2 B",
            None,
            (T // (n_img + 2)) * 24 * 24 * n_img * m.vision.hidden_size * 2,
        ),
        ("CUDA context, workspaces, fragmentation", None, 6 * GB),
    ]
    total = sum(r[2] for r in rows)
    print(
        f"{run.experiment.name} ({' '.join(overrides)}): {run.model.name}, LoRA r={m.lora.r} on "
        f"{m.lora.groups}, ZeRO-{run.deepspeed.zero_stage}, tokens_per_micro={T}, "
        f"gradient_checkpointing={m.gradient_checkpointing}"
    )
    print(
        f"parameters: {frozen + trainable:,} total, {frozen:,} frozen, {trainable:,} trainable "
        f"of which {adapter:,} in adapters"
    )
    print("\n| term | parameters | GB |\n|---|---|---|")
    for name, n, b in rows:
        print(f"| {name} | {'' if n is None else f'{n:,}'} | {b / GB:.1f} |")
    print(f"| **total** | | **{total / GB:.1f}** |")


if __name__ == "__main__":
    main()
