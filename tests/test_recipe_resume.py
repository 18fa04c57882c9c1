"""Resuming the token-budget loader under an edited recipe (issue 23): a source added (of each
task), with 1 and 2 loader workers on 1 and 2 ranks. Two ranks run as two threads of this
process whose ``exchange`` is a thread all-gather (the trainer's is an all-gather over the
process group). After the edit every step still holds exactly the stage's task counts, the
added source is trained from its first records, no sample of the kept sources is trained
twice, and the samples that were queued under the old recipe are counted as skipped."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from janus_train.batch import task_counts
from janus_train.data.synthetic import caption_records, text_records
from janus_train.data.tario import write_tar
from janus_train.model.tokenizer import train_tiny_tokenizer
from tests.helpers import make_run, recipe_file, thread_token_loaders

G, SEQ, BEFORE, AFTER = 8, 128, 3, 5
TASK_KEY = {"understanding": "und", "generation": "gen", "text": "text"}


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok"), image_size=32, num_image_tokens=16)


def _source(root, name, task, records, weight=1):
    for s in range(4):
        write_tar(root / f"{name}-{s}.tar", records(1000 * s, 40))
    fmt = "text" if task == "text" else "caption"
    return {
        "name": name,
        "task": task,
        "format": fmt,
        "shards": str(root / f"{name}-{{0..3}}.tar"),
        "weight": weight,
    }


def _each_rank(fns):
    """Run ``fns[r]()`` for every rank at once (threads); their results in rank order."""
    out, errors = [None] * len(fns), []

    def go(r):
        try:
            out[r] = fns[r]()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go, args=(r,)) for r in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def _loaders(run, proc, world):
    return thread_token_loaders(run, proc, world, SEQ)


def _steps(loaders, n):
    """Per step: the keys every rank trained on."""

    def body(L):
        keys = []
        for _ in range(n):
            L.next_step()
            keys.append([k for micro in L.last_keys for k in micro])
        return keys

    for L in loaders:  # workers are forked by the main thread: they die with their forking
        if L.worker_steps.it is None:  # thread (PR_SET_PDEATHSIG)
            L.worker_steps.start()
    per_rank = _each_rank([lambda L=L: body(L) for L in loaders])
    return [[k for rank in per_rank for k in rank[s]] for s in range(n)]


def _source_of(key: str) -> str:
    return key.split("#")[0].rsplit("/", 1)[-1].rsplit("-", 1)[0]


@pytest.mark.parametrize(
    "workers, world", [(1, 1), (2, 2), (1, 2)], ids=["1worker-1rank", "2workers-2ranks", "1w-2r"]
)
@pytest.mark.parametrize("added_task", ["text", "understanding", "generation"])
def test_source_added_between_restarts(proc, tmp_path, added_task, workers, world):
    root = tmp_path / "d"
    base = [
        _source(root, "und", "understanding", caption_records),
        _source(root, "gen", "generation", caption_records),
        _source(root, "txt", "text", text_records),
    ]
    added = _source(
        root, "new", added_task, text_records if added_task == "text" else caption_records, 3
    )
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    old = make_run("stage2", recipe_file(tmp_path / "a", base), G, num_workers=workers, seq_len=SEQ)
    new = make_run(
        "stage2", recipe_file(tmp_path / "b", [*base, added]), G, num_workers=workers, seq_len=SEQ
    )
    hp = new.hparams
    counts = task_counts({"und": hp.ratio.und, "text": hp.ratio.text, "gen": hp.ratio.gen}, G)
    task_of = {s["name"]: TASK_KEY[s["task"]] for s in [*base, added]}

    loaders = _loaders(old, proc, world)
    before = _steps(loaders, BEFORE)
    states = [L.state_dict() for L in loaders]
    queued = sum(len(q) for sd in states for q in sd["queues"].values())
    assert queued > 0  # the steps built ahead under the old recipe
    for L in loaders:
        L.close()

    loaders = _loaders(new, proc, world)
    _each_rank([lambda L=L, sd=sd: L.load_state_dict(sd) for L, sd in zip(loaders, states)])
    after = _steps(loaders, AFTER)
    counters = Counter()
    for L in loaders:
        counters.update(L.counters())
        L.close()

    for step in before + after:
        assert len(step) == G
        got = Counter(task_of[_source_of(k)] for k in step)
        assert got == Counter({t: n for t, n in counts.items() if n})  # exact every step
    new_keys = [k for step in after for k in step if _source_of(k) == "new"]
    assert new_keys, "the added source was never sampled"
    assert len(new_keys) == len(set(new_keys))
    if workers * world == 1:  # one consumer: from its beginning = a fresh run's first samples
        fresh = _loaders(new, proc, 1)
        first: list[str] = []
        while len(first) < len(new_keys):
            first += [k for k in _steps(fresh, 1)[0] if _source_of(k) == "new"]
        fresh[0].close()
        assert set(new_keys) == set(first[: len(new_keys)])
    kept = [k for step in before + after for k in step if _source_of(k) != "new"]
    assert len(kept) == len(set(kept))  # the kept sources continue, nothing trained twice
    skipped = sum(v for k, v in counters.items() if k.endswith("/recipe_change"))
    assert skipped == queued


def test_unchanged_recipe_keeps_its_queues(proc, tmp_path):
    """No edit: the queued samples are trained, nothing rebuilt (exact resume)."""
    root = tmp_path / "d"
    rec = recipe_file(
        tmp_path,
        [
            _source(root, "und", "understanding", caption_records),
            _source(root, "gen", "generation", caption_records),
            _source(root, "txt", "text", text_records),
        ],
    )
    run = make_run("stage2", rec, G, num_workers=1, seq_len=SEQ)
    ref = _loaders(run, proc, 1)
    want = _steps(ref, BEFORE + 2)
    ref[0].close()
    first = _loaders(run, proc, 1)
    got = _steps(first, BEFORE)
    sd = first[0].state_dict()
    first[0].close()
    second = _loaders(run, proc, 1)
    second[0].load_state_dict(sd)
    got += _steps(second, 2)
    assert not any(k.endswith("/recipe_change") for k in second[0].counters())
    second[0].close()
    assert got == want
