"""Resume on another world size: 2 ranks -> 1 rank -> 2 ranks under ZeRO-2 and ZeRO-3 through
DeepSpeed universal checkpoints. Every step's loss equals an uninterrupted 1-rank run's (the
synthetic batches and the token-mean loss do not depend on the world size), each step is
logged once, and the data counters summed over ranks continue.

Three launches (2 ranks, 1 rank, 2 ranks), each running both ZeRO stages. This file is also the
worker script: ``python tests/test_train_reshard.py <root> <phase>``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_utils import run_torchrun  # noqa: E402

pytestmark = pytest.mark.dist
SELF = str(Path(__file__).resolve())
STOPS = {"a": 2, "b": 4, "c": 6}  # phase -> the step it stops at


def _run(root, name, zero, stop):
    from janus_train.config import compose, to_run_config

    return to_run_config(
        compose(
            [
                "stage=stage2",
                f"deepspeed=zero{zero}",
                "train.synthetic_data=true",
                f"train.run_dir={root}/{name}",
                "experiment.stage2.steps=6",
                "experiment.stage2.global_batch_size=4",
                "train.tokens_per_micro=0",
                "train.log_every=1",
                "train.ckpt_every=0",
                "train.export_at_end=false",
                "train.progress_bar=false",
                "train.synthetic_seq_len=40",
                f"experiment.stage2.stop_at={stop}",
            ]
        )
    )


def phase_main(root: str, phase: str) -> None:
    from janus_train import train

    for zero in (2, 3):
        assert train.run(_run(root, f"z{zero}", zero, STOPS[phase])) == 0
    if phase == "b":  # the single-rank process also runs the uninterrupted reference
        assert train.run(_run(root, "reference", 2, 6)) == 0
    from janus_train.trainer.distributed import exit_finished

    exit_finished(0)  # as janus-train's main does after a run that returned


def _rows(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    for phase, nproc in (("a", 2), ("b", 1), ("c", 2)):
        res = run_torchrun([SELF, str(root), phase], nproc=nproc, timeout=400)
        assert res.returncode == 0, res.output[-6000:]
        (root / f"{phase}.log").write_text(res.output)
    return root


@pytest.mark.parametrize("zero", [2, 3])
def test_two_one_two_ranks_continue_the_same_run(chain, zero):
    ref = {r["step"]: r for r in _rows(chain / "reference" / "metrics.jsonl")}
    rows = _rows(chain / f"z{zero}" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # each step once
    for r in rows:
        # same weights, optimizer state and batches whatever the world size: same loss
        assert r["loss"] == pytest.approx(ref[r["step"]]["loss"], rel=2e-4), r["step"]
        counts = {k: v for k, v in r.items() if k.startswith("data/samples/")}
        assert counts == {
            k: v for k, v in ref[r["step"]].items() if k.startswith("data/samples/")
        }, r["step"]
    assert rows[-1]["optim/skipped_steps"] == 0
    ck = chain / f"z{zero}" / "checkpoints"
    assert (ck / "latest").read_text() == "step_00000006"
    for phase, (saved, now) in {"b": (2, 1), "c": (1, 2)}.items():
        log = (chain / f"{phase}.log").read_text()
        assert f"written by {saved} ranks, this run has {now}" in log  # resumed via universal
    assert not list(ck.glob("*_universal"))  # conversions of superseded checkpoints pruned


if __name__ == "__main__":
    phase_main(sys.argv[1], sys.argv[2])
