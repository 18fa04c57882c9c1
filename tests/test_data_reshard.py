"""Loader positions carried over to another consumer layout (ranks x workers): no record read
twice, every record of the epoch either read or counted as skipped, skips only where the old
reading was not a prefix (few shards strided over by many consumers)."""

from __future__ import annotations

from collections import Counter

import pytest

from janus_train.data.reshard import _count_residue
from janus_train.data.synthetic import caption_records, class_records
from janus_train.data.tario import write_tar
from janus_train.model.tokenizer import train_tiny_tokenizer
from tests.helpers import make_run, recipe_file, stage_loader

N_CAP, N_CLS = 24, 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    proc = train_tiny_tokenizer(root / "tok", image_size=32, num_image_tokens=16)
    for s in range(4):  # 4 shards: dealt whole to 1 or 2 consumers
        write_tar(root / f"cap-{s}.tar", caption_records(s * 6, 6))
    write_tar(root / "cls-0.tar", class_records(100, N_CLS))  # 1 shard: strided over by 2
    rec = recipe_file(
        root,
        [
            {
                "name": "cap",
                "task": "understanding",
                "format": "caption",
                "shards": str(root / "cap-{0..3}.tar"),
            },
            {
                "name": "cls",
                "task": "generation",
                "format": "class_label",
                "shards": str(root / "cls-0.tar"),
            },
        ],
    )
    return proc, make_run("stage1", rec, 4, num_workers=0)


def _loaders(setup, world):
    proc, run = setup
    return [
        stage_loader(run, proc, rank=r, world_size=world, micro_batch_size=1) for r in range(world)
    ]


def _read(loaders, steps):
    keys = []
    for _ in range(steps):
        for L in loaders:
            L.next_step()
            keys += [k for mb in L.last_keys for k in mb]
    return keys


@pytest.mark.parametrize("old_world,new_world,old_steps", [(2, 1, 3), (1, 2, 2)])
def test_carry_over_reads_no_record_twice_and_accounts_for_every_record(
    setup, old_world, new_world, old_steps
):
    old = _loaders(setup, old_world)
    seen = _read(old, old_steps)
    new = _loaders(setup, new_world)
    for L in new:
        L.load_resharded([o.state_dict() for o in old])
        assert L.step == old_steps
    counts = Counter()
    for L in new:
        counts.update(L.counters())
    # the old counters continue (summed on rank 0)
    assert counts["samples/cap"] == sum(1 for k in seen if "cap-" in k)
    skipped = {
        src: sum(v for k, v in counts.items() if k.startswith(f"skipped/{src}/reshard"))
        for src in ("cap", "cls")
    }
    assert skipped["cap"] == 0  # whole shards: each one's reading was a prefix
    assert skipped["cls"] <= old_world  # a strided shard: at most one gap per old consumer

    # read on while every new stream is in the carried epoch: no record twice
    def epoch(L, src):
        return L.worker_steps.worker_states[0]["sources"][src]["rec"]["epoch"]

    E = {src: epoch(new[0], src) for src in ("cap", "cls")}
    keys, slack, crossed = list(seen), Counter(), set()
    for _ in range(40):
        for i, L in enumerate(new):
            L.next_step()
            for src in E:
                step_keys = [k for mb in L.last_keys for k in mb if f"{src}-" in k]
                if epoch(L, src) == E[src]:
                    keys += step_keys
                elif (i, src) not in crossed:  # crossed into the next epoch in this step
                    crossed.add((i, src))
                    slack[src] += len(step_keys)
        if len(crossed) == len(new) * len(E):
            break
    for src, n in (("cap", N_CAP), ("cls", N_CLS)):
        mine = [k for k in keys if f"{src}-" in k]
        assert len(set(mine)) == len(mine), src  # no record read twice in the epoch
        assert len(mine) + skipped[src] + slack[src] >= n, src  # every record accounted for
    for L in old + new:
        L.close()


def test_count_residue_matches_enumeration():
    for a, b, base, c, C in [(0, 10, 0, 1, 3), (3, 17, 5, 2, 4), (5, 5, 0, 0, 2), (2, 9, 7, 0, 1)]:
        assert _count_residue(a, b, base, c, C) == sum(
            1 for p in range(a, b) if (base + p) % C == c
        )
