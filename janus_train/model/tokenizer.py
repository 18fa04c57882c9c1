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


# Spaces (single, double, leading, trailing), newlines, a tab, accents, CJK and an emoji: what a
# loading path that swaps DeepSeek's byte-level pre-tokenizer for another one loses.
ROUND_TRIP_PROBE = " Hello world,  two  spaces.\nA new line\n\n\tcafé naïve 中文 🙂 end "
TESTED_TRANSFORMERS = ">=5.24,<5.25"
"""The transformers range the project is tested with (pyproject.toml pins the same)."""


def check_tokenizer(tokenizer) -> None:
    """Stop with one line unless `tokenizer` round-trips text and keeps each special token whole.

    Some transformers 5.x loading paths turn DeepSeek's byte-level tokenizer into one that drops
    spaces; training on it would silently corrupt every sample. Checks: ``decode(encode(probe))``
    returns the probe exactly (spaces, newlines, unicode), and every Janus special token encodes
    to its own single id, alone and inside text.
    """
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    hint = f"(tested with transformers{TESTED_TRANSFORMERS}; see docs/fidelity.md)"
    ids = tokenizer.encode(ROUND_TRIP_PROBE, add_special_tokens=False)
    got = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if got != ROUND_TRIP_PROBE:
        raise ValueError(
            f"tokenizer {name!r} does not round-trip text: {ROUND_TRIP_PROBE!r} decodes to "
            f"{got!r} {hint}"
        )
    vocab = tokenizer.get_vocab()
    for tok in JANUS_SPECIAL_TOKENS:
        if tok not in vocab:
            continue  # resolve_special_tokens names missing ones
        alone = tokenizer.encode(tok, add_special_tokens=False)
        inside = tokenizer.encode(f"a{tok}b", add_special_tokens=False)
        if alone != [vocab[tok]] or inside.count(vocab[tok]) != 1:
            raise ValueError(
                f"tokenizer {name!r} splits the special token {tok!r} into {alone} (its id is "
                f"{vocab[tok]}) {hint}"
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
        extra_special_tokens={
            "image_token": IMAGE_TOKEN,
            "boi_token": BOI_TOKEN,
            "eoi_token": EOI_TOKEN,
        },
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
