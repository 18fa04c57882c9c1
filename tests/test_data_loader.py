"""The step loader on shards written in tmp_path: exact per-step ratio, no overlap across 2 ranks
x 2 workers, exact resume, bad data skipped and counted, failure-rate stop, batch contract."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from janus_train.batch import task_counts
from janus_train.data.synthetic import caption_records, class_records, write_tiny_dataset
from janus_train.data.tario import write_tar
from janus_train.model.tokenizer import train_tiny_tokenizer
from tests.helpers import make_run, recipe_file, stage_loader

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
    loaders = [stage_loader(run, proc, rank=r, world_size=2, micro_batch_size=2) for r in range(2)]
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
        return stage_loader(run, proc, rank=1, world_size=2, micro_batch_size=1)

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
    L = stage_loader(run, proc, rank=0, world_size=1, micro_batch_size=1)
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
    L = stage_loader(run, proc, rank=0, world_size=1, micro_batch_size=1)
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
    run = make_run("stage2", None, 8, num_workers=0)  # the stage's own recipe
    model, _ = build_model(run.model, workdir=tmp_path)
    wrapped = JanusTrainModel(model)
    for stage, pack in (("stage1", False), ("stage2", False), ("stage3", False), ("stage2", True)):
        run = make_run(stage, None, 8, num_workers=0, pack=pack, seq_len=128)
        L = stage_loader(run, proc, rank=0, world_size=2, micro_batch_size=2)
        for mb in L.next_step():
            assert mb["input_ids"].shape[0] == (1 if pack else 2)
            out = wrapped(mb)
            assert torch.isfinite(out["loss_sum"]).all()
            assert torch.equal(out["n_tokens"], count_supervised(mb))
            n_gen = mb["gen_pixel_values"].shape[0]
            assert int((mb["image_codes"] == -1).sum()) == 16 * n_gen
            assert (
                int((mb["input_ids"] == L.args.ctx.st.image).sum())
                == 16 * mb["pixel_values"].shape[0]
            )
        L.close()
    assert json.dumps(L.state_dict())  # plain python types
    # data.pixels_uint8 + finish() on the "device" gives the float contract's batch
    run = make_run("stage1", None, 8, num_workers=0)
    run.data.pixels_uint8 = True
    L8 = stage_loader(run, proc, rank=0, world_size=2, micro_batch_size=2)
    run.data.pixels_uint8 = False
    L = stage_loader(run, proc, rank=0, world_size=2, micro_batch_size=2)
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
        stage_loader(run, proc, rank=0, world_size=2, micro_batch_size=3)
    monkeypatch.setenv("JANUS_DATA_ROOT", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="does not exist"):
        stage_loader(run, proc, rank=0, world_size=2, micro_batch_size=2)
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
    L = stage_loader(run, proc, rank=0, world_size=1, micro_batch_size=1)
    os.remove(gone)  # deleted after validation: read time failure
    for _ in range(4):  # 3 records of ok.tar, the two bad shards, then ok.tar again
        L.next_step()
    c = L.counters()
    assert c["samples/cap"] == 4
    assert sum(v for k, v in c.items() if k.startswith("skipped/cap/")) == 2, c
    assert c.get("skipped/cap/shard_error", 0) >= 1, c


def _proc_state(pid: int) -> str | None:
    """The one-letter state in ``/proc/<pid>/stat`` (``Z``: dead, not yet reaped); None once
    reaped. ``os.kill(pid, 0)`` cannot tell a zombie from a live process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def _wait_for(cond, deadline_s: float, what: str, poll: float = 0.02):
    import time

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {deadline_s:g} s")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc: Linux")
def test_loader_worker_ignores_sigterm_and_dies_with_its_parent(tmp_path):
    """A worker survives the SIGTERM Slurm sends every process (the trainer checkpoints first)
    but not the death of its trainer (SIGKILL: no clean-up ran).

    Survival is proven by the worker answering a ping after the signal: a fatal signal is
    delivered before ``kill()`` returns (the process never runs user code again), so an
    answer means the signal was ignored, and a worker in state ``Z`` fails at once. After the
    parent's death the worker is reparented to this process (a child subreaper, since the
    container's pid 1 need not reap orphans) and counts as dead only once reaped here."""
    import ctypes
    import signal
    import subprocess

    ready, ping, pong = (tmp_path / n for n in ("ready", "ping", "pong"))
    script = (
        "import multiprocessing as mp, os, sys, time\n"
        "from pathlib import Path\n"
        "from janus_train.data.workers import init_worker\n"
        "def work(parent, d):\n"
        "    init_worker(parent, 0)\n"
        "    Path(d, 'ready').write_text('1')\n"
        "    while not Path(d, 'ping').exists():\n"
        "        time.sleep(0.01)\n"
        "    Path(d, 'pong').write_text(str(os.getpid()))\n"
        "    time.sleep(600)\n"
        "if __name__ == '__main__':\n"
        "    w = mp.get_context('fork').Process(target=work, args=(os.getpid(), sys.argv[1]))\n"
        "    w.start()\n"
        "    print(w.pid, flush=True)\n"
        "    time.sleep(600)\n"
    )
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_CHILD_SUBREAPER = 36
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    worker = None
    try:
        worker = int(parent.stdout.readline())
        _wait_for(ready.exists, 120, "worker start-up (init_worker done)")
        os.kill(worker, signal.SIGTERM)
        ping.write_text("1")

        def answered() -> bool:
            state = _proc_state(worker)
            assert state not in (None, "Z", "X"), f"worker died on SIGTERM (state {state})"
            return pong.exists()

        _wait_for(answered, 120, "worker answer after SIGTERM")
        assert _proc_state(worker) not in (None, "Z", "X")
        parent.kill()
        parent.wait()

        def reaped() -> bool:  # the orphan is our child now: reap it ourselves
            pid, _ = os.waitpid(worker, os.WNOHANG)
            return pid == worker

        _wait_for(reaped, 60, "loader worker outlived its parent")
        assert _proc_state(worker) is None
        worker = None
    finally:
        parent.kill()
        parent.wait()
        if worker is not None and _proc_state(worker) not in (None, "Z", "X"):
            os.kill(worker, signal.SIGKILL)
        if worker is not None:
            try:
                os.waitpid(worker, 0)
            except ChildProcessError:  # not ours (the parent never died)
                pass
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def test_data_order_does_not_depend_on_where_the_shards_are_mounted(proc, tmp_path):
    """The same shards under two different roots (a run resumed after its data moved): the
    steps are equal, keys and tensors, although every seed of the shuffle and of the per-sample
    choices is derived per shard (``shards.shard_name``: its last two path components)."""
    steps = []
    for root in (tmp_path / "a", tmp_path / "elsewhere" / "b"):
        for name, records in (("cap", caption_records), ("cls", class_records)):
            (root / name).mkdir(parents=True)
            for s in range(3):
                write_tar(root / name / f"{name}-{s}.tar", records(s * 5, 5))
        rec = recipe_file(
            root,
            [{"name": "cap", "task": "understanding", "format": "caption",
              "shards": str(root / "cap" / "cap-{0..2}.tar")},
             {"name": "cls", "task": "generation", "format": "class_label",
              "shards": str(root / "cls" / "cls-{0..2}.tar")}],
        )  # fmt: skip
        L = stage_loader(make_run("stage1", rec, 4, num_workers=0), proc, micro_batch_size=2)
        steps.append([(L.next_step(), [[k.split(str(root))[1] for k in mk] for mk in L.last_keys])
                      for _ in range(6)])  # fmt: skip
        L.close()
    for (ma, ka), (mb, kb) in zip(*steps):
        assert ka == kb
        for x, y in zip(ma, mb):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    keys = [k for _, ks in steps[0] for mk in ks for k in mk]
    assert keys != sorted(keys)  # shuffled: the equality above is not that of file order
