"""Recipe files against their typed schema (OmegaConf structured configs): every error kind is
one line naming the file and the full key; ``${oc.env:...}`` resolves as in ``conf/``; the old
``${VAR:-default}`` form is refused with its replacement."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from janus_train.data.recipe import RECIPE_DIR, load_recipe
from janus_train.data.synthetic import caption_records
from janus_train.data.tario import write_tar

GOOD = "{name: z, task: text, format: text, shards: s.tar}"


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    """Writes a recipe whose first source is valid and whose second is ``src``; cwd = its dir."""
    write_tar(tmp_path / "s.tar", caption_records(0, 1))
    monkeypatch.chdir(tmp_path)

    def write(src: str) -> Path:
        p = tmp_path / "r.yaml"
        p.write_text(f"name: r\nsources:\n  - {GOOD}\n  - {src}\n")
        return p

    return write


def _one_line_error(p: Path, **kw) -> str:
    with pytest.raises(ValueError) as e:
        load_recipe(str(p), **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{p}: "), msg
    return msg


@pytest.mark.parametrize(
    "src,key,says",
    [
        (  # unknown key
            "{name: a, task: text, format: text, shards: s.tar, wieght: 2}",
            "sources[1].wieght",
            "unknown key (known: name, task, format, shards, weight, steps, class_names, sample_tokens)",
        ),
        (  # wrong type
            "{name: a, task: text, format: text, shards: s.tar, weight: abc}",
            "sources[1].weight",
            "Value 'abc' of type 'str' could not be converted to Float",
        ),
        (  # wrong type inside a list
            "{name: a, task: text, format: text, shards: s.tar, steps: [0, x]}",
            "sources[1].steps[1]",
            "could not be converted to Integer",
        ),
        ("{name: a, task: text, format: text, shards: s.tar, steps: 7}", "sources[1].steps", ""),
        (  # task names from janus_train.batch.RECIPE_TASKS
            "{name: a, task: vision, format: text, shards: s.tar}",
            "sources[1].task",
            "expected one of [text, understanding, generation]",
        ),
        ("{name: a, task: text, format: parquet, shards: s.tar}", "sources[1].format", ""),
        ("{name: a, task: text, format: text}", "sources[1].shards", "missing (required)"),
        ("{task: text, format: text, shards: s.tar}", "sources[1].name", "missing (required)"),
        (  # the old environment syntax: refused, with the replacement
            "{name: a, task: text, format: text, shards: '${DATA_X:-/data/x}/s.tar'}",
            "sources[1].shards",
            "${DATA_X:-/data/x} is not recipe syntax; use ${oc.env:DATA_X,/data/x}",
        ),
        (
            "{name: a, task: text, format: text, shards: ['${DATA_X:-s3://b}/s.tar']}",
            "sources[1].shards[0]",
            "use ${oc.env:DATA_X,'s3://b'}",  # a ':' must be quoted in a resolver argument
        ),
        (
            "{name: a, task: text, format: text, shards: '${DATA_X}/s.tar'}",
            "sources[1].shards",
            "use ${oc.env:DATA_X}",
        ),
        (  # an unset variable without a default
            "{name: a, task: text, format: text, shards: '${oc.env:JANUS_NOPE_UNSET}/s.tar'}",
            "sources[1].shards",
            "environment variable JANUS_NOPE_UNSET is not set",
        ),
        (
            "{name: a, task: text, format: text, shards: '${oc.env:JANUS_NOPE_UNSET'}",
            "sources[1].shards",
            "invalid interpolation",
        ),
        # semantic checks OmegaConf cannot make keep the same one-line form
        ("{name: a, task: text, format: text, shards: s.tar, weight: 0}", "sources[1].weight", ""),
        ("{name: a, task: text, format: caption, shards: s.tar}", "sources[1].format", "feed"),
        ("{name: a, task: text, format: text, shards: []}", "sources[1].shards", ""),
    ],
)
def test_each_error_is_one_line_naming_file_and_key(recipe, monkeypatch, src, key, says):
    monkeypatch.delenv("JANUS_NOPE_UNSET", raising=False)
    monkeypatch.delenv("DATA_X", raising=False)
    msg = _one_line_error(recipe(src))
    assert f": {key}: " in msg or f": {key} (" in msg, msg
    assert says in msg, msg


def test_top_level_unknown_key(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(f"name: r\nmix: 1\nsources:\n  - {GOOD}\n")
    assert _one_line_error(p).endswith("mix: unknown key (known: name, description, sources)")


def test_oc_env_with_and_without_default(recipe, monkeypatch, tmp_path):
    write_tar(tmp_path / "d" / "s-000000.tar", caption_records(0, 1))
    write_tar(tmp_path / "d" / "s-000001.tar", caption_records(1, 1))
    monkeypatch.setenv("JANUS_T_ROOT", str(tmp_path / "d"))
    monkeypatch.delenv("JANUS_T_UNSET", raising=False)
    src = (
        "{name: a, task: text, format: text, shards: ['${oc.env:JANUS_T_ROOT}/s-{000000..000001}"
        ".tar', '${oc.env:JANUS_T_UNSET,d}/s-000000.tar']}"
    )
    r = load_recipe(str(recipe(src)))
    want = [str(tmp_path / "d" / f"s-00000{k}.tar") for k in (0, 1)]
    assert list(r.sources[1].shards) == want + [
        "d/s-000000.tar"
    ]  # the default, relative to the cwd


@pytest.mark.parametrize("value,want", [("3", 3.0), ("0.25", 0.25), ("2e1", 20.0)])
def test_typed_value_from_env_is_converted(recipe, monkeypatch, value, want):
    monkeypatch.setenv("JANUS_T_W", value)
    src = "{name: a, task: text, format: text, shards: s.tar, weight: '${oc.env:JANUS_T_W}'}"
    assert load_recipe(str(recipe(src))).sources[1].weight == want
    src = "{name: a, task: text, format: text, shards: s.tar, steps: ['${oc.env:JANUS_T_S,5}', 9]}"
    assert load_recipe(str(recipe(src))).sources[1].steps == (5, 9)


def test_typed_value_from_env_is_refused_clearly(recipe, monkeypatch):
    monkeypatch.setenv("JANUS_T_W", "heavy")
    src = "{name: a, task: text, format: text, shards: s.tar, weight: '${oc.env:JANUS_T_W}'}"
    msg = _one_line_error(recipe(src))
    assert ": sources[1].weight: " in msg and "${oc.env:JANUS_T_W}" in msg
    assert "Value 'heavy' of type 'str' could not be converted to Float" in msg
    monkeypatch.setenv("JANUS_T_W", "0")  # converted, then the semantic check
    assert "sources[1].weight: 0.0 must be > 0" in _one_line_error(recipe(src))


def test_unchecked_load_keeps_unset_variables_literal(recipe, monkeypatch):
    """``check_shards=False`` (janus-plan --no-data, the model card): a shard pattern naming an
    unset variable without a default stays as written; every other key is still checked."""
    monkeypatch.delenv("JANUS_NOPE_UNSET", raising=False)
    unset = "${oc.env:JANUS_NOPE_UNSET}/t-{0..3}.tar"
    src = (
        "{name: a, task: text, format: text, "
        f"shards: ['{unset}', '${{oc.env:JANUS_NOPE_UNSET,r}}/u-{{0..1}}.tar']}}"
    )
    r = load_recipe(str(recipe(src)), check_shards=False)
    assert list(r.sources[1].shards) == [unset, "r/u-0.tar", "r/u-1.tar"]
    bad = src.replace("format: text,", "format: text, weight: x,")
    assert "sources[1].weight" in _one_line_error(recipe(bad), check_shards=False)
    assert "JANUS_NOPE_UNSET is not set" in _one_line_error(recipe(src))


def test_shipped_recipes_use_only_the_conf_syntax():
    """Every shipped recipe loads (the old form would be refused) and reads its data root
    (JANUS_DATA_ROOT; the held-out recipe JANUS_EVAL_DATA_ROOT) through ${oc.env:...}; the
    README shows no old form either."""
    old = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-")
    for f in RECIPE_DIR.glob("*.yaml"):
        root = "JANUS_EVAL_DATA_ROOT" if f.stem.endswith("_heldout") else "JANUS_DATA_ROOT"
        assert "${oc.env:" + root + "," in f.read_text() and not old.search(f.read_text()), f
        load_recipe(f.stem, check_shards=False)
    assert not old.search((RECIPE_DIR.parent / "README.md").read_text())


def test_entry_points_report_it_as_a_user_error(recipe, capsys):
    """The line reaches the user through janus_train.errors: one line on stderr, exit 2."""
    from janus_train.errors import EXIT_USER_ERROR, run_cli

    p = recipe("{name: a, task: text, format: text, shards: s.tar, weight: abc}")
    with pytest.raises(SystemExit) as e:
        run_cli("janus-train", load_recipe, str(p))
    assert e.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"janus-train: error: {p}: sources[1].weight: ")
