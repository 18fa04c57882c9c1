"""Freezing by named module groups (spec §5): explicit, idempotent, reported.

Every parameter gets ``requires_grad`` set; a group name that is unknown or matches no
parameter, or the VQ tokenizer in a trainable list, is an error. Frozen modules are kept in
eval mode (dropout off) by :func:`set_train_mode`.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from janus_train.model.config import LoraConfig
from janus_train.model.groups import GROUPS, NEVER_TRAINABLE
from janus_train.model.lora import is_adapter_param


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's shape, also once ZeRO-3 has partitioned it (DeepSpeed's ``ds_shape``: the
    tensor itself is then this rank's flat shard, or empty)."""
    return getattr(p, "ds_shape", p.shape)


def full_numel(p: torch.Tensor) -> int:
    return full_shape(p).numel()


def validate_trainable(groups: list[str], where: str = "stage.trainable") -> None:
    """Raise ``ValueError`` naming `where` for unknown groups or the always-frozen VQ."""
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"{where}: unknown module group(s) {unknown}; known: {sorted(GROUPS)}")
    bad = [g for g in groups if g in NEVER_TRAINABLE]
    if bad:
        raise ValueError(f"{where}: {bad} must stay frozen (the VQ tokenizer never trains)")


def group_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    out = {}
    for group, paths in GROUPS.items():
        mods = []
        for path in paths:
            try:
                mods.append(model.get_submodule(path))
            except AttributeError as e:
                raise ValueError(f"model has no module {path!r} for group {group!r}") from e
        out[group] = mods
    return out


def apply_freeze(
    model: nn.Module, trainable: list[str], lora: LoraConfig | None = None
) -> dict[str, dict[str, int]]:
    """Set ``requires_grad`` on every parameter; return per-group trainable/frozen counts
    (with ``lora`` enabled: adapters injected first, their parameters counted as trainable
    and, per group, as ``adapter``)."""
    validate_trainable(trainable)
    lora_groups: set[str] = set()
    if lora is not None and lora.enabled:
        from janus_train.model.lora import inject_lora, validate_lora

        validate_lora(lora, trainable)
        inject_lora(model, lora)
        lora_groups = set(lora.groups)
    owner: dict[int, str] = {}
    for group, mods in group_modules(model).items():
        n = 0
        for mod in mods:
            for p in mod.parameters():
                owner[id(p)] = group
                n += 1
        if n == 0:
            raise ValueError(f"module group {group!r} matches no parameter")
    report = {g: {"trainable": 0, "frozen": 0} for g in GROUPS}
    if lora_groups:
        for g in GROUPS:
            report[g]["adapter"] = 0
    for name, p in model.named_parameters():
        group = owner.get(id(p))
        if group is None:
            raise ValueError(f"parameter {name!r} belongs to no module group")
        adapter = is_adapter_param(name)
        # peft marked only adapters trainable model-wide: every flag is set again here
        p.requires_grad_(adapter or (group in trainable and group not in lora_groups))
        report[group]["trainable" if p.requires_grad else "frozen"] += full_numel(p)
        if adapter:
            report[group]["adapter"] += full_numel(p)
    return report


def set_train_mode(model: nn.Module, trainable: list[str]) -> None:
    """``model.train()`` with every frozen group back in eval mode (no dropout, fixed norms)."""
    model.train()
    for group, mods in group_modules(model).items():
        if group not in trainable:
            for mod in mods:
                mod.eval()


def write_trainable_report(report: dict, path: str | os.PathLike) -> None:
    total_t = sum(v["trainable"] for v in report.values())
    total_f = sum(v["frozen"] for v in report.values())
    data = {**report, "total": {"trainable": total_t, "frozen": total_f}}
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
