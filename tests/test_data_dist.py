"""Two real ranks (torchrun, gloo) x 2 dataloader workers: every step's global batch holds the
ratio exactly, and no sample is read twice within an epoch across ranks and workers.

Run by pytest; the same file is the torchrun script (``python tests/test_data_dist.py scenario
DIR``)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

TASK = {0: "text", 1: "und", 2: "gen"}


def scenario_token(workdir: str) -> None:
    """Token-budget loader: the ranks exchange queue lengths through a real gloo all-gather."""
    import torch.distributed as dist

    from janus_train.config import compose, to_run_config
    from janus_train.model.build import load_processor
    from janus_train.trainer.distributed import all_gather_objects
    from tests.helpers import stage_loader

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    root = Path(workdir)
    run = to_run_config(
        compose(
            [
                "experiment=tiny",
                "stage=stage2",
                "experiment.stage2.global_batch_size=12",
                f"experiment.stage2.data_recipe={root / 'r.yaml'}",
                "data.num_workers=2",
                "data.seq_len=128",
            ]
        )
    )
    L = stage_loader(
        run,
        load_processor(root / "tok"),
        rank=rank,
        world_size=world,
        tokens_per_micro=128,
        exchange=all_gather_objects,
    )
    steps = []
    for _ in range(8):
        micro = L.next_step()
        tasks, tokens = [], 0
        for mb in micro:
            starts = (mb["position_ids"][0] == 0) & (mb["attention_mask"][0] == 1)
            tasks += [TASK[int(t)] for t in mb["task_ids"][0][starts]]
            tokens += int(mb["attention_mask"].sum())
            assert (
                mb["input_ids"].shape == (1, mb["input_ids"].shape[1])
                and mb["input_ids"].shape[1] <= 128
            )
        keys = [k for mbk in L.last_keys for k in mbk]
        steps.append({"tasks": tasks, "keys": keys, "n_micro": len(micro), "tokens": tokens})
    gathered = [None] * world
    dist.all_gather_object(gathered, {"steps": steps, "counters": L.counters()})
    L.close()
    if rank == 0:
        (root / "result_token.json").write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


def scenario(workdir: str) -> None:
    import torch.distributed as dist

    from janus_train.config import compose, to_run_config
    from janus_train.model.build import load_processor
    from tests.helpers import stage_loader

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    root = Path(workdir)
    run = to_run_config(
        compose(
            [
                "experiment=tiny",
                "stage=stage2",
                "experiment.stage2.global_batch_size=12",
                f"experiment.stage2.data_recipe={root / 'r.yaml'}",
                "data.num_workers=2",
            ]
        )
    )
    L = stage_loader(
        run, load_processor(root / "tok"), rank=rank, world_size=world, micro_batch_size=2
    )
    steps = []
    for _ in range(8):
        micro = L.next_step()
        tasks = [TASK[int(t)] for mb in micro for t in mb["task_ids"][:, 0]]
        keys = [k for mbk in L.last_keys for k in mbk]
        steps.append({"tasks": tasks, "keys": keys})
    gathered = [None] * world
    dist.all_gather_object(gathered, {"steps": steps, "counters": L.counters()})
    L.close()
    if rank == 0:
        (root / "result.json").write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


def _write_data(tmp_path):
    from janus_train.data.synthetic import caption_records, text_records
    from janus_train.data.tario import write_tar
    from janus_train.model.tokenizer import train_tiny_tokenizer

    train_tiny_tokenizer(tmp_path / "tok", image_size=32, num_image_tokens=16)
    for s in range(8):
        write_tar(tmp_path / f"cap-{s}.tar", caption_records(s * 10, 10))
        write_tar(tmp_path / f"txt-{s}.tar", text_records(s * 10, 10))
    import yaml

    (tmp_path / "r.yaml").write_text(
        yaml.safe_dump(
            {
                "sources": [
                    {
                        "name": "text",
                        "task": "text",
                        "format": "text",
                        "shards": str(tmp_path / "txt-{0..7}.tar"),
                    },
                    {
                        "name": "cap",
                        "task": "understanding",
                        "format": "caption",
                        "shards": str(tmp_path / "cap-{0..7}.tar"),
                    },
                    {
                        "name": "t2i",
                        "task": "generation",
                        "format": "caption",
                        "shards": str(tmp_path / "cap-{0..7}.tar"),
                    },
                ]
            }
        )
    )


@pytest.mark.dist
def test_two_ranks_gloo_ratio_and_disjoint(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dist_utils import run_torchrun

    from janus_train.batch import task_counts

    _write_data(tmp_path)
    res = run_torchrun([__file__, "scenario", str(tmp_path)], nproc=2, timeout=240)
    assert res.returncode == 0, res.output[-3000:]
    ranks = json.loads((tmp_path / "result.json").read_text())
    want = {t: n for t, n in task_counts({"und": 2, "text": 3, "gen": 5}, 12).items() if n}
    for step in range(8):
        got = Counter(t for r in ranks for t in r["steps"][step]["tasks"])
        assert dict(got) == want  # 12 x 2:3:5 -> und 2 (2.4), text 4 (3.6), gen 6
        assert all(len(r["steps"][step]["tasks"]) == 6 for r in ranks)
    # per source, 8 steps stay within one epoch (80 records, 20 per consumer): no repeats at all
    for task in ("und", "text", "gen"):
        keys = [
            k for r in ranks for s in r["steps"] for t, k in zip(s["tasks"], s["keys"]) if t == task
        ]
        assert len(keys) == len(set(keys)) == 8 * want[task]
    total = Counter()
    for r in ranks:
        total.update(r["counters"])
    assert total == Counter({"samples/text": 32, "samples/cap": 16, "samples/t2i": 48})


@pytest.mark.dist
def test_two_ranks_token_budget_exact_ratio_equal_micro_steps_balanced(tmp_path):
    """The token-budget loader on 2 real ranks x 2 workers: every step holds the exact ratio
    (12 samples), both ranks run the same number of micro-steps, no sample twice, tokens
    balanced (here within 25% per step, 10% on average)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dist_utils import run_torchrun

    from janus_train.batch import task_counts
    from janus_train.data.packing import imbalance

    _write_data(tmp_path)
    res = run_torchrun([__file__, "scenario_token", str(tmp_path)], nproc=2, timeout=240)
    assert res.returncode == 0, res.output[-3000:]
    ranks = json.loads((tmp_path / "result_token.json").read_text())
    want = {t: n for t, n in task_counts({"und": 2, "text": 3, "gen": 5}, 12).items() if n}
    imb = []
    for step in range(8):
        assert dict(Counter(t for r in ranks for t in r["steps"][step]["tasks"])) == want
        assert ranks[0]["steps"][step]["n_micro"] == ranks[1]["steps"][step]["n_micro"]
        imb.append(imbalance([r["steps"][step]["tokens"] for r in ranks]))
    assert max(imb) < 0.25 and sum(imb) / len(imb) < 0.1, imb
    for task in ("und", "text", "gen"):
        keys = [
            k for r in ranks for s in r["steps"] for t, k in zip(s["tasks"], s["keys"]) if t == task
        ]
        assert len(keys) == len(set(keys)) == 8 * want[task]


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] in ("scenario", "scenario_token"):
    from janus_train.trainer.distributed import exit_finished

    (scenario if sys.argv[1] == "scenario" else scenario_token)(sys.argv[2])
    exit_finished(0)  # as janus-train does: no finalization racing gloo's threads (SIGABRT)
