"""The batch contract, defined once for the data pipeline, the model, the training loop, the
synthetic loader and the benchmarks: the names, the per-sample record, the one collate, the
checks and the counts.

- ``IGNORE``: label / image-code value of unsupervised positions (HF's ignore index).
- ``CODE_FROM_PIXELS``: image-code value meaning "encode this position's code from the sample's
  ``gen_pixel_values`` with the frozen VQ inside the step".
- ``TASKS`` / ``TASK_IDS``: the three tasks in id order (``task_ids`` values, the order of the
  forward's per-task loss sums and token counts); ``RECIPE_TASKS``: the recipes' long names.
- ``task_counts``: the one ratio splitter (largest remainder) of a step's samples into tasks;
  ``FrozenMap``: the read-only, picklable form a ratio or the counts take where they are kept.
- ``TOKEN_KEYS`` / ``IMAGE_KEYS`` / ``REQUIRED_KEYS`` / ``PAD_VALUES``: the batch dict's keys
  and what padding holds; ``check_batch`` refuses a batch that breaks them (one line).
- ``Sample`` --``collate``--> batch dict: the one padding / packing implementation of both
  loaders (``empty_batch``: a micro-batch with nothing to learn).
- ``count_supervised``: a batch's supervised tokens per task, without a forward.
- ``BatchPlan`` / ``plan_batch``: a stage's batch arithmetic (global = micro x accumulation x
  world, or token-budget micro-batches), checked once; every loader and the engine take it.

The batch dict (``JanusTrainModel.forward`` consumes it)::

    input_ids       (B, T) long   text token ids; <image_placeholder> where SigLIP features go;
                                  any id (pad) at generation image-code positions
    attention_mask  (B, T) long   1 = real token, 0 = padding
    position_ids    (B, T) long   optional; restarts at 0 for each packed sample. When given,
                                  padding must be on the right and attention is block-causal
                                  per sample (``model.forward.varlen_kwargs``)
    labels          (B, T) long   text target *at* position t (HF convention, unshifted),
                                  IGNORE where unsupervised; predicted by lm_head from t-1
    image_codes     (B, T) long   VQ code used as input at t (generation image positions),
                                  CODE_FROM_PIXELS = "take from gen_pixel_values", IGNORE
                                  elsewhere; every code >= 0 is also the image-head target
                                  predicted from t-1
    task_ids        (B, T) long   TASK_IDS (0 text, 1 understanding, 2 generation), -1 padding
    pixel_values    (N_und, 3, H, W) float (uint8 before ``finish_pixels``)  optional;
                                  understanding images, row-major order
    gen_pixel_values (N_gen, 3, H, W) float (uint8 likewise)  optional; generation images in
                                  [-1, 1], encoded by the frozen VQ when the data carries no
                                  pre-tokenized codes
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

IGNORE = -100
CODE_FROM_PIXELS = -1
TASKS = ("text", "und", "gen")
TASK_IDS = {t: i for i, t in enumerate(TASKS)}
RECIPE_TASKS = {"text": "text", "understanding": "und", "generation": "gen"}
"""A data recipe's task names (``task:`` of a source) -> ``TASKS``, in ``TASKS`` order."""
TIE_ORDER = ("und", "text", "gen")
"""Which task gets a leftover sample first when remainders are equal (und:text 1:1 with one
sample -> und); also the order of a step's slots in ``janus_train.data.mixing``."""


def task_counts(ratio: dict[str, int], total: int) -> dict[str, int]:
    """Largest-remainder apportionment of ``total`` samples by ``ratio`` (ties: ``TIE_ORDER``)."""
    s = sum(ratio[t] for t in TIE_ORDER)
    if s <= 0:
        raise ValueError("ratio: at least one task must have a positive share")
    # integer remainders: float quotas broke exact ties by rounding noise (6:1:3 of 16 gave the
    # extra sample to text, not und)
    counts = {t: total * ratio[t] // s for t in TIE_ORDER}
    remainders = {t: total * ratio[t] % s for t in TIE_ORDER}
    rest = total - sum(counts.values())
    order = sorted(TIE_ORDER, key=lambda t: (-remainders[t], TIE_ORDER.index(t)))
    for t in order[:rest]:
        counts[t] += 1
    return counts


class FrozenMap(Mapping[str, Any]):
    """A read-only mapping that, unlike ``types.MappingProxyType``, pickles and deep-copies (and
    so goes through ``dataclasses.asdict``); equal to any mapping of the same items."""

    __slots__ = ("view",)

    def __init__(self, items: Mapping[str, Any]) -> None:
        object.__setattr__(self, "view", MappingProxyType(dict(items)))

    def __getitem__(self, key: str) -> Any:
        return self.view[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.view)

    def __len__(self) -> int:
        return len(self.view)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __reduce__(self):
        return type(self), (dict(self.view),)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self.view)!r})"


