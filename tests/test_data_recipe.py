"""Recipes (validation, errors naming file and key, shipped recipes) and exact per-step mixing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from janus_train.batch import task_counts
from janus_train.config import compose, to_run_config
from janus_train.data.mixing import step_plan
from janus_train.data.recipe import (
    RECIPE_DIR,
    Recipe,
    Source,
    check_recipe_for_stage,
    load_recipe,
)
from janus_train.data.synthetic import caption_records
from janus_train.data.tario import write_tar


def _write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(body)
    return p


@pytest.fixture
def shard(tmp_path):
    return write_tar(tmp_path / "s-000000.tar", caption_records(0, 2))


def test_valid_recipe_expands_braces_env_and_relative(tmp_path, shard, monkeypatch):
    write_tar(tmp_path / "s-000001.tar", caption_records(2, 2))
    monkeypatch.setenv("MYROOT", str(tmp_path))
    p = _write(
        tmp_path,
        """
name: r
sources:
  - {name: a, task: understanding, format: caption, shards: "${oc.env:MYROOT}/s-{000000..000001}.tar"}
  - {name: b, task: generation, format: caption, shards: "s-000000.tar", weight: 3,
     steps: [0, 10]}
  - {name: c, task: text, format: text, shards: "pipe:curl -s https://x/t-{0..2}.tar"}
