"""User errors at the command line: one line naming the field or file, exit 2 (a traceback only
with JANUS_DEBUG=1); ``model.init_from`` checked before any model (also by the dry run); crashes
keep their traceback. ``janus_train.train.main`` runs in-process (Hydra's app, as the CLI)."""

from __future__ import annotations

import sys

import pytest

from janus_train import train
from janus_train.errors import EXIT_USER_ERROR, is_user_error, one_line


def _main(monkeypatch, capsys, tmp_path, *overrides, env=None):
    for k in ("JANUS_DEBUG", "HYDRA_FULL_ERROR", "JANUS_USER_ERROR_FILE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(train, "_error", None)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "janus-train",
            "train.synthetic_data=true",
            f"train.run_dir={tmp_path}/run",
            "train.dry_run=true",
            *overrides,
        ],
    )
    with pytest.raises(SystemExit) as e:
        train.main()
    cap = capsys.readouterr()
    return e.value.code, cap.err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if "janus-train: error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_config_value_is_one_line_exit_2_and_debug_shows_traceback(
    monkeypatch, capsys, tmp_path
):
    code, err = _main(
        monkeypatch,
        capsys,
        tmp_path,
        "train.tokens_per_micro=0",
        "train.micro_batch_size=3",
        "experiment.stage1.global_batch_size=8",
    )
    assert code == EXIT_USER_ERROR
    assert "train.micro_batch_size" in _one_error_line(err)
    status = tmp_path / "user_error.txt"
    code, err = _main(
        monkeypatch,
        capsys,
        tmp_path,
        "train.tokens_per_micro=0",
        "train.micro_batch_size=3",
        "experiment.stage1.global_batch_size=8",
        env={"JANUS_DEBUG": "1", "JANUS_USER_ERROR_FILE": str(status)},
    )
    assert code == EXIT_USER_ERROR and "Traceback" in err and "plan_batch" in err
    assert "train.micro_batch_size" in status.read_text()  # what job.sh reads


@pytest.mark.parametrize("content", ["empty", "config_only"])
def test_init_from_checked_by_the_dry_run_naming_the_field(monkeypatch, capsys, tmp_path, content):
    d = tmp_path / "init"
    d.mkdir()
    if content == "config_only":
        (d / "config.json").write_text("{}")
    code, err = _main(monkeypatch, capsys, tmp_path, f"model.init_from={d}")
    line = _one_error_line(err)
    assert code == EXIT_USER_ERROR and "model.init_from" in line and "weights" in line
    assert ("config.json" in line) == (content == "empty")
    assert not (tmp_path / "run" / "ds_config.json").exists()  # before anything is written


def test_unknown_key_and_missing_recipe_are_user_errors(monkeypatch, capsys, tmp_path):
    code, err = _main(monkeypatch, capsys, tmp_path, "train.no_such_key=1")
    assert code == EXIT_USER_ERROR and "no_such_key" in err
    code, err = _main(
        monkeypatch,
        capsys,
        tmp_path,
        "train.synthetic_data=false",
        f"experiment.stage1.data_recipe={tmp_path}/missing.yaml",
    )
    assert code == EXIT_USER_ERROR and "missing.yaml" in _one_error_line(err)


@pytest.mark.parametrize(
    "override",
    [
        "train.steps=5",
        "++train.global_batch_size=4",
        "stage.train_gen_embeddings=true",
        "data.recipe=my_stage1",
    ],
)
def test_removed_key_is_one_line_naming_its_replacement(monkeypatch, capsys, tmp_path, override):
    status = tmp_path / "user_error.txt"
    env = {"JANUS_USER_ERROR_FILE": str(status)}
    code, err = _main(monkeypatch, capsys, tmp_path, override, env=env)
    key = override.lstrip("+").split("=")[0]
    line = _one_error_line(err)
    from janus_train.config import REMOVED_KEYS

    assert code == EXIT_USER_ERROR and f"{key} was removed: set {REMOVED_KEYS[key]} " in line
    assert status.read_text().startswith(f"janus-train: error: {key} was removed")
    assert not (tmp_path / "run").exists()


def test_crashes_are_not_user_errors():
    import torch

    try:
        torch.zeros(2) @ torch.zeros(3)  # a ValueError/RuntimeError from inside torch
    except Exception as e:  # noqa: BLE001
        assert not is_user_error(e)
    try:
        int("x")  # ValueError raised outside this package
    except ValueError as e:
        assert not is_user_error(e)
    wrapped = RuntimeError(
        "Caught DataFailure in DataLoader worker process 0.\nOriginal "
        'Traceback (most recent call last):\n  File "x.py", line 1\n'
        "janus_train.errors.DataFailure: data source 'cap': 5 of 9 "
        "failed"
    )
    assert is_user_error(wrapped)
    assert one_line(wrapped) == "data source 'cap': 5 of 9 failed"


@pytest.mark.parametrize(
    "override,named",
    [
        ("eval.metrics=[nopkg.mod:fn]", "eval.metrics: cannot load 'nopkg.mod:fn'"),
        ("eval.metrics=[janus_train.train]", "is not 'package.module:function'"),
        ("eval.recipe=no_such_recipe", "data recipe 'no_such_recipe' not found"),
    ],
)
def test_eval_recipe_and_metrics_checked_before_training(
    monkeypatch, capsys, tmp_path, override, named
):
    """With ``eval.every``, a bad held-out recipe or metric fails the dry run (so also the run,
    before any model), not the first evaluation after training; without it, nothing loads."""
    from janus_train.config import compose, to_run_config

    code, err = _main(monkeypatch, capsys, tmp_path, "eval.every=2", override)
    assert code == EXIT_USER_ERROR and named in _one_error_line(err)
    train.check_eval(to_run_config(compose(["eval.every=0", override])))  # no evaluation


def test_eval_shards_checked_before_training(monkeypatch, capsys, tmp_path):
    """With ``eval.every``, a held-out shard that is missing or not a tar file fails the dry run
    (so the run, before any model) in one line naming it, exit 2: it was found only at the first
    evaluation, a traceback. Good shards pass."""
    import yaml

    from janus_train.data.synthetic import text_records
    from janus_train.data.tario import write_tar

    good = write_tar(tmp_path / "good.tar", text_records(0, 2))
    notes = tmp_path / "notes.tar"
    notes.write_text("held-out notes, not a tar\n" * 40)
    recipe = tmp_path / "heldout.yaml"

    def dry_run(*shards):
        src = {"name": "t", "task": "text", "format": "text", "shards": [str(s) for s in shards]}
        recipe.write_text(yaml.safe_dump({"name": "heldout", "sources": [src]}))
        return _main(monkeypatch, capsys, tmp_path, "eval.every=2", f"eval.recipe={recipe}")

    for bad, named in ((notes, "is not a tar file"), (tmp_path / "gone.tar", "does not exist")):
        code, err = dry_run(good, bad)
        line = _one_error_line(err)
        assert code == EXIT_USER_ERROR and named in line and f"'{bad}'" in line, line
        assert str(recipe) in line
    monkeypatch.setattr(train, "exit_finished", lambda status: sys.exit(status))
    assert dry_run(good)[0] == 0
