"""LoRA adapters (peft) on the project's module groups: injection, merge and adapter export.

Adapters are injected *into* the existing ``JanusForConditionalGeneration`` with peft's
``inject_adapter_in_model`` (never a ``PeftModel`` wrapper), so every code path that reaches
``model.model.language_model``, ``lm_head`` or ``generation_head`` keeps working: a targeted
``nn.Linear`` becomes a peft ``lora.Linear`` at the same path whose forward is
``base(x) + (alpha / r) * B(A(dropout(x)))``. Which parameters train is decided afterwards by
:func:`janus_train.model.freeze.apply_freeze`: adapters in ``model.lora.groups``, every
parameter of the stage's other trainable groups, nothing else.

The export works on a consolidated full state dict (ZeRO-3 gathered, fp32) and never on the
live modules' tensors: :func:`merge_lora_state_dict` folds ``B @ A`` into each base weight and
returns plain HF names; :func:`save_adapter` writes the unmerged adapters in peft's layout, with
the fully trained groups as ``modules_to_save``, so ``PeftModel.from_pretrained(<init model>,
adapter/)`` rebuilds the trained model.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from janus_train.model.config import LoraConfig
from janus_train.model.groups import GROUPS

ADAPTER = "default"  # peft's adapter name inside the live modules
# Groups that may carry adapters (gen_embeddings is an Embedding; the VQ never trains).
LORA_GROUPS = ("llm", "und_encoder", "und_adaptor", "gen_adaptor", "gen_head")
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llm": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "und_encoder": ["q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2"],
    "und_adaptor": ["fc1", "hidden_layers"],
    "gen_adaptor": ["fc1", "hidden_layers"],
    "gen_head": ["proj_out", "vision_head"],
}
INITS = {"default": True, "gaussian": "gaussian", "random": False}


def validate_lora(cfg: LoraConfig, trainable: list[str], where: str = "model.lora") -> None:
    """Raise ``ValueError`` naming the field for a config that cannot work (no model needed)."""
    if not cfg.enabled:
        return
    if not cfg.groups:
        raise ValueError(f"{where}.groups is empty: name the groups that train through adapters")
    for g in cfg.groups:
        if g == "vq":
            raise ValueError(f"{where}.groups: 'vq' never gets adapters (the VQ stays frozen)")
        if g not in LORA_GROUPS:
            raise ValueError(f"{where}.groups: {g!r} cannot take adapters; one of {LORA_GROUPS}")
        if g not in trainable:
            raise ValueError(
                f"{where}.groups: {g!r} is frozen in this stage (stage.trainable={trainable}); "
                f"adapters only go on trainable groups"
            )
    for g in cfg.target_modules:
        if g not in cfg.groups:
            raise ValueError(f"{where}.target_modules.{g}: {g!r} is not in {where}.groups")
        if not cfg.target_modules[g]:
            raise ValueError(f"{where}.target_modules.{g} is empty")
    if cfg.r <= 0:
        raise ValueError(f"{where}.r={cfg.r}: must be > 0")
    if cfg.alpha <= 0:
        raise ValueError(f"{where}.alpha={cfg.alpha}: must be > 0")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"{where}.dropout={cfg.dropout}: must be in [0, 1)")
    if cfg.init not in INITS:
        raise ValueError(f"{where}.init={cfg.init!r}: one of {sorted(INITS)}")


def _matches(rel: str, target: str) -> bool:
    rel = re.sub(r"\.\d+$", "", rel)  # hidden_layers.0 -> hidden_layers
    return rel == target or rel.endswith("." + target)


def target_module_names(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Full paths (in ``model``) of the Linear layers that get adapters; ``ValueError`` naming
    ``model.lora.target_modules.<group>`` for a name that matches no Linear of its group."""
    names: list[str] = []
    for group in cfg.groups:
        targets = cfg.target_modules.get(group) or DEFAULT_TARGETS[group]
        where = f"model.lora.target_modules.{group}"
        hit = dict.fromkeys(targets, 0)
        for root in GROUPS[group]:
            for rel, mod in model.get_submodule(root).named_modules():
                for t in targets:
                    if rel and _matches(rel, t):
                        if not isinstance(mod, nn.Linear):
                            raise ValueError(
                                f"{where}: {t!r} matches {root}.{rel}, a "
                                f"{type(mod).__name__}; adapters go on Linear layers"
                            )
                        names.append(f"{root}.{rel}")
                        hit[t] += 1
        missing = [t for t, n in hit.items() if n == 0]
        if missing:
            raise ValueError(f"{where}: {missing} match no Linear layer in group {group!r}")
    return names


