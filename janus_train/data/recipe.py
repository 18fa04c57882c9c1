"""Data recipes: named YAML mixtures of shard sources, validated before anything starts.

A recipe lists sources; each has a task (``text`` | ``understanding`` | ``generation``), a shard
format, shard patterns, a weight that splits its task's share of every step among that task's
sources, and an optional active step range ``[start, end)``. Patterns expand braces
(``shard-{000000..000099}.tar``), ``${VAR}`` / ``${VAR:-default}`` environment variables and
local globs; ``pipe:`` commands and URLs are remote and only checked for syntax. Every error is
one line naming the recipe file and the key.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# recipe task name -> key of ``TaskRatio`` and of the batch contract's task names
from janus_train.batch import RECIPE_TASKS as TASK_KEYS

RECIPE_DIR = Path(
    os.environ.get("JANUS_DATA_RECIPES", Path(__file__).resolve().parents[2] / "data_recipes")
)
FORMATS = {
    "caption": ("understanding", "generation"),
    "conversation": ("understanding", "text"),
    "text": ("text",),
    "class_label": ("generation",),
}
"""Shard format -> tasks it can feed (docs/data.md describes each format's members)."""
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://")

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass
class Source:
    """One named shard source of a recipe."""

    name: str
    task: str
    """``text`` | ``understanding`` | ``generation``."""
    format: str
    """``caption`` | ``conversation`` | ``text`` | ``class_label``."""
    shards: list[str]
    """Expanded shard URLs (local paths, ``pipe:`` commands, URLs), in recipe order."""
    weight: float = 1.0
    steps: tuple[int, int] | None = None
    """Active optimizer-step range ``[start, end)``; None = always."""
    class_names: list[str] | None = None
    """``class_label`` sources whose samples carry an integer ``cls``: index -> class name."""

    @property
    def task_key(self) -> str:
        return TASK_KEYS[self.task]

    def active(self, step: int) -> bool:
        return self.steps is None or self.steps[0] <= step < self.steps[1]


@dataclass
class Recipe:
    name: str
    path: str
    sources: list[Source] = field(default_factory=list)

    def sources_for(self, task_key: str) -> list[Source]:
        return [s for s in self.sources if s.task_key == task_key]


def expand_vars(text: str, where: str) -> str:
    """``${VAR}`` and ``${VAR:-default}``; an unset variable without a default is an error."""

    def sub(m: re.Match) -> str:
        val = os.environ.get(m.group(1))
        if val is None or val == "":
            if m.group(2) is None:
                raise ValueError(f"{where}: environment variable {m.group(1)} is not set")
            return m.group(2)
        return val

    return _VAR.sub(sub, text)


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


def expand_shards(
    patterns: str | list[str],
    where: str,
    base: Path | None = None,
    check: bool = True,
    stat_shards: bool = True,
) -> list[str]:
    """Brace-, variable- and glob-expand shard patterns; local shards must exist (``check``).

    ``stat_shards=False``: expand the same way but stat only the first shard of each pattern
    (to resolve it against ``base``), not every shard: for the ranks of a job whose rank 0 (or
    ``launch/pipeline.sh``) checked existence, so a shared filesystem sees one pass per job."""
    from braceexpand import braceexpand

    if isinstance(patterns, str):
        patterns = [patterns]
    out: list[str] = []
    for pat in patterns:
        if not isinstance(pat, str) or not pat:
            raise ValueError(f"{where}: shard pattern must be a non-empty string, got {pat!r}")
        pat = expand_vars(pat, where) if check else pat
        if is_remote(pat) or not check:
            # Braces inside a pipe: command expand like any other pattern (one command per shard).
            out.extend(braceexpand(pat))
            continue
        expanded = list(braceexpand(pat))
        if not stat_shards and not glob.has_magic(pat):
            first = expanded[0]
            if base is not None and not os.path.isabs(first) and not os.path.exists(first):
                out.extend(str(base / p) for p in expanded)
            else:
                out.extend(expanded)
            continue
        for p in expanded:
            if base is not None and not os.path.isabs(p) and not os.path.exists(p):
                cand = base / p
                p = str(cand) if cand.exists() or glob.has_magic(p) else p
            if glob.has_magic(p):
                hits = sorted(glob.glob(p))
                if not hits:
                    raise ValueError(f"{where}: no shard matches {p!r}")
                out.extend(hits)
            elif not os.path.isfile(p):
                raise ValueError(f"{where}: shard {p!r} does not exist")
            else:
                out.append(p)
    if not out:
        raise ValueError(f"{where}: no shards")
    return out


def resolve_recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"data recipe {name_or_path!r} does not exist")
        return p
    cand = RECIPE_DIR / f"{name_or_path}.yaml"
    if not cand.is_file():
        known = sorted(q.stem for q in RECIPE_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"data recipe {name_or_path!r} not found in {RECIPE_DIR} ({known})")
    return cand


