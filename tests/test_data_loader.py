"""The step loader on shards written in tmp_path: exact per-step ratio, no overlap across 2 ranks
x 2 workers, exact resume, bad data skipped and counted, failure-rate stop, batch contract."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from janus_train.data.loader import build_train_loader
from janus_train.data.mixing import task_counts
from janus_train.data.synthetic import (
    caption_records,
    class_records,
    write_tar,
    write_tiny_dataset,
)
from janus_train.model.tokenizer import train_tiny_tokenizer
from tests.helpers import make_run, recipe_file

TASK = {0: "text", 1: "und", 2: "gen"}


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok"), image_size=32, num_image_tokens=16)


def test_ratio_and_no_overlap_two_ranks_two_workers(proc, tmp_path):
    # captions: 8 shards >= 2 ranks x 2 workers (shard split); classes: 2 shards < 4 (record stride)
    for s in range(8):
        write_tar(tmp_path / f"cap-{s}.tar", caption_records(s * 6, 6))
    for s in range(2):
        write_tar(tmp_path / f"cls-{s}.tar", class_records(100 + s * 6, 6))
    rec = recipe_file(
        tmp_path,
        [
            {
                "name": "cap",
                "task": "understanding",
                "format": "caption",
                "shards": str(tmp_path / "cap-{0..7}.tar"),
            },
            {
                "name": "cls",
                "task": "generation",
                "format": "class_label",
                "shards": str(tmp_path / "cls-{0..1}.tar"),
            },
        ],
    )
    run = make_run("stage1", rec, 8, num_workers=2)
    loaders = [
        build_train_loader(run, proc, rank=r, world_size=2, micro_batch_size=2, grad_accum=2)
        for r in range(2)
    ]
    counts = task_counts({"und": 1, "text": 0, "gen": 1}, 8)
    per_consumer: dict[tuple[int, int], dict[str, list[str]]] = {}
    for step in range(12):
        step_tasks = Counter()
        for r, L in enumerate(loaders):
            micro = L.next_step()
            assert len(micro) == 2
            for mb, keys in zip(micro, L.last_keys):
                assert mb["input_ids"].shape[0] == 2
                tasks = [TASK[int(t)] for t in mb["task_ids"][:, 0]]
                step_tasks.update(tasks)
                for t, k in zip(tasks, keys):
                    per_consumer.setdefault((r, step % 2), {}).setdefault(t, []).append(k)
        assert step_tasks == Counter({t: n for t, n in counts.items() if n})  # exact every step
    und = [k for c in per_consumer.values() for k in c["und"]]
    assert len(und) == 48 and len(set(und)) == 48  # one epoch of 48 records, no overlap
    assert {k.split("#")[1] for k in und} == {f"{i:06d}" for i in range(48)}
    # stride mode: each consumer's first 3 = one epoch of 12 records split 4 ways, disjoint
    gen_first = [k for c in per_consumer.values() for k in c["gen"][:3]]
    assert len(set(gen_first)) == 12
    total = Counter()
    for L in loaders:
        total.update(L.counters())
        L.close()
    assert total == Counter({"samples/cap": 48, "samples/cls": 48})


def _long_text_records(start, n):
    words = "the red circle is on the left of the blue square and the green star".split()
    return [
        (f"{i:06d}", {"txt": " ".join(words[(i + j) % len(words)] for j in range(60)).encode()})
        for i in range(start, start + n)
    ]


def test_exact_resume_two_workers(proc, tmp_path):
    root = tmp_path / "d"
    for s in range(3):
        write_tar(root / f"cap-{s}.tar", caption_records(s * 5, 5))
        write_tar(root / f"txt-{s}.tar", _long_text_records(s * 5, 5))
    write_tar(root / "cls-0.tar", class_records(0, 7))
    rec = recipe_file(
        tmp_path,
        [
            {
                "name": "text",
                "task": "text",
                "format": "text",
                "shards": f"pipe:cat {root}/txt-{{0..2}}.tar",
            },  # remote-style stream
            {
                "name": "cap",
                "task": "understanding",
                "format": "caption",
                "shards": str(root / "cap-{0..2}.tar"),
            },
            {
                "name": "t2i",
                "task": "generation",
                "format": "caption",
                "shards": str(root / "cap-{0..2}.tar"),
                "weight": 2,
            },
            {
                "name": "cls",
                "task": "generation",
                "format": "class_label",
                "shards": str(root / "cls-0.tar"),
                "steps": [0, 6],
            },
        ],
    )
    run = make_run("stage2", rec, 10, num_workers=2, seq_len=40)

    def loader():
        return build_train_loader(run, proc, rank=1, world_size=2, micro_batch_size=1, grad_accum=5)

    N = 14
    L = loader()
    straight, batches = [], []
    for _ in range(N):
        batches.append(L.next_step())
        straight.append(L.last_keys)
    L.close()
    saw_mid_record = False
    for k in (5, 8):
        L = loader()
        got = []
        for _ in range(k):
            L.next_step()
            got.append(L.last_keys)
        buf = io.BytesIO()
        torch.save(L.state_dict(), buf)
        sd = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
        saw_mid_record |= any(s["sub"] > 0 for w in sd["workers"] for s in w["sources"].values())
        counters_k = L.counters()
        L.close()
        L2 = loader()
        L2.load_state_dict(sd)
        assert L2.counters() == counters_k
        for i in range(k, N):
            micro = L2.next_step()
            got.append(L2.last_keys)
            for a, b in zip(micro, batches[i]):
                for name in a:
                    assert torch.equal(a[name], b[name]), (i, name)
        L2.close()
        assert got == straight
    assert saw_mid_record  # a text record split into chunks was interrupted and resumed
    flat = [k for step in straight for mb in step for k in mb]
    assert any("#" in k.split(".tar#")[1] for k in flat)  # text chunks present
    epochs = Counter(flat)
    assert max(epochs.values()) > 1  # the run wrapped epochs


def _bad_shard(path: Path):
    good = caption_records(0, 6)
    recs = [
        good[0],
        ("b1", {"jpg": b"\xff\xd8 not a jpeg", "txt": b"a red circle"}),
        good[1],
        ("b2", {"jpg": good[0][1]["jpg"]}),
        good[2],
        ("b3", {"jpg": good[0][1]["jpg"], "txt": b"  "}),
        good[3],
        ("b4", {"jpg": good[0][1]["jpg"], "json": b"{not json"}),
        good[4],
        good[5],
    ]
    write_tar(path, recs)


def test_bad_data_skipped_and_counted(proc, tmp_path):
    _bad_shard(tmp_path / "a.tar")
    full = write_tar(tmp_path / "b.tar", caption_records(50, 4))
    with tarfile.open(full) as tf:
        last = tf.getmembers()[-1]
    data = Path(full).read_bytes()
    Path(full).write_bytes(data[: last.offset_data + last.size // 2])  # cut inside the last record
    write_tar(tmp_path / "g.tar", class_records(0, 4))
    rec = recipe_file(
        tmp_path,
        [
            {
                "name": "cap",
                "task": "understanding",
                "format": "caption",
                "shards": [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")],
            },
            {
                "name": "gen",
                "task": "generation",
                "format": "class_label",
                "shards": str(tmp_path / "g.tar"),
            },
        ],
    )
    run = make_run("stage1", rec, 2, num_workers=0, shuffle=False, max_failure_rate=0.9)
    L = build_train_loader(run, proc, rank=0, world_size=1, micro_batch_size=1, grad_accum=2)
    for _ in range(9):  # 9 good captions: 6 in a.tar, 3 complete records in b.tar
        L.next_step()
    c = L.counters()
    assert c == {
        "samples/cap": 9,
        "samples/gen": 9,
        "skipped/cap/bad_image": 1,
        "skipped/cap/missing_key": 1,
        "skipped/cap/empty_caption": 1,
        "skipped/cap/bad_json": 1,
        "skipped/cap/truncated_tar": 1,
    }, c


def test_failure_rate_stops_naming_shard(proc, tmp_path):
    bad = [(f"{i:06d}", {"jpg": b"garbage", "txt": b"a red circle"}) for i in range(12)]
    write_tar(tmp_path / "bad-000.tar", bad)
    write_tar(tmp_path / "ok-000.tar", caption_records(0, 12))
    write_tar(tmp_path / "g.tar", class_records(0, 4))
    rec = recipe_file(
        tmp_path,
        [
            {
                "name": "cap",
                "task": "understanding",
                "format": "caption",
                "shards": [str(tmp_path / "ok-000.tar"), str(tmp_path / "bad-000.tar")],
            },
            {
                "name": "gen",
                "task": "generation",
                "format": "class_label",
                "shards": str(tmp_path / "g.tar"),
            },
        ],
    )
    run = make_run("stage1", rec, 2, num_workers=2, max_failure_rate=0.2, failure_min_samples=5)
    L = build_train_loader(run, proc, rank=0, world_size=1, micro_batch_size=1, grad_accum=2)
    with pytest.raises(Exception, match="bad-000.tar") as e:
        for _ in range(40):
            L.next_step()
    assert "max_failure_rate" in str(e.value)
    L.close()


def test_tiny_recipes_feed_the_model_forward(proc, tmp_path, monkeypatch):
    from janus_train.batch import count_supervised
    from janus_train.model import build_model
    from janus_train.model.forward import JanusTrainModel

    monkeypatch.setenv("JANUS_DATA_ROOT", str(tmp_path / "data"))
    write_tiny_dataset(tmp_path / "data", n_shards=2, per_shard=6)
    run = make_run("stage2", "tiny_stage2", 8, num_workers=0)
    run.data.recipe = None  # the stage's own recipe name
    model, _ = build_model(run.model, workdir=tmp_path)
    wrapped = JanusTrainModel(model)
    for stage, pack in (("stage1", False), ("stage2", False), ("stage3", False), ("stage2", True)):
        run = make_run(stage, "x", 8, num_workers=0, pack=pack, seq_len=128)
        run.data.recipe = None
        L = build_train_loader(run, proc, rank=0, world_size=2, micro_batch_size=2, grad_accum=2)
        for mb in L.next_step():
            assert mb["input_ids"].shape[0] == (1 if pack else 2)
            out = wrapped(mb)
            assert torch.isfinite(out["loss_sum"]).all()
            assert torch.equal(out["n_tokens"], count_supervised(mb))
            n_gen = mb["gen_pixel_values"].shape[0]
            assert int((mb["image_codes"] == -1).sum()) == 16 * n_gen
            assert (
                int((mb["input_ids"] == L.ctx.st.image).sum()) == 16 * mb["pixel_values"].shape[0]
            )
        L.close()
    assert json.dumps(L.state_dict())  # plain python types
    # data.pixels_uint8 + finish() on the "device" gives the float contract's batch
    run = make_run("stage1", "x", 8, num_workers=0)
    run.data.recipe = None
    run.data.pixels_uint8 = True
    L8 = build_train_loader(run, proc, rank=0, world_size=2, micro_batch_size=2, grad_accum=2)
    run.data.pixels_uint8 = False
    L = build_train_loader(run, proc, rank=0, world_size=2, micro_batch_size=2, grad_accum=2)
    for a, b in zip(L8.next_step(), L.next_step()):
        assert a["pixel_values"].dtype == torch.uint8 and a["pixel_values"].shape[0] == 1
        a = L8.finish(a)
        for k in b:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


def test_batch_arithmetic_validated(proc, tmp_path, monkeypatch):
    monkeypatch.setenv("JANUS_DATA_ROOT", str(tmp_path / "data"))
    write_tiny_dataset(tmp_path / "data", n_shards=1, per_shard=2)
    run = make_run("stage1", "tiny_stage1", 8)
    with pytest.raises(ValueError, match="global_batch_size"):
        build_train_loader(run, proc, rank=0, world_size=2, micro_batch_size=3, grad_accum=1)
    monkeypatch.setenv("JANUS_DATA_ROOT", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="does not exist"):
        build_train_loader(run, proc, rank=0, world_size=2, micro_batch_size=2, grad_accum=2)
    assert os.environ["JANUS_DATA_ROOT"].endswith("missing")


def test_unreadable_remote_and_missing_shards_are_counted(proc, tmp_path):
    write_tar(tmp_path / "ok.tar", caption_records(0, 3))
    write_tar(tmp_path / "g.tar", class_records(0, 4))
    gone = write_tar(tmp_path / "gone.tar", caption_records(10, 3))
    rec = recipe_file(
        tmp_path,
        [
            {
                "name": "cap",
                "task": "understanding",
                "format": "caption",
                "shards": [str(tmp_path / "ok.tar"), f"pipe:cat {tmp_path}/nope.tar", gone],
            },
            {
                "name": "gen",
                "task": "generation",
                "format": "class_label",
                "shards": str(tmp_path / "g.tar"),
            },
        ],
    )
    run = make_run("stage1", rec, 2, num_workers=0, shuffle=False, max_failure_rate=0.9)
    L = build_train_loader(run, proc, rank=0, world_size=1, micro_batch_size=1, grad_accum=2)
    os.remove(gone)  # deleted after validation: read time failure
    for _ in range(4):  # 3 records of ok.tar, the two bad shards, then ok.tar again
        L.next_step()
    c = L.counters()
    assert c["samples/cap"] == 4
    assert sum(v for k, v in c.items() if k.startswith("skipped/cap/")) == 2, c
    assert c.get("skipped/cap/shard_error", 0) >= 1, c


def test_loader_worker_ignores_sigterm_and_dies_with_its_parent(tmp_path):
    """A worker survives the SIGTERM Slurm sends every process (the trainer checkpoints first)
    but not the death of its trainer (SIGKILL: no clean-up ran)."""
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import multiprocessing as mp, os, sys, time\n"
        "from janus_train.data.loader import _init_worker\n"
        "def work(parent):\n"
        "    _init_worker(parent, 0)\n"
        "    time.sleep(120)\n"
        "if __name__ == '__main__':\n"
        "    w = mp.get_context('fork').Process(target=work, args=(os.getpid(),))\n"
        "    w.start()\n"
        "    print(w.pid, flush=True)\n"
        "    time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        time.sleep(1.0)  # past _init_worker
        os.kill(worker, signal.SIGTERM)
        time.sleep(0.5)
        os.kill(worker, 0)  # still alive: SIGTERM ignored
        parent.kill()
        parent.wait()
        for _ in range(50):
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(worker, signal.SIGKILL)
            raise AssertionError("loader worker outlived its parent")
    finally:
        parent.kill()
