"""Data recipes: named YAML mixtures of shard sources, validated before anything starts.

A recipe lists sources; each has a task (``text`` | ``understanding`` | ``generation``), a shard
format, shard patterns, a weight that splits its task's share of every step among that task's
sources, and an optional active step range ``[start, end)``. The file is read against a typed
schema with OmegaConf (``janus_train.data.recipe_schema``: unknown keys, types, task and format
names, ``${oc.env:VAR}`` / ``${oc.env:VAR,default}``); this module adds the checks a schema
cannot make and expands patterns: braces (``shard-{000000..000099}.tar``) and local globs;
``pipe:`` commands and URLs are remote and only checked for syntax. Every error is one line
naming the recipe file and the key.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

# recipe task name -> key of ``TaskRatio`` and of the batch contract's task names
from janus_train.batch import RECIPE_TASKS as TASK_KEYS
from janus_train.data.recipe_schema import FORMATS, SourceSchema, read_recipe_file
from janus_train.data.tario import is_remote

RECIPE_DIR = Path(
    os.environ.get("JANUS_DATA_RECIPES", Path(__file__).resolve().parents[2] / "data_recipes")
)


@dataclass(frozen=True)
class Source:
    """One named shard source of a recipe. Immutable (lists given become tuples), as is
    :class:`Recipe`: a stage's recipe, checked once, cannot drift after ``prepare()``."""

    name: str
    task: str
    """``text`` | ``understanding`` | ``generation``."""
    format: str
    """``caption`` | ``conversation`` | ``text`` | ``class_label``."""
    shards: tuple[str, ...]
    """Expanded shard URLs (local paths, ``pipe:`` commands, URLs), in recipe order."""
    weight: float = 1.0
    steps: tuple[int, int] | None = None
    """Active optimizer-step range ``[start, end)``; None = always."""
    class_names: tuple[str, ...] | None = None
    """``class_label`` sources whose samples carry an integer ``cls``: index -> class name."""
    sample_tokens: tuple[int, ...] | None = None
    """Declared length quantiles of the built samples (``SourceSchema.sample_tokens``)."""

    def __post_init__(self) -> None:
        for name in ("shards", "steps", "class_names", "sample_tokens"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))

    @property
    def task_key(self) -> str:
        return TASK_KEYS[self.task]

    def active(self, step: int) -> bool:
        return self.steps is None or self.steps[0] <= step < self.steps[1]


@dataclass(frozen=True)
class Recipe:
    name: str
    path: str
    sources: tuple[Source, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources))

    def sources_for(self, task_key: str) -> list[Source]:
        return [s for s in self.sources if s.task_key == task_key]


def expand_shards(
    patterns: str | list[str],
    where: str,
    base: Path | None = None,
    check: bool = True,
    stat_shards: bool = True,
) -> list[str]:
    """Brace- and glob-expand shard patterns; local shards must exist (``check``). Environment
    variables are the recipe loader's (``${oc.env:...}``, resolved before this).

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
        if not check and "${" in pat:
            out.append(pat)  # an unset variable left unresolved (load_recipe(check_shards=False))
            continue
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


def _build_source(i: int, spec: SourceSchema, path: Path, check: bool, stat: bool) -> Source:
    """The checks a schema cannot make, then shard expansion."""
    where = f"{path}: sources[{i}]"
    name, task, fmt = spec.name, spec.task.value, spec.format.value
    if not name or "/" in name:
        raise ValueError(f"{where}.name: {name!r} must be non-empty and without '/'")
    if task not in FORMATS[fmt]:
        raise ValueError(
            f"{where}.format: {fmt!r} cannot feed task {task!r} (it feeds "
            f"{' and '.join(FORMATS[fmt])}; source {name})"
        )
    if not spec.weight > 0:
        raise ValueError(f"{where}.weight: {spec.weight!r} must be > 0 (source {name})")
    steps = spec.steps
    if steps is not None:
        if not (len(steps) == 2 and 0 <= steps[0] < steps[1]):
            raise ValueError(
                f"{where}.steps: {steps!r} must be [start, end) ints, 0 <= start < end"
                f" (source {name})"
            )
        steps = (steps[0], steps[1])
    shards = spec.shards
    if not isinstance(shards, (str, list)) or not shards:
        raise ValueError(
            f"{where}.shards: {shards!r} must be a pattern or a non-empty list of patterns"
            f" (source {name})"
        )
    shards = expand_shards(
        shards, f"{where}.shards (source {name})", base=path.parent, check=check, stat_shards=stat
    )
    class_names = None
    if spec.class_names is not None and check:
        cn_path = Path(spec.class_names)
        if not cn_path.is_absolute() and not cn_path.exists():
            cn_path = path.parent / cn_path
        if not cn_path.is_file():
            raise ValueError(f"{where}.class_names: file {str(cn_path)!r} does not exist")
        class_names = [ln.strip() for ln in cn_path.read_text().splitlines() if ln.strip()]
    lengths = spec.sample_tokens
    if lengths is not None:
        lengths = tuple(lengths)
        if len(lengths) < 2 or lengths[0] < 1 or any(a > b for a, b in zip(lengths, lengths[1:])):
            raise ValueError(
                f"{where}.sample_tokens: {list(lengths)!r} must be >= 2 non-decreasing token "
                f"counts >= 1 (quantiles from the shortest sample to the longest; source {name})"
            )
    return Source(name, task, fmt, shards, float(spec.weight), steps, class_names, lengths)


def load_recipe(name_or_path: str, check_shards: bool = True, stat_shards: bool = True) -> Recipe:
    """Load and validate a recipe (a name in ``data_recipes/`` or a YAML path).

    ``check_shards=False`` validates everything but shard existence, and leaves a shard pattern
    or class-name file that names an unset environment variable without a default unexpanded
    (for checking recipes whose data is not on this machine). ``stat_shards=False`` expands
    shards fully but does not stat each one (see :func:`expand_shards`).

    Raises ``ValueError`` / ``FileNotFoundError`` with one line naming the file and the key.
    """
    path = resolve_recipe_path(name_or_path)
    spec = read_recipe_file(path, require_env=check_shards)
    sources = [
        _build_source(i, s, path, check_shards, stat_shards) for i, s in enumerate(spec.sources)
    ]
    names = [s.name for s in sources]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{path}: sources: duplicate names {dup}")
    return Recipe(name=spec.name or path.stem, path=str(path), sources=sources)


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
