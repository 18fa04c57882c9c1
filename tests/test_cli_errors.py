"""User errors of the command-line tools: one line naming the file or key, exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_janus_data_missing_shard_is_one_line(tmp_path, monkeypatch, capsys):
    from janus_train.cli.data import main

    monkeypatch.setenv("JANUS_DATA_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit) as e:
        main(["inspect", "experiment=tiny", "stage=stage2", "--workdir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith("janus-data inspect: error: ") and "tiny_stage2.yaml" in err[0]


def test_janus_sample_missing_export_is_one_line(tmp_path, capsys):
    from janus_train.cli.sample import main

    with pytest.raises(SystemExit) as e:
        main(
            ["--model", str(tmp_path / "none"), "understand", "--image", "a.png", "--question", "q"]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and str(tmp_path / "none") in err[0]


def test_help_into_a_closed_pipe_ends_quietly():
    res = subprocess.run(
        f"{sys.executable} -m janus_train.train --help | head -1",
        shell=True,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert res.stdout.startswith("usage: janus-train") and "Traceback" not in res.stderr
