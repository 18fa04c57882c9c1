"""Per-task sample builders (pure functions that also write the loss masks) and the data
loader's collate (its packing and image policy over ``janus_train.batch.collate``).

::

    record (key -> bytes) --decode--> caption / conversation / text / class name (+ images, codes)
        --builder--> Sample(input_ids, labels, image_codes, task, und_images, gen_image)
        --collate--> batch dict (janus_train.batch.collate, contract there), padded on the right

Sequences (spec §2, §5; ``U``/``A`` = ``User``/``Assistant`` or ``<|User|>``/``<|Assistant|>``,
IMG = ``<begin_of_image>`` + N x ``<image_placeholder>`` + ``<end_of_image>``, ``[..]`` =
supervised, Q = ``"Describe the image in detail."``). ``und_format`` frames captions and
conversations, ``gen_format`` text-to-image prompts (``stage.*``, per experiment stage):

- caption, plain:  BOS IMG [caption EOS]
- caption, qa:     BOS IMG "\\nQ" [" caption" EOS]
- caption, chat:   BOS (system "\\n\\n") "U: " IMG "\\nQ\\n\\nA:" [" caption" EOS]
  (the question is never supervised)
- conversation, chat: BOS (system "\\n\\n") "U: msg\\n\\nA:" [" answer" EOS] ... ;
  system = ``ctx.system_prompt`` (DeepSeek's by default) unless the conversation has its own
- conversation, plain / qa: BOS "msg" [" answer" EOS] "msg" [" answer" EOS] ... (no roles, no
  system prompt, a record's system turn dropped); the space before an answer is left out
  when the message ends with an image
- in conversations ``<image>`` markers become IMG; with ``sft`` false every text token but
  BOS, the system prompt and IMG is supervised; system and messages are stripped of
  surrounding whitespace, as DeepSeek's template does
- text:            BOS [text EOS] cut into chunks of ``seq_len`` overlapping by one token; a
                   chunk's first token is context only (never predicted across a packed row)
- generation:      BOS prompt BOI [N codes]; prompt = ``caption`` (plain) or ``"U: caption\\n\\nA:"``
  (chat; never a system prompt); CFG dropout turns every token strictly between BOS and BOI
  into pad.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from janus_train.batch import CODE_FROM_PIXELS, IGNORE, IMAGE_KEYS, Sample, collate
from janus_train.data.preprocess import (
    GEN_MEAN,
    GEN_STD,
    IMAGE_EXTS,
    BadSample,
    decode_image,
    decode_json,
    decode_npy,
    decode_text,
    gen_uint8,
    normalize_batch,
    normalize_pixels_,
    stack_uint8,
    und_uint8,
)
from janus_train.model.chat_template import (
    ANSWER_START,
    IMAGE_MARKER,
    ROLES,
    SYSTEM_END,
    SYSTEM_PROMPT,
    user_turn,
)
from janus_train.model.tokenizer import SpecialTokens

QA_QUESTION = "Describe the image in detail."
_SENTENCE = re.compile(r"^(.+?[.!?])(?:\s|$)", re.S)


@dataclass(frozen=True)
class BuildContext:
    """Everything a builder needs; picklable into dataloader workers. Frozen (a variant is
    ``dataclasses.replace(ctx, ...)``)."""

    tokenizer: object
    st: SpecialTokens
    chat_template: str = "janus_pro"
    und_format: str = "plain"
    """Captions and conversations: plain | qa | chat (``config.UndFormat``)."""
    gen_format: str = "plain"
    """Text-to-image prompts: plain | chat (``config.GenFormat``)."""
    sft: bool = False
    seq_len: int = 4096
    text_chunk: int = 0
    """``data.text_chunk``: text chunk length (0: ``seq_len``)."""
    image_size: int = 384
    num_image_tokens: int = 576
    codebook_size: int = 16384
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    cfg_dropout: float = 0.1
    first_sentence_prob: float = 0.0
    system_prompt: str | None = SYSTEM_PROMPT
    """Conversations' default system prompt (None or '': none)."""

    def enc(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    @property
    def roles(self) -> tuple[str, str]:
        return ROLES[self.chat_template]

    def image_block(self) -> list[int]:
        return [self.st.boi] + [self.st.image] * self.num_image_tokens + [self.st.eoi]


class _Seq:
    def __init__(self, bos: int):
        self.ids: list[int] = [bos]
        self.labels: list[int] = [IGNORE]

    def add(self, ids: list[int], supervised: bool) -> None:
        self.ids += ids
        self.labels += ids if supervised else [IGNORE] * len(ids)


def _finish(seq: _Seq, ctx: BuildContext, task: str, images: list[np.ndarray]) -> Sample:
    ids, labels = seq.ids, seq.labels
    if len(ids) > ctx.seq_len:
        ids, labels = ids[: ctx.seq_len], labels[: ctx.seq_len]
        # An image block cut by truncation would misalign features and placeholders.
        if ids.count(ctx.st.image) != len(images) * ctx.num_image_tokens or (
            images and ids[-1] in (ctx.st.boi, ctx.st.image)
        ):
            raise BadSample("too_long", f"{len(seq.ids)} tokens > seq_len {ctx.seq_len}")
    if all(lb == IGNORE for lb in labels[1:]):
        raise BadSample("no_target", "nothing supervised")
    return Sample(ids, labels, task, und_images=images)


def _add_text_with_images(seq: _Seq, ctx: BuildContext, text: str, supervised: bool) -> int:
    """Add `text`, replacing each ``<image>`` marker by the image block; returns marker count."""
    parts = text.split(IMAGE_MARKER)
    for i, part in enumerate(parts):
        if i:
            seq.add(ctx.image_block(), False)
        seq.add(ctx.enc(part), supervised)
    return len(parts) - 1


def build_caption_plain(caption: str, image: np.ndarray, ctx: BuildContext) -> Sample:
    """Stage 1 understanding: ``BOS IMG [caption EOS]``."""
    seq = _Seq(ctx.st.bos)
    seq.add(ctx.image_block(), False)
    seq.add(ctx.enc(caption) + [ctx.st.eos], True)
    return _finish(seq, ctx, "und", [image])


def build_conversation(
    turns: list[tuple[str, str]],
    images: list[np.ndarray],
    ctx: BuildContext,
    task: str,
    mask_user: bool | None = None,
) -> Sample:
    """A chat in the Janus template. ``turns``: (role, text), role in system/user/assistant.

    ``mask_user`` (default ``ctx.sft``): supervise only the assistant answers and their EOS.
    """
    mask_user = ctx.sft if mask_user is None else mask_user
    chat = ctx.und_format == "chat"
    seq = _Seq(ctx.st.bos)
    system = ctx.system_prompt if chat else None
    if turns and turns[0][0] == "system":
        own, turns = turns[0][1], turns[1:]
        system = own if chat else None
    if system and system.strip():
        seq.add(ctx.enc(system.strip() + SYSTEM_END), False)
    markers = 0
    expect = "user"
    answer_start = ANSWER_START
    for role, text in turns:
        if role != expect:
            raise BadSample("bad_conversation", f"expected a {expect} turn, got {role}")
        text = text.strip()
        if role == "user":
            turn = user_turn(ctx.chat_template, text) if chat else text
            markers += _add_text_with_images(seq, ctx, turn, not mask_user)
            # plain: a space between the question's last word and the answer's first (the
            # tokenizer would merge them); none after an image block
            answer_start = ANSWER_START if chat or plain_answer_spaced(text) else ""
            expect = "assistant"
        else:
            if IMAGE_MARKER in text:
                raise BadSample("image_marker_mismatch", "<image> in an assistant turn")
            seq.add(ctx.enc(answer_start + text) + [ctx.st.eos], True)
            expect = "user"
    if markers != len(images):
        raise BadSample("image_marker_mismatch", f"{markers} <image> markers, {len(images)} images")
    return _finish(seq, ctx, task, images)


def plain_answer_spaced(user_text: str) -> bool:
    """In the plain framing an answer starts with a space unless the (stripped) message is
    empty or ends with an image."""
    return bool(user_text) and not user_text.endswith(IMAGE_MARKER)


def build_caption_qa(caption: str, image: np.ndarray, ctx: BuildContext) -> Sample:
    """Stage 2+ understanding: the caption as the answer to the fixed question (masked), in
    ``ctx.und_format``'s framing (qa: no roles, no system prompt; chat: the chat template)."""
    turns = [("user", f"{IMAGE_MARKER}\n{QA_QUESTION}"), ("assistant", caption)]
    return build_conversation(turns, [image], ctx, "und", mask_user=True)


def build_text(text: str, ctx: BuildContext) -> list[Sample]:
    """LM chunks of at most ``text_chunk`` (else ``seq_len``) tokens of ``BOS text EOS``. A
    chunk's first token is
    never a target (packed, it would be predicted from the previous sample in the row), so
    chunks overlap by one token: each token after BOS is a target exactly once, predicted from
    its true predecessor."""
    ids = [ctx.st.bos] + ctx.enc(text) + [ctx.st.eos]
    out = []
    n = min(ctx.text_chunk or ctx.seq_len, ctx.seq_len)
    for i in range(0, max(len(ids) - 1, 1), max(n - 1, 1)):
        chunk = ids[i : i + n]
        if len(chunk) < 2:
            break
        out.append(Sample(chunk, [IGNORE] + chunk[1:], "text"))
    return out


def first_sentence(text: str) -> str:
    m = _SENTENCE.match(text.strip())
    return m.group(1) if m else text.strip()


def build_generation(
    prompt: str,
    ctx: BuildContext,
    rng: random.Random,
    codes: np.ndarray | None = None,
    image: np.ndarray | None = None,
) -> Sample:
    """``BOS prompt BOI [N codes]``; the codes, or ``-1`` slots filled from ``image`` on device."""
    if rng.random() < ctx.first_sentence_prob:
        prompt = first_sentence(prompt)
    uncond = rng.random() < ctx.cfg_dropout
    n = ctx.num_image_tokens
    budget = ctx.seq_len - 2 - n
    if budget < 0:
        raise BadSample("too_long", f"{n} image tokens do not fit seq_len {ctx.seq_len}")
    while True:
        text = prompt if ctx.gen_format == "plain" else user_turn(ctx.chat_template, prompt.strip())
        ptoks = ctx.enc(text)
        if len(ptoks) <= budget or not prompt:
            break
        prompt = prompt[: max(0, int(len(prompt) * budget / len(ptoks)) - 1)]
    if len(ptoks) > budget:
        raise BadSample("too_long", "generation prompt template exceeds seq_len")
    if uncond:
        ptoks = [ctx.st.pad] * len(ptoks)
    ids = [ctx.st.bos] + ptoks + [ctx.st.boi] + [ctx.st.pad] * n
    labels = [IGNORE] * len(ids)
    head = [IGNORE] * (len(ptoks) + 2)
    if codes is not None:
        img_codes = head + [int(c) for c in codes]
        return Sample(ids, labels, "gen", image_codes=img_codes)
    return Sample(ids, labels, "gen", image_codes=head + [CODE_FROM_PIXELS] * n, gen_image=image)


# --------------------------------------------------------------------------- records -> samples


def image_members(members: dict[str, bytes]) -> list[str]:
    """Image member extensions in order: ``jpg`` alone, or ``0.jpg``, ``1.png``, ..."""
    exts = [e for e in members if e.rsplit(".", 1)[-1] in IMAGE_EXTS]
    return sorted(exts, key=lambda e: (len(e), e))


def record_caption(members: dict[str, bytes], key: str = "txt") -> str:
    if key in members:
        cap = decode_text(members[key])
    elif "json" in members:
        meta = decode_json(members["json"])
        cap = meta.get("caption") if isinstance(meta, dict) else None
        if cap is None:
            raise BadSample("missing_key", "no txt member and no caption in json")
        if not isinstance(cap, str):
            raise BadSample("bad_caption", f"caption is {type(cap).__name__}")
    else:
        raise BadSample("missing_key", "no txt member")
    if not cap.strip():
        raise BadSample("empty_caption")
    return cap.strip()


def _codes(members: dict[str, bytes], ctx: BuildContext) -> np.ndarray | None:
    for ext in ("codes.npy", "npy"):
        if ext in members:
            arr = decode_npy(members[ext]).reshape(-1)
            if arr.size != ctx.num_image_tokens:
                raise BadSample("bad_codes", f"{arr.size} codes, expected {ctx.num_image_tokens}")
            if arr.min() < 0 or arr.max() >= ctx.codebook_size:
                raise BadSample("bad_codes", f"codes outside [0, {ctx.codebook_size})")
            return arr.astype(np.int64)
    return None


def record_image(members: dict[str, bytes]) -> bytes:
    exts = image_members(members)
    if not exts:
        raise BadSample("missing_key", "no image member")
    return members[exts[0]]


def record_turns(members: dict[str, bytes]) -> list[tuple[str, str]]:
    if "json" not in members:
        raise BadSample("missing_key", "no json member")
    meta = decode_json(members["json"])
    conv = meta.get("conversations") if isinstance(meta, dict) else meta
    if not isinstance(conv, list) or not conv:
        raise BadSample("bad_conversation", "no conversations list")
    roles = {
        "human": "user",
        "user": "user",
        "gpt": "assistant",
        "assistant": "assistant",
        "system": "system",
    }
    turns = []
    for t in conv:
        if (
            not isinstance(t, dict)
            or not isinstance(t.get("value"), str)
            or t.get("from") not in roles
        ):
            raise BadSample("bad_conversation", "turns need from: human|gpt|system and a str value")
        turns.append((roles[t["from"]], t["value"]))
    return turns


def record_to_samples(
    members: dict[str, bytes],
    fmt: str,
    task: str,
    ctx: BuildContext,
    rng: random.Random,
    class_names: Sequence[str] | None = None,
) -> list[Sample]:
    """Decode one record and build its sample(s); raises ``BadSample`` to skip it."""
    S = ctx.image_size
    if fmt == "text":
        if "txt" not in members:
            raise BadSample("missing_key", "no txt member")
        text = decode_text(members["txt"])
        if not text.strip():
            raise BadSample("empty_text")
        return build_text(text, ctx)
    if fmt == "conversation":
        turns = record_turns(members)
        exts = image_members(members)
        if task == "text" and exts:
            raise BadSample("image_marker_mismatch", "text conversation with images")
        imgs = [und_uint8(decode_image(members[e]), S) for e in exts]
        return [build_conversation(turns, imgs, ctx, "und" if task == "understanding" else "text")]
    if fmt == "caption" and task == "understanding":
        cap = record_caption(members)
        img = und_uint8(decode_image(record_image(members)), S)
        build = build_caption_plain if ctx.und_format == "plain" else build_caption_qa
        return [build(cap, img, ctx)]
    if task == "generation":
        if fmt == "class_label":
            prompt = record_class_name(members, class_names)
        else:
            prompt = record_caption(members)
        codes = _codes(members, ctx)
        img = None if codes is not None else gen_uint8(decode_image(record_image(members)), S)
        return [build_generation(prompt, ctx, rng, codes=codes, image=img)]
    raise BadSample("bad_format", f"format {fmt!r} cannot feed task {task!r}")


def record_class_name(members: dict[str, bytes], class_names: Sequence[str] | None) -> str:
    if "txt" in members:
        name = decode_text(members["txt"]).strip()
    elif "cls" in members and class_names:
        try:
            idx = int(decode_text(members["cls"]).strip())
            name = class_names[idx]
        except (ValueError, IndexError):
            raise BadSample("bad_label", "cls is not a valid class index") from None
    else:
        raise BadSample("missing_key", "no txt (class name) or cls member")
    if not name:
        raise BadSample("empty_caption")
    return name


# --------------------------------------------------------------------------- collate


def pack_rows(samples: list[Sample], seq_len: int) -> list[list[Sample]]:
    """First-fit packing of samples (kept in order within a row) into rows of <= seq_len."""
    rows: list[list[Sample]] = []
    room: list[int] = []
    for s in samples:
        n = len(s.input_ids)
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(s)
                room[r] -= n
                break
        else:
            rows.append([s])
            room.append(seq_len - n)
    return rows


def collate_samples(
    samples: list[Sample],
    ctx: BuildContext,
    pad_to_multiple_of: int = 1,
    pixels_uint8: bool = False,
    pack: bool = False,
    row_len: int | None = None,
) -> dict:
    """The data loader's batch dict (``janus_train.batch.collate``: right-padded,
    ``position_ids`` always), images normalised here or shipped as uint8.

    ``pack``: several samples per row (first fit into ``row_len``, default ``ctx.seq_len``),
    ``position_ids`` restarting at each; images follow the packed layout in row-major order.
    ``pixels_uint8``: ``pixel_values`` / ``gen_pixel_values`` stay (N, 3, S, S) uint8 and
    :func:`finish_pixels` normalises them where the batch lands (the GPU): 4x less host memory
    traffic, no float pass on the loader's CPU.
    """
    rows = pack_rows(samples, row_len or ctx.seq_len) if pack else [[s] for s in samples]
    S = ctx.image_size

    def stack(key: str, xs: list[np.ndarray]) -> torch.Tensor:
        if not xs:
            return torch.zeros((0, 3, S, S), dtype=torch.uint8 if pixels_uint8 else torch.float32)
        if pixels_uint8:
            return stack_uint8(xs)
        return normalize_batch(xs, *_mean_std(key, ctx.mean, ctx.std))

    return collate(rows, ctx.st.pad, stack, pad_to_multiple_of=pad_to_multiple_of)


def _mean_std(key: str, mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Understanding images: the processor's mean/std; generation images: [-1, 1]."""
    return (mean, std) if key == "pixel_values" else (GEN_MEAN, GEN_STD)


def finish_pixels(batch: dict, mean, std) -> dict:
    """Normalise uint8 pixel tensors of a ``pixels_uint8`` batch in place of the batch dict, on
    the tensors' device (``normalize_pixels_``): understanding ``(x / 255 - mean) / std``,
    generation ``x / 127.5 - 1``. Float pixels pass through unchanged."""
    for key in IMAGE_KEYS:
        x = batch.get(key)
        if x is not None and x.dtype == torch.uint8:
            batch[key] = normalize_pixels_(x.float(), *_mean_std(key, mean, std))
    return batch