def adapter_param_count(model: nn.Module, cfg: LoraConfig) -> int:
    """Parameters the adapters of ``cfg`` would add to ``model``, r x (in + out) per targeted
    Linear, from the shapes alone (works on the meta device, injects nothing)."""
    layers = [model.get_submodule(n) for n in target_module_names(model, cfg)]
    return sum(cfg.r * (m.in_features + m.out_features) for m in layers)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Path -> peft LoRA layer, for every adapted layer of ``model``."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def is_adapter_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def inject_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Inject adapters into ``model`` in place (idempotent: a model that has them is left
    alone). Returns the adapted layers' paths. Initialised under ``cfg.seed``: the same adapters
    on every rank, whatever the global RNG."""
    done = lora_layers(model)
    if done:
        return sorted(done)
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    names = target_module_names(model, cfg)
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=names,
        bias="none",
        init_lora_weights=INITS[cfg.init],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER)
    return sorted(lora_layers(model))


def merge_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict:
    """``sd`` (a full state dict of ``model`` with adapters, e.g. the ZeRO-3 consolidated one)
    with every adapter folded into its base weight, ``W + scaling * B @ A`` (computed in
    float64), under the plain HF names (``q_proj.weight``, not ``q_proj.base_layer.weight``).
    Without adapters ``sd`` comes back unchanged."""
    layers = lora_layers(model)
    if not layers:
        return sd
    out = dict(sd)
    for path, layer in layers.items():
        a = out.pop(f"{path}.lora_A.{ADAPTER}.weight").double()
        b = out.pop(f"{path}.lora_B.{ADAPTER}.weight").double()
        w = out.pop(f"{path}.base_layer.weight")
        out[f"{path}.weight"] = (w.double() + layer.scaling[ADAPTER] * (b @ a)).to(w.dtype)
        if f"{path}.base_layer.bias" in out:
            out[f"{path}.bias"] = out.pop(f"{path}.base_layer.bias")
    left = [k for k in out if ".lora_" in k or ".base_layer." in k]
    if left:
        raise ValueError(f"adapter tensors of unsupported kind left after the merge: {left[:3]}")
    return out


def fully_trained_modules(model: nn.Module) -> list[str]:
    """Module paths of the groups that train without adapters (peft's ``modules_to_save``)."""
    out = []
    for paths in GROUPS.values():
        for path in paths:
            params = model.get_submodule(path).named_parameters()
            if any(p.requires_grad and not is_adapter_param(n) for n, p in params):
                out.append(path)
    return out


def save_adapter(
    model: nn.Module,
    sd: dict[str, torch.Tensor],
    out_dir: str | os.PathLike,
    base_model: str | None = None,
) -> Path:
    """Write the unmerged adapters of ``model`` (values taken from the full state dict ``sd``)
    in peft's layout: ``adapter_config.json`` + ``adapter_model.safetensors``, keys
    ``base_model.model.<path>.lora_{A,B}.weight`` and, for the fully trained groups
    (``modules_to_save``), their full weights. Written to ``<out>.tmp``, then renamed."""
    from peft import LoraConfig as PeftLoraConfig
    from safetensors.torch import save_file

    layers = lora_layers(model)
    pc = model.peft_config[ADAPTER]
    save = fully_trained_modules(model)
    tensors = {}
    for path in layers:
        for ab in ("lora_A", "lora_B"):
            tensors[f"base_model.model.{path}.{ab}.weight"] = sd[f"{path}.{ab}.{ADAPTER}.weight"]
    for key, value in sd.items():  # fully trained groups hold no adapted layer
        if any(key.startswith(p + ".") for p in save):
            tensors[f"base_model.model.{key}"] = value
    cfg = PeftLoraConfig(
        r=pc.r,
        lora_alpha=pc.lora_alpha,
        lora_dropout=pc.lora_dropout,
        target_modules=sorted(layers),
        modules_to_save=save or None,
        bias="none",
        base_model_name_or_path=base_model,
    )
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg.save_pretrained(str(tmp))
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out


def export_lora(
    model: nn.Module, sd: dict[str, torch.Tensor], adapter_dir: str | os.PathLike
) -> dict[str, torch.Tensor]:
    """For the HF export (rank 0, on the consolidated state dict): write ``adapter_dir`` and
    return the merged state dict; a model without adapters returns ``sd`` and writes nothing."""
    if not lora_layers(model):
        return sd
    save_adapter(model, sd, adapter_dir, base_model=getattr(model, "name_or_path", None) or None)
    return merge_lora_state_dict(model, sd)