def _parse_source(i: int, raw: object, path: Path, check: bool, stat: bool = True) -> Source:
    where0 = f"{path}: sources[{i}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where0}: must be a mapping")
    known = {"name", "task", "format", "shards", "weight", "steps", "class_names"}
    extra = set(raw) - known
    if extra:
        raise ValueError(f"{where0}: unknown key(s) {sorted(extra)} (known: {sorted(known)})")
    name = raw.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"{where0}.name: must be a non-empty string without '/'")
    where = f"{path}: sources[{i}] ({name})"
    task = raw.get("task")
    if task not in TASK_KEYS:
        raise ValueError(f"{where}.task={task!r}: must be one of {tuple(TASK_KEYS)}")
    fmt = raw.get("format")
    if fmt not in FORMATS:
        raise ValueError(f"{where}.format={fmt!r}: must be one of {tuple(FORMATS)}")
    if task not in FORMATS[fmt]:
        raise ValueError(f"{where}.format={fmt!r} cannot feed task {task!r} ({FORMATS[fmt]})")
    weight = raw.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise ValueError(f"{where}.weight={weight!r}: must be a number > 0")
    steps = raw.get("steps")
    if steps is not None:
        ok = (
            isinstance(steps, (list, tuple))
            and len(steps) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) for s in steps)
            and 0 <= steps[0] < steps[1]
        )
        if not ok:
            raise ValueError(
                f"{where}.steps={steps!r}: must be [start, end) ints, 0 <= start < end"
            )
        steps = (steps[0], steps[1])
    if "shards" not in raw:
        raise ValueError(f"{where}.shards: missing")
    shards = expand_shards(
        raw["shards"], f"{where}.shards", base=path.parent, check=check, stat_shards=stat
    )
    class_names = None
    if raw.get("class_names") is not None and check:
        cn = raw["class_names"]
        cn_path = Path(expand_vars(str(cn), f"{where}.class_names"))
        if not cn_path.is_absolute() and not cn_path.exists():
            cn_path = path.parent / cn_path
        if not cn_path.is_file():
            raise ValueError(f"{where}.class_names: file {str(cn_path)!r} does not exist")
        class_names = [ln.strip() for ln in cn_path.read_text().splitlines() if ln.strip()]
    return Source(name, task, fmt, shards, float(weight), steps, class_names)


def load_recipe(name_or_path: str, check_shards: bool = True, stat_shards: bool = True) -> Recipe:
    """Load and validate a recipe (a name in ``data_recipes/`` or a YAML path).

    ``check_shards=False`` validates everything but shard existence and environment variables
    (for checking shipped recipes whose data is not on this machine). ``stat_shards=False``
    expands shards fully but does not stat each one (see :func:`expand_shards`).

    Raises ``ValueError`` / ``FileNotFoundError`` with one line naming the file and the key.
    """
    path = resolve_recipe_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: must be a mapping with 'sources'")
    extra = set(raw) - {"name", "description", "sources"}
    if extra:
        raise ValueError(
            f"{path}: unknown key(s) {sorted(extra)} (known: name, description, sources)"
        )
    srcs = raw.get("sources")
    if not isinstance(srcs, list) or not srcs:
        raise ValueError(f"{path}: sources: must be a non-empty list")
    sources = [_parse_source(i, s, path, check_shards, stat_shards) for i, s in enumerate(srcs)]
    names = [s.name for s in sources]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{path}: sources: duplicate names {dup}")
    return Recipe(name=str(raw.get("name") or path.stem), path=str(path), sources=sources)


def check_recipe_for_stage(recipe: Recipe, ratio: dict[str, int], steps: int) -> None:
    """Every task with a positive share must have an active source at every step of the stage."""
    for key, n in ratio.items():
        if n <= 0:
            continue
        srcs = recipe.sources_for(key)
        if not srcs:
            raise ValueError(f"{recipe.path}: sources: no source for task {key!r} (ratio {n} > 0)")
        bounds = {0, steps - 1} | {b for s in srcs if s.steps for b in s.steps if b < steps}
        for b in sorted(bounds):
            if not any(s.active(b) for s in srcs):
                raise ValueError(
                    f"{recipe.path}: sources: no {key!r} source is active at step {b}"
                    " (check the sources' steps ranges)"
                )
