"""The typed schema of a data recipe file, read with OmegaConf structured configs.

```
YAML --old ${VAR:-default} / ${VAR} refused--> dict
     --merge into OmegaConf.structured(RecipeSchema) (unknown keys, types, enums, per source)
     --resolve ${oc.env:VAR} / ${oc.env:VAR,default} (the resolver conf/ uses), MISSING refused
     --> RecipeSchema dataclasses
```

Every OmegaConf error becomes one ``ValueError`` line naming the recipe file and the full key
path (``r.yaml: sources[2].weight: Value 'abc' of type 'str' could not be converted to Float``),
so the entry points report it like any config error (exit 2). What OmegaConf cannot check
(a format fits its task, weights > 0, step ranges, shard existence) is in
``janus_train.data.recipe``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    GrammarParseError,
    InterpolationResolutionError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from janus_train.batch import RECIPE_TASKS

FORMATS = {
    "caption": ("understanding", "generation"),
    "conversation": ("understanding", "text"),
    "text": ("text",),
    "class_label": ("generation",),
}
"""Shard format -> tasks it can feed (docs/data.md describes each format's members)."""

# str-valued enums: OmegaConf refuses any other name with the list of allowed ones
RecipeTask = Enum("RecipeTask", {t: t for t in RECIPE_TASKS}, type=str)
ShardFormat = Enum("ShardFormat", {f: f for f in FORMATS}, type=str)


@dataclass
class SourceSchema:
    """One source of a recipe, as written in the YAML file."""

    name: str = MISSING
    """Unique in the recipe, without '/': counters are ``samples/<name>``,
    ``skipped/<name>/<reason>``."""
    task: RecipeTask = MISSING
    """``text`` | ``understanding`` | ``generation`` (``janus_train.batch.RECIPE_TASKS``)."""
    format: ShardFormat = MISSING
    """``caption`` | ``conversation`` | ``text`` | ``class_label``; must fit the task."""
    shards: Any = MISSING
    """A pattern or a list of patterns (OmegaConf 2.3 cannot type this union: checked by
    ``janus_train.data.recipe``): braces, globs, ``pipe:`` commands, URLs."""
    weight: float = 1.0
    """> 0: splits the task's share of every step among the task's sources."""
    steps: list[int] | None = None
    """Active optimizer-step range ``[start, end)``; None: always."""
    class_names: str | None = None
    """File of class names (one per line) for ``class_label`` records carrying only ``cls``."""
    sample_tokens: list[int] | None = None
    """Length distribution of the source's built samples (tokens, image positions included),
    as equally spaced quantiles from the shortest to the longest: ``[lo, hi]`` is uniform
    between them, 11 values are deciles. Read only by ``janus-plan``'s busiest-rank
    simulation; ``janus-data inspect --lengths`` measures it. None: the planner's default for
    the task (``janus_train.plan.simulate.default_lengths``)."""


@dataclass
class RecipeSchema:
    """A data recipe file (``data_recipes/*.yaml``)."""

    name: str | None = None
    """Default: the file's stem."""
    description: str | None = None
    sources: list[SourceSchema] = MISSING


# ${VAR:-default} (the shell's form this loader once accepted) and a bare ${VAR} of an
# upper-case name (an environment variable by convention: no recipe key is upper-case)
_OLD_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-([^}]*)\}|\$\{([A-Z_][A-Z0-9_]*)\}")
_UNSET_ENV = re.compile(r"Environment variable '([^']+)' not found")
# characters an unquoted resolver argument may hold (OmegaConf's grammar); others need quotes
_PLAIN_ARG = re.compile(r"[\w/.\-+%*@?|]*")


def _replacement(m: re.Match) -> str:
    if m.group(3) is not None:
        return f"${{oc.env:{m.group(3)}}}"
    default = m.group(2)
    if not _PLAIN_ARG.fullmatch(default):
        quoted = default.replace("'", "\\'")
        default = f"'{quoted}'"
    return f"${{oc.env:{m.group(1)},{default}}}"


