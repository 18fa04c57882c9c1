"""The tokenizer round-trip guard: a tokenizer that drops spaces or splits a special token stops
training (``build_model``), ``janus-data`` and ``janus-sample`` with one line before any model is
built; the tested transformers range is the one pyproject.toml declares and the one installed."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer, pre_tokenizers
from transformers import JanusProcessor, PreTrainedTokenizerFast

from janus_train.model.tokenizer import (
    BOI_TOKEN,
    TESTED_TRANSFORMERS,
    check_tokenizer,
    train_tiny_tokenizer,
)


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokguard")
    train_tiny_tokenizer(root / "ok")
    # a pre-tokenizer that drops whitespace: the failure some transformers loading paths cause
    proc = JanusProcessor.from_pretrained(str(root / "ok"), local_files_only=True)
    proc.tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    proc.save_pretrained(root / "nospace")
    return root


def test_good_tokenizer_passes(tok_dirs):
    proc = JanusProcessor.from_pretrained(str(tok_dirs / "ok"), local_files_only=True)
    check_tokenizer(proc.tokenizer)


def test_space_dropping_tokenizer_fails_in_one_line(tok_dirs):
    proc = JanusProcessor.from_pretrained(str(tok_dirs / "nospace"), local_files_only=True)
    with pytest.raises(ValueError, match="does not round-trip text") as e:
        check_tokenizer(proc.tokenizer)
    assert "\n" not in str(e.value)


def test_split_special_token_fails(tok_dirs):
    j = json.loads((tok_dirs / "ok" / "tokenizer.json").read_text())
    j["added_tokens"] = [a for a in j["added_tokens"] if a["content"] != BOI_TOKEN]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(j)))
    assert BOI_TOKEN in tok.get_vocab()  # still in the vocab, but encoded as pieces
    with pytest.raises(ValueError, match="splits the special token '<begin_of_image>'") as e:
        check_tokenizer(tok)
    assert "\n" not in str(e.value)


def test_entry_points_stop_on_a_broken_tokenizer(tok_dirs, tmp_path, capsys, monkeypatch):
    from janus_train.cli import data as cli
    from janus_train.cli import sample
    from janus_train.data.synthetic import write_tiny_dataset
    from janus_train.model import build_model
    from tests.conftest import tiny_run

    # the recipe's shards exist (inspect checks them first), so the tokenizer is what fails
    monkeypatch.setenv("JANUS_DATA_ROOT", str(tmp_path / "data"))
    write_tiny_dataset(tmp_path / "data", n_shards=2, per_shard=2)

    bad = str(tok_dirs / "nospace")
    with pytest.raises(ValueError, match="does not round-trip"):  # janus-train's model build
        build_model(tiny_run([f"model.tokenizer={bad}"]).model, workdir=tmp_path)
    with pytest.raises(SystemExit) as e:  # the CLIs: one line, exit 2
        cli.main(["inspect", "experiment=tiny", f"model.tokenizer={bad}"])
    assert e.value.code == 2 and "does not round-trip" in capsys.readouterr().err
    # janus-sample checks the tokenizer before loading the model (the dir has none)
    shutil.copytree(bad, tmp_path / "export")
    with pytest.raises(SystemExit) as e:
        sample.main(
            [
                "--model",
                str(tmp_path / "export"),
                "--device",
                "cpu",
                "generate",
                "--prompt",
                "a red circle",
            ]
        )
    assert e.value.code == 2 and "does not round-trip" in capsys.readouterr().err


def test_tested_transformers_range_is_declared_and_installed():
    import transformers
    from packaging.specifiers import SpecifierSet

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    (spec,) = re.findall(r'"transformers([^"]*)"', pyproject)
    assert SpecifierSet(spec) == SpecifierSet(TESTED_TRANSFORMERS)
    assert transformers.__version__ in SpecifierSet(spec)
