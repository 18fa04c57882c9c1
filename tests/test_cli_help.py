"""Help texts: ``janus-train --help`` lists every config group option, every key of the typed tree
with its composed value, and every environment variable the code and the configs read."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

from janus_train.cli_help import ENV_VARS, iter_keys, render
from janus_train.config import RunConfig

REPO = Path(__file__).resolve().parent.parent
# os.environ.get("X" / os.environ["X" / ${oc.env:X...} (conf/ and the recipes)
READS = r"(?:environ(?:\.get|\.setdefault)?[(\[]\s*[\"']|oc\.env:|\$\{)((?:JANUS|WANDB)_[A-Z_]+)"


def _env_vars_read() -> set[str]:
    """JANUS_* / WANDB_API_KEY names read by the package, the conf tree and the recipes,
    found by scanning the files (independently of the help module's list)."""
    names: set[str] = set()
    for pattern in ("janus_train/**/*.py", "conf/**/*.yaml", "data_recipes/*.yaml"):
        for f in REPO.glob(pattern):
            if f.name == "cli_help.py":
                continue
            names |= set(re.findall(READS, f.read_text()))
    return names


def test_train_help_lists_groups_keys_and_environment():
    text = render(["experiment=janus_pro_1b", "stage=stage2"])
    for group in ("model", "stage", "experiment", "deepspeed"):
        for opt in (REPO / "conf" / group).glob("*.yaml"):
            assert opt.stem in text, f"conf/{group}/{opt.name} missing from --help"
    keys = [k for k, _ in iter_keys(RunConfig)]
    for key in keys:
        if key.startswith(("experiment.stage1", "experiment.stage3")):
            assert f"  {key} = " not in text  # only the selected stage's hyper-parameters
        else:
            assert f"  {key} = " in text, key
    assert "  experiment.stage2.global_batch_size = 512" in text  # composed value, not default
    missing = _env_vars_read() - set(ENV_VARS)
    assert not missing, f"environment variables read but not in --help: {sorted(missing)}"


def test_train_help_is_what_the_entry_point_prints():
    out = subprocess.run(
        [sys.executable, "-m", "janus_train.train", "stage=stage3", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert "stage.sft = True" in out.stdout and "Environment variables:" in out.stdout


def _parsers(ap: argparse.ArgumentParser, name: str):
    yield name, ap
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _parsers(p, f"{name} {sub}")


def _cli_parsers():
    from janus_demo.synth import build_parser as synth_parser
    from janus_train.cli.data import build_parser as data_parser
    from janus_train.cli.sample import build_parser as sample_parser

    yield from _parsers(data_parser(), "janus-data")
    yield from _parsers(sample_parser(), "janus-sample")
    yield from _parsers(synth_parser(), "python -m janus_demo.synth")


def test_every_cli_option_has_help_and_shows_its_default():
    seen = 0
    for name, ap in _cli_parsers():
        text = " ".join(ap.format_help().split())
        if ap.description:
            assert ap.description.rstrip().endswith((".", ")")), f"{name}: description cut"
        for action in ap._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            flag = action.option_strings[0] if action.option_strings else action.dest
            assert action.help, f"{name} {flag}: no help text"
            seen += 1
            if (
                action.option_strings
                and not action.required
                and action.default not in (None, False, argparse.SUPPRESS)
            ):
                assert f"(default: {action.default})" in text, f"{name} {flag}: default hidden"
    assert seen > 30


def test_sample_style_help_names_each_stage_default():
    """``janus-sample --style`` states each shipped stage's ``und_format`` as conf/stage/ sets it."""
    import yaml

    from janus_train.cli.sample import build_parser

    text = " ".join(build_parser().format_help().split())
    stages = sorted((REPO / "conf" / "stage").glob("*.yaml"))
    want = ", ".join(f"{f.stem} {yaml.safe_load(f.read_text())['und_format']}" for f in stages)
    assert len(stages) == 3 and f"stage.und_format: {want};" in text


def test_sample_style_help_never_fails_the_command(tmp_path, monkeypatch):
    """The help text reads the conf's stage files at every ``janus-sample`` call: a stage file it
    cannot read (Hydra ``defaults``) is left out, no stage file gives a pointer, no error."""
    from janus_train import config
    from janus_train.cli.sample import _stage_styles

    (tmp_path / "stage").mkdir()
    monkeypatch.setattr(config, "CONF_DIR", tmp_path)
    assert _stage_styles() == "see conf/stage"
    (tmp_path / "stage" / "a.yaml").write_text("defaults:\n  - base\nund_format: qa\n")
    (tmp_path / "stage" / "b.yaml").write_text("und_format: chat\n")
    assert _stage_styles() == "b chat"


def test_plan_help_lists_every_cluster_key_with_its_default():
    import dataclasses

    from janus_train.cli.plan import plan_help
    from janus_train.plan.config import ClusterConfig

    text = plan_help()
    for f in dataclasses.fields(ClusterConfig):
        default = "null" if f.default is None else f.default
        assert f"  {f.name} = {default}" in text, f.name


def _undocumented(*roots: type) -> list[str]:
    """``Class.field`` of every leaf field (not itself a dataclass) under ``roots`` that has no
    attribute docstring."""
    import typing

    from janus_train.cli_help import field_docs

    out, seen, todo = [], set(), list(roots)
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints.get(f.name)):
                todo.append(hints[f.name])
            elif not docs.get(f.name):
                out.append(f"{cls.__module__}.{cls.__name__}.{f.name}")
    return sorted(out)


def test_every_leaf_config_key_has_a_docstring_and_help_shows_it():
    """The Hydra tree (the evaluation's ``eval`` group in it), janus-plan's cluster and the demo
    generator: every leaf
    field carries its own docstring (an enum's member list alone does not count), and
    ``janus-train --help`` prints each one under its key."""
    from janus_demo.synth import SynthConfig
    from janus_train.plan.config import ClusterConfig

    assert _undocumented(RunConfig, ClusterConfig, SynthConfig) == []
    assert "eval.extra_guidance_scales" in dict(iter_keys(RunConfig))
    text = " ".join(render(["stage=stage2"]).split())
    for key, doc in iter_keys(RunConfig):
        if not key.startswith(("experiment.stage1", "experiment.stage3")):
            assert f"{key} = " in text and " ".join(doc.split()[:6]) in text, key


@dataclasses.dataclass
class _FakeInner:
    a: int = 1
    """Documented."""
    b: int = 2


@dataclasses.dataclass
class _FakeOuter:
    inner: _FakeInner = dataclasses.field(default_factory=_FakeInner)
    c: str = "x"


def test_the_docstring_check_sees_an_undocumented_field():
    assert _undocumented(_FakeOuter) == [f"{__name__}._FakeInner.b", f"{__name__}._FakeOuter.c"]