TOKEN_KEYS = ("input_ids", "attention_mask", "position_ids", "labels", "image_codes", "task_ids")
"""(B, T) long tensors of a batch, in this order."""
REQUIRED_KEYS = ("input_ids", "attention_mask", "labels", "image_codes", "task_ids")
"""Keys every batch has; ``position_ids`` and the ``IMAGE_KEYS`` are optional."""
IMAGE_KEYS = ("pixel_values", "gen_pixel_values")
"""(N, 3, H, W) image tensors: understanding images, generation images (row-major order)."""
PAD_VALUES = {
    "attention_mask": 0,
    "position_ids": 0,
    "labels": IGNORE,
    "image_codes": IGNORE,
    "task_ids": -1,
}
"""What right padding holds per token key (``input_ids``: the tokenizer's pad id)."""


def check_batch(batch: dict) -> dict:
    """Refuse a batch that breaks the contract (a missing or unknown key, a token tensor that is
    not (B, T) long like ``input_ids``, an image tensor not (N, 3, H, W)) with a one-line
    error; returns the batch. Shapes and dtypes only: O(1), cheap enough for every step."""
    missing = [k for k in REQUIRED_KEYS if k not in batch]
    unknown = sorted(k for k in batch if k not in TOKEN_KEYS + IMAGE_KEYS)
    if missing or unknown:
        raise ValueError(
            f"batch keys: missing {missing}, unknown {unknown} (contract: janus_train/batch.py)"
        )
    shape = tuple(batch["input_ids"].shape)
    for k in TOKEN_KEYS:
        x = batch.get(k)
        if x is not None and (len(shape) != 2 or tuple(x.shape) != shape or x.dtype != torch.long):
            raise ValueError(
                f"batch[{k!r}]: {tuple(x.shape)} {x.dtype}, expected (B, T) = {shape} torch.int64"
            )
    for k in IMAGE_KEYS:
        x = batch.get(k)
        if x is not None and (x.dim() != 4 or x.shape[1] != 3):
            raise ValueError(f"batch[{k!r}]: shape {tuple(x.shape)}, expected (N, 3, H, W)")
    return batch


@dataclass
class Sample:
    """One training sample before collate, as the sample builders (and the synthetic loader)
    write it: token fields of equal length (lists or 1-D tensors), unpadded."""

    input_ids: Sequence[int]
    labels: Sequence[int]
    task: str
    """One of ``TASKS``."""
    image_codes: Sequence[int] | None = None
    """None: no image positions (all IGNORE)."""
    und_images: list = field(default_factory=list)
    """Understanding images in marker order ((S, S, 3) uint8 arrays from the data builders)."""
    gen_image: object | None = None
    """The generation image (when the codes are CODE_FROM_PIXELS)."""
    key: str = ""


StackImages = Callable[[str, list], "torch.Tensor | None"]
"""``(key, images in row-major order) -> (N, 3, H, W) tensor``, or None to leave ``key`` out."""


def stack_tensors(key: str, images: list) -> torch.Tensor | None:  # noqa: ARG001
    """The default ``StackImages``: (3, H, W) tensors stacked; no key when there are none."""
    return torch.stack(images) if images else None


