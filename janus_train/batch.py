"""The batch contract's shared names, defined once for data, model, sampler-side tools, the
synthetic loader and benchmarks (the full contract: ``janus_train/model/forward.py``).

- ``IGNORE``: label / image-code value of unsupervised positions (HF's ignore index).
- ``CODE_FROM_PIXELS``: image-code value meaning "encode this position's code from the sample's
  ``gen_pixel_values`` with the frozen VQ inside the step".
- ``TASKS`` / ``TASK_IDS``: the three tasks in id order (``task_ids`` values, the order of the
  forward's per-task loss sums and token counts); ``RECIPE_TASKS``: the recipes' long names.
- ``task_counts``: the one ratio splitter (largest remainder) of a step's samples into tasks.
- ``count_supervised``: a batch's supervised tokens per task, without a forward.
"""

from __future__ import annotations

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