def _refuse_old_env_syntax(node: Any, path: Path, key: str = "") -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _refuse_old_env_syntax(v, path, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _refuse_old_env_syntax(v, path, f"{key}[{i}]")
    elif isinstance(node, str) and (m := _OLD_ENV.search(node)):
        raise ValueError(f"{path}: {key}: {m.group(0)} is not recipe syntax; use {_replacement(m)}")


def _join(prefix: str, key: str) -> str:
    if not prefix or not key:
        return prefix or key
    return prefix + key if key.startswith("[") else f"{prefix}.{key}"


def _message(e: OmegaConfBaseException, schema: type) -> str:
    msg = (getattr(e, "msg", None) or str(e)).strip().splitlines()[0]
    if isinstance(e, MissingMandatoryValue):
        return "missing (required)"
    if isinstance(e, ConfigKeyError) and msg.startswith("Key "):
        known = ", ".join(f.name for f in fields(schema))
        return f"unknown key (known: {known})"
    if isinstance(e, GrammarParseError):
        return f"invalid interpolation ({msg})"
    if "is not a ListConfig, list or tuple" in msg:
        return "must be a list"
    m = _UNSET_ENV.search(msg)
    if isinstance(e, InterpolationResolutionError) and m:
        var = m.group(1)
        return f"environment variable {var} is not set (or give a default: ${{oc.env:{var},...}})"
    return msg


def _oc(fn, path: Path, prefix: str = "", schema: type = RecipeSchema):
    """``fn()``, with an OmegaConf error turned into one line naming the file and the key."""
    try:
        return fn()
    except OmegaConfBaseException as e:
        key = _join(prefix, getattr(e, "full_key", "") or "")
        where = f"{path}: {key}" if key else str(path)
        raise ValueError(f"{where}: {_message(e, schema)}") from None


def _keep_unset_env_raw(parent: DictConfig | ListConfig, key: str | int) -> None:
    """Leave ``parent[key]`` as its literal text when it names an unset environment variable
    without a default (``load_recipe(check_shards=False)``: shard patterns and class names on
    a machine without the data); a list is handled item by item."""
    raw = OmegaConf.to_container(parent, resolve=False)[key]
    if isinstance(raw, list):
        for j in range(len(raw)):
            _keep_unset_env_raw(parent[key], j)
        return
    try:
        parent[key]
    except InterpolationResolutionError as e:
        if not _UNSET_ENV.search(str(e)):
            raise
        # OmegaConf's escape: "\\${" reads back as a literal "${"
        parent[key] = str(raw).replace("${", "\\${")


def read_recipe_file(path: Path, require_env: bool = True) -> RecipeSchema:
    """Parse, type-check and resolve a recipe file; ``ValueError`` (one line) when invalid.

    ``require_env=False``: a ``shards`` or ``class_names`` value naming an unset environment
    variable without a default is kept as its literal ``${oc.env:...}`` text instead of
    refused (every other key is still resolved and type-checked)."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: must be a mapping with 'sources'")
    _refuse_old_env_syntax(raw, path)
    sources = raw.get("sources")
    if not isinstance(sources, list) or not sources:
        raise ValueError(f"{path}: sources: must be a non-empty list")
    # Sources are merged one by one first: a merge error's key is relative to the element,
    # and only here is its index known.
    for i, src in enumerate(sources):
        if not isinstance(src, dict):
            raise ValueError(f"{path}: sources[{i}]: must be a mapping")
        _oc(
            lambda src=src: OmegaConf.merge(OmegaConf.structured(SourceSchema), src),
            path,
            f"sources[{i}]",
            SourceSchema,
        )
    cfg = _oc(lambda: OmegaConf.merge(OmegaConf.structured(RecipeSchema), raw), path)
    if not require_env:
        for src in cfg.sources:
            for key in ("shards", "class_names"):
                _oc(lambda src=src, key=key: _keep_unset_env_raw(src, key), path)
    return _oc(lambda: OmegaConf.to_object(cfg), path)