""",
    )
    r = load_recipe(str(p))
    assert list(r.sources[0].shards) == [
        str(tmp_path / "s-000000.tar"),
        str(tmp_path / "s-000001.tar"),
    ]
    assert (
        list(r.sources[1].shards) == [str(tmp_path / "s-000000.tar")] and r.sources[1].weight == 3
    )
    assert r.sources[1].active(9) and not r.sources[1].active(10)
    assert len(r.sources[2].shards) == 3 and r.sources[2].shards[0].startswith("pipe:")


@pytest.mark.parametrize(
    "src,key",
    [
        ("{name: a, task: understanding, format: caption, shards: S, weight: 0}", "weight"),
        ("{name: a, task: understanding, format: caption, shards: S, weight: -1}", "weight"),
        ("{name: a, task: vision, format: caption, shards: S}", "task"),
        ("{name: a, task: understanding, format: parquet, shards: S}", "format"),
        ("{name: a, task: text, format: caption, shards: S}", "format"),
        ("{name: a, task: understanding, format: caption, shards: '/nope/x-{0..3}.tar'}", "shards"),
        ("{name: a, task: understanding, format: caption, shards: S, steps: [5, 5]}", "steps"),
        ("{name: a, task: understanding, format: caption, shards: S, wieght: 1}", "wieght"),
        (
            "{name: a, task: understanding, format: caption, shards: '${oc.env:NOPE_UNSET_VAR}/x.tar'}",
            "NOPE_UNSET_VAR",
        ),
    ],
)
def test_errors_are_one_line_naming_file_and_key(tmp_path, shard, src, key):
    p = _write(tmp_path, "sources:\n  - " + src.replace("shards: S", f"shards: {shard}") + "\n")
    with pytest.raises(ValueError) as e:
        load_recipe(str(p))
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and key in msg, msg


def test_unknown_recipe_name():
    with pytest.raises(FileNotFoundError, match="not_a_recipe"):
        load_recipe("not_a_recipe")


def test_shipped_recipes_cover_every_stage():
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    for want in (
        "janus_stage1",
        "janus_stage2",
        "janus_stage3",
        "janus_pro_stage1",
        "janus_pro_stage2",
        "janus_pro_stage3",
        "tiny_stage1",
        "tiny_stage2",
        "tiny_stage3",
    ):
        assert want in names
    for exp in ("janus_1.3b", "janus_pro_1b", "janus_pro_7b", "tiny"):
        for stage in ("stage1", "stage2", "stage3"):
            run = to_run_config(compose([f"experiment={exp}", f"stage={stage}"]))
            hp = run.hparams
            r = load_recipe(hp.data_recipe, check_shards=False)
            check_recipe_for_stage(r, vars(hp.ratio), hp.steps)
    j2 = load_recipe("janus_stage2", check_shards=False)
    assert [s.steps for s in j2.sources if s.name == "imagenet1k"] == [(0, 120000)]
    assert not any(
        s.format == "class_label"
        for s in load_recipe("janus_pro_stage2", check_shards=False).sources
    )


def test_inactive_task_detected():
    r = Recipe("r", "r.yaml", [Source("g", "generation", "caption", ["x"], steps=(0, 5))])
    with pytest.raises(ValueError, match="step 5"):
        check_recipe_for_stage(r, {"und": 0, "text": 0, "gen": 1}, 10)


def _largest_remainder(ratio, total):
    # independent: exact fractions, then the biggest remainders get the leftover samples
    from fractions import Fraction

    s = sum(ratio)
    q = [Fraction(total * r, s) for r in ratio]
    base = [int(x) for x in q]
    order = sorted(range(3), key=lambda i: (-(q[i] - base[i]), i))
    for i in order[: total - sum(base)]:
        base[i] += 1
    return base


@pytest.mark.parametrize(
    "ratio,total,want",
    [
        ((5, 1, 4), 128, (64, 13, 51)),
        ((2, 3, 5), 512, (102, 154, 256)),
        ((1, 0, 3), 256, (64, 0, 192)),
        ((7, 3, 10), 256, (90, 38, 128)),
        ((5, 1, 4), 8, (4, 1, 3)),
        # exact ties (float quotas broke them by noise)
        ((6, 1, 3), 16, (10, 1, 5)),
        ((1, 1, 0), 1, (1, 0, 0)),
        ((3, 3, 4), 5, (2, 1, 2)),
    ],
)
def test_task_counts(ratio, total, want):
    got = task_counts({"und": ratio[0], "text": ratio[1], "gen": ratio[2]}, total)
    assert (got["und"], got["text"], got["gen"]) == want == tuple(_largest_remainder(ratio, total))


def test_step_plan_exact_and_even():
    srcs = [
        Source("u1", "understanding", "caption", ["x"], weight=3),
        Source("u2", "understanding", "conversation", ["x"], weight=1),
        Source("t", "text", "text", ["x"]),
        Source("g", "generation", "caption", ["x"], steps=(0, 50)),
        Source("g2", "generation", "caption", ["x"], steps=(50, 100)),
    ]
    r = Recipe("r", "r.yaml", srcs)
    R, mbs, ga = 4, 2, 4
    counts = task_counts({"und": 5, "text": 1, "gen": 4}, R * mbs * ga)
    per_source = Counter()
    for step in range(100):
        plan = step_plan(r, counts, step, R, mbs, ga, seed=0)
        tasks = Counter()
        for rank in range(R):
            assert len(plan[rank]) == ga and all(len(m) == mbs for m in plan[rank])
            rt = Counter(srcs[i].task_key for m in plan[rank] for i in m)
            for t, n in counts.items():  # each rank within one of an even share
                assert abs(rt[t] - n / R) < 1
            tasks.update(rt)
            per_source.update(srcs[i].name for m in plan[rank] for i in m)
        assert dict(tasks) == {t: n for t, n in counts.items() if n}
        gens = {srcs[i].name for rk in plan for m in rk for i in m if srcs[i].task == "generation"}
        assert gens == ({"g"} if step < 50 else {"g2"})
    assert per_source["u1"] == 3 * per_source["u2"]  # systematic sampling: exact here (16/step)
    assert plan == step_plan(r, counts, 99, R, mbs, ga, seed=0)


def test_ranks_expand_shards_without_statting_each_one(tmp_path, monkeypatch):
    """Rank 0 (or launch/pipeline.sh) checks existence; the other ranks get the same shard list
    with one stat per pattern, not one per shard."""
    import os

    for k in range(4):
        write_tar(tmp_path / f"s-{k:06d}.tar", caption_records(k, 1))
    p = _write(
        tmp_path,
        """
sources:
  - {name: a, task: understanding, format: caption, shards: "s-{000000..000003}.tar"}
""",
    )
    monkeypatch.chdir(tmp_path.parent)  # shards resolve against the recipe's directory
    full = load_recipe(str(p)).sources[0].shards
    assert load_recipe(str(p), stat_shards=False).sources[0].shards == tuple(full)

    calls = []
    for name in ("exists", "isfile"):
        real = getattr(os.path, name)
        monkeypatch.setattr(os.path, name, lambda q, real=real: calls.append(q) or real(q))
    load_recipe(str(p), stat_shards=False)
    assert len(calls) <= 1
    calls.clear()
    load_recipe(str(p))
    assert len(calls) >= 4
    monkeypatch.undo()

    (tmp_path / "s-000003.tar").unlink()
    with pytest.raises(ValueError, match="s-000003.tar.*does not exist"):
        load_recipe(str(p))
    assert load_recipe(str(p), stat_shards=False).sources[0].shards == tuple(full)
