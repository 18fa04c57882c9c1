"""Tokenizer and processor helpers: Janus special tokens resolved by string, and a tiny local
tokenizer for tests and the demo (nothing is ever downloaded).

The special-token ids differ between checkpoints (spec §2, §7), so every id the code uses comes
from :func:`resolve_special_tokens`, which looks each token up by its string and fails loudly when
one is missing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

IMAGE_TOKEN = "<image_placeholder>"
BOI_TOKEN = "<begin_of_image>"
EOI_TOKEN = "<end_of_image>"
PAD_TOKEN = "<｜▁pad▁｜>"
BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"

JANUS_SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN)


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the Janus special tokens in one tokenizer."""

    bos: int
    eos: int
    pad: int
    image: int
    boi: int
    eoi: int


def resolve_special_tokens(tokenizer) -> SpecialTokens:
    """Look every Janus special token up by its string; raise naming any that is missing."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in JANUS_SPECIAL_TOKENS if t not in vocab]
    if missing:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"tokenizer {name!r} lacks the Janus special tokens {missing}")
    return SpecialTokens(
        bos=vocab[BOS_TOKEN],
        eos=vocab[EOS_TOKEN],
        pad=vocab[PAD_TOKEN],
        image=vocab[IMAGE_TOKEN],
        boi=vocab[BOI_TOKEN],
        eoi=vocab[EOI_TOKEN],
    )


def _default_corpus() -> list[str]:
    words = (
        "a an the red green blue yellow purple orange white black circle square triangle star "
        "left right top bottom center small large one two three four five image picture shows "
        "there is are of in on and with what color shape how many where describe detail answer "
        "User Assistant <|User|> <|Assistant|> You are a helpful language and vision assistant. "
        "able to understand visual content that user provides assist variety tasks natural "
        "language Describe the image in detail."
    )
    return [words] * 4 + [" ".join(words.split()[i::3]) for i in range(3)]


def train_tiny_tokenizer(
    out_dir: str | os.PathLike,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 512,
    image_size: int = 32,
    num_image_tokens: int = 16,
):
    """Train a byte-level BPE tokenizer locally and save it, with a JanusProcessor, to `out_dir`.

    The result loads with ``AutoTokenizer.from_pretrained(out_dir)`` and
    ``JanusProcessor.from_pretrained(out_dir)``; it has every Janus special token.
    Returns the processor.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import JanusProcessor, PreTrainedTokenizerFast
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(JANUS_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) if corpus is not None else _default_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN},
        padding_side="left",
        add_bos_token=True,
    )
    image_processor = JanusImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = JanusProcessor(
        image_processor=image_processor, tokenizer=fast, num_image_tokens=num_image_tokens
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(out_dir)
    return processor