def collate(
    rows: Sequence[Sequence[Sample]],
    pad_id: int,
    stack_images: StackImages = stack_tensors,
    *,
    length: int | None = None,
    pad_to_multiple_of: int = 1,
    position_ids: bool = True,
) -> dict[str, torch.Tensor]:
    """Rows of samples -> the batch dict, right-padded with ``pad_id`` / ``PAD_VALUES``.

    ``rows[i]``: the samples of batch row ``i``, laid end to end (one sample per row unless
    packed); ``position_ids`` restart at 0 for each sample (``position_ids=False``: left out,
    the model then counts positions per row). ``T`` = ``length`` when given (every row must
    fit), else the longest row rounded up to ``pad_to_multiple_of``. Images go through
    ``stack_images`` in row-major order."""
    lengths = [sum(len(s.input_ids) for s in row) for row in rows]
    longest = max(lengths, default=0)
    T = length if length is not None else -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    if longest > T:
        raise ValueError(f"a row of {longest} tokens does not fit the batch length {T}")
    B = len(rows)
    # numpy slice assignment from lists: one conversion per sample and field (cheaper than torch)
    out = {"input_ids": np.full((B, T), pad_id, dtype=np.int64)}
    out.update({k: np.full((B, T), v, dtype=np.int64) for k, v in PAD_VALUES.items()})
    images: dict[str, list] = {k: [] for k in IMAGE_KEYS}
    for i, row in enumerate(rows):
        a = 0
        for s in row:
            n = len(s.input_ids)
            out["input_ids"][i, a : a + n] = s.input_ids
            out["attention_mask"][i, a : a + n] = 1
            out["position_ids"][i, a : a + n] = np.arange(n)
            out["labels"][i, a : a + n] = s.labels
            if s.image_codes is not None:
                out["image_codes"][i, a : a + n] = s.image_codes
            out["task_ids"][i, a : a + n] = TASK_IDS[s.task]
            images["pixel_values"].extend(s.und_images)
            if s.gen_image is not None:
                images["gen_pixel_values"].append(s.gen_image)
            a += n
    batch = {k: torch.from_numpy(out[k]) for k in TOKEN_KEYS if position_ids or k != "position_ids"}
    for k in IMAGE_KEYS:
        x = stack_images(k, images[k])
        if x is not None:
            batch[k] = x
    return batch


def empty_batch(pad_id: int, image_size: int, dtype: torch.dtype = torch.float32) -> dict:
    """A micro-batch with nothing to learn: one pad token, no images ((0, 3, S, S) of
    ``dtype``). The forward still calls every module on its zero-weighted dummies (ZeRO-3's
    gathers stay in step) and its loss and gradient contributions are exactly zero."""
    no_images = lambda _k, _xs: torch.zeros((0, 3, image_size, image_size), dtype=dtype)  # noqa: E731
    return collate([[]], pad_id, no_images, length=1)


def count_supervised(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Supervised tokens per task, (3,) long in ``TASKS`` order, computed from the batch alone
    (no forward), so a trainer can all-reduce the step's counts before any backward. A target
    at t is predicted from t-1, so position 0 is never counted."""
    labels, codes, task = batch["labels"], batch["image_codes"], batch["task_ids"]
    text_sup = labels[:, 1:] != IGNORE
    img_sup = codes[:, 1:] != IGNORE
    t = task[:, 1:]
    return torch.stack(
        [
            (text_sup & (t == TASK_IDS["text"])).sum(),
            (text_sup & (t == TASK_IDS["und"])).sum(),
            (text_sup & (t == TASK_IDS["gen"])).sum() + img_sup.sum(),
        ]
    )


@dataclass(frozen=True)
class BatchPlan:
    """Batch arithmetic of one stage: global = micro x grad_accum x world; with token-budget
    micro-batches (``tokens_per_micro`` > 0) micro and grad_accum are DeepSpeed's nominal
    values only (the loop sets each step's accumulation boundary itself)."""

    global_batch_size: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    tokens_per_micro: int = 0

    @property
    def loss_scale(self) -> float:
        """Undoes DeepSpeed's 1/world gradient averaging (backwards run unscaled by the
        accumulation steps; ``janus_train.trainer.distributed``'s docstring)."""
        return float(self.world_size)


def plan_batch(
    global_batch_size: int, micro_batch_size: int, world_size: int, tokens_per_micro: int = 0
) -> BatchPlan:
    """Derive gradient accumulation; ``ValueError`` naming the fields when it does not divide.
    Token-budget mode: any global batch; nominal accumulation ceil(G / world), at least 2
    (DeepSpeed's offload path accumulates only when it expects more than one micro-step)."""
    if tokens_per_micro:
        return BatchPlan(
            global_batch_size,
            1,
            max(2, -(-global_batch_size // world_size)),
            world_size,
            tokens_per_micro,
        )
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise ValueError(
            f"global batch {global_batch_size} is not a multiple of train.micro_batch_size "
            f"({micro_batch_size}) x world size ({world_size}) = {per_step}; change "
            f"experiment.<stage>.global_batch_size or the micro-batch"
        )
    return BatchPlan(global_batch_size, micro_batch_size, global_batch_size // per_step, world_size)
