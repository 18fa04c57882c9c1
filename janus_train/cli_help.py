"""``janus-train --help``: the config groups and their options, every key with its value and its
docstring, the environment variables and the exit statuses. Generated from the typed config tree
(the dataclasses' attribute docstrings) and the composed config, so it cannot drift from them.

    janus-train --help                                  # defaults
    janus-train experiment=janus_pro_1b stage=stage2 --help   # values of that composition
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
from enum import Enum
from functools import cache

from omegaconf import OmegaConf

ENV_VARS = {
    "JANUS_DATA_ROOT": "root of the shards named by the shipped data recipes (default /data/janus)",
    "JANUS_CKPT_ROOT": "root of the local HF-format checkpoints named in conf/model/*.yaml "
    "(default checkpoints)",
    "JANUS_EVAL_DATA_ROOT": "root of the held-out shards named by data_recipes/tiny_heldout.yaml "
    "(the tiny experiment's eval.recipe; default data/tiny_heldout)",
    "JANUS_DATA_RECIPES": "directory of the named data recipes (default data_recipes/)",
    "JANUS_TRAIN_CONF": "directory of the config tree (default conf/)",
    "JANUS_CONVERT_CACHE": "where a model.init_from in DeepSeek's release layout is converted "
    "to HF format on first use (default ~/.cache/janus_train/converted)",
    "JANUS_DEBUG": "1: full Python tracebacks for user errors (also HYDRA_FULL_ERROR=1)",
    "JANUS_USER_ERROR_FILE": "a user error's one line is also written there (launch/slurm/job.sh "
    "reads it: no requeue)",
    "WANDB_API_KEY": "with train.wandb=true: online wandb run (offline files without it)",
}

EXIT_STATUSES = {
    0: "stage done (or dry run passed)",
    2: "user error: config, recipe, missing file, data above data.max_failure_rate, "
    "no checkpoint that verifies",
    3: "storage full: a checkpoint did not fit (the previous one stays latest)",
    70: "stuck: no progress within train.stop_grace_s after SIGTERM/SIGUSR1 (nothing saved)",
    75: "stopped by SIGTERM/SIGUSR1 after a checkpoint: requeue me",
}


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass: the string literal right after each field."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def iter_keys(cls: type, prefix: str = ""):
    """(dotted key, docstring) of every leaf field of the dataclass tree under ``cls``."""
    docs = field_docs(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        sub = hints.get(f.name)
        if dataclasses.is_dataclass(sub):
            yield from iter_keys(sub, key + ".")
        else:
            doc = docs.get(f.name, "")
            if isinstance(sub, type) and issubclass(sub, Enum):
                doc = (doc + " " if doc else "") + "One of: " + " | ".join(m.name for m in sub)
            yield key, doc


def _hints(cls: type) -> dict:
    import typing

    return typing.get_type_hints(cls)


def _value(cfg, key: str) -> str:
    try:
        v = OmegaConf.select(cfg, key, throw_on_missing=False)
    except Exception:  # an interpolation that resolves only inside a run (e.g. an unset env var)
        v = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
    if OmegaConf.is_config(v):
        v = OmegaConf.to_container(v, resolve=False)
    if isinstance(v, Enum):
        v = v.name
    return "null" if v is None else str(v)


def render(overrides: list[str] | None = None) -> str:
    """The whole help text for the config composed from ``overrides``."""
    from janus_train.config import CONF_DIR, RunConfig, compose

    cfg = compose(overrides or [])
    groups = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and not p.name.startswith("."))
    out = [
        "usage: janus-train [group=option ...] [key=value ...] [--cfg job] [--help]",
        "       torchrun --nproc_per_node N -m janus_train.train ...   (same arguments)",
        "",
        "Train one stage of a Janus / Janus-Pro model. Re-running the same command resumes from",
        "<train.run_dir>/checkpoints/latest; the stage ends with an HF export in <train.run_dir>/hf.",
        "",
        "Config groups (group=option):",
    ]
    for g in groups:
        opts = sorted(p.stem for p in (CONF_DIR / g).glob("*.yaml"))
        out.append(f"  {g:<12} {', '.join(opts)}")
    out += ["", "Keys (key=value; value shown for this composition):"]
    stage = OmegaConf.select(cfg, "stage.name") or "stage1"
    for key, doc in iter_keys(RunConfig):
        head = key.split(".")
        # experiment.stage{1,2,3}.* share one structure: show the selected stage's only
        if head[0] == "experiment" and head[1].startswith("stage") and head[1] != stage:
            continue
        out.append(f"  {key} = {_value(cfg, key)}")
        if doc:
            out += textwrap.wrap(doc, 96, initial_indent="      ", subsequent_indent="      ")
    out += ["", "Environment variables:"]
    out += [f"  {k:<22} {v}" for k, v in ENV_VARS.items()]
    out += ["", "Exit status:"]
    out += [f"  {k:<4} {v}" for k, v in EXIT_STATUSES.items()]
    out += ["  else crash (a requeue after a crash is the launcher's choice: launch/slurm/job.sh)"]
    out += ["", "Hydra's own options: janus-train --hydra-help"]
    return "\n".join(out)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse help that shows every option's default (not for required options or unset
    ones) and keeps the description's lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" not in text
            and action.option_strings
            and not action.required
            and action.default not in (None, argparse.SUPPRESS, False)
        ):
            text += " (default: %(default)s)"
        return text


def summary(doc: str | None) -> str:
    """A module docstring's first paragraph (whole sentences, RST quotes dropped) for argparse."""
    para = (doc or "").strip().split("\n\n")[0]
    return " ".join(para.replace("``", "").split())
