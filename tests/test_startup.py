"""Start-up (issue 22 item 4): ``model.init_from`` is read in the training dtype, so a bf16 run's
rank never holds an fp32 copy of the weights (``benchmarks/bench_startup.py`` measures it on
2 ranks)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from janus_train import train
from janus_train.config import resolve_stage
from janus_train.model import build_model
from janus_train.trainer.distributed import DistInfo
from tests.conftest import tiny_run

# 256-wide, 32k vocabulary: 17M parameters, 68 MB in fp32: large enough to see in the RSS
_WIDE = [
    "model.text.hidden_size=256",
    "model.text.intermediate_size=512",
    "model.text.vocab_size=32000",
]


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _peak_load_mb(cfg, workdir, dtype) -> tuple[float, dict[str, torch.nn.Parameter]]:
    """(host memory the load took at its peak in MB (VmHWM reset just before), parameters)."""
    Path("/proc/self/clear_refs").write_text("5")
    base = _kb("VmRSS")
    model, _ = build_model(cfg, workdir=workdir, dtype=dtype)
    return (_kb("VmHWM") - base) / 1024, dict(model.named_parameters())


def test_bf16_checkpoint_read_in_bf16_holds_no_fp32_copy(tiny_workdir, tmp_path):
    model, processor = build_model(tiny_run(_WIDE).model, workdir=tiny_workdir)
    fp32_mb = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    ckpt = tmp_path / "ckpt"
    model.to(torch.bfloat16).save_pretrained(ckpt)  # as DeepSeek's releases are stored
    processor.save_pretrained(ckpt)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    del model
    cfg = tiny_run([*_WIDE, f"model.init_from={ckpt}", "model.tokenizer=null"]).model

    peak, params = _peak_load_mb(cfg, tmp_path, torch.bfloat16)
    vq = {k for k in params if k.startswith("model.vqmodel.")}  # read in fp32 (vq_codes)
    assert vq and {params[k].dtype for k in vq} == {torch.float32}
    assert {p.dtype for k, p in params.items() if k not in vq} == {torch.bfloat16}
    assert peak < 0.25 * fp32_mb, (peak, fp32_mb)  # memory-mapped: not even a bf16 copy
    for k, p in params.items():
        assert torch.equal(p, ref[k].to(p.dtype)), k
    # in place on file-backed weights (the optimizer, a re-init): private pages, file untouched
    with torch.no_grad():
        for p in params.values():
            p.add_(1)
    on_disk = load_file(next(ckpt.glob("*.safetensors")))
    assert on_disk and all(torch.equal(on_disk[k], ref[k]) for k in on_disk)
    del params
    # the measure sees an fp32 read (the trainer's behaviour before issue 22)
    peak, params = _peak_load_mb(cfg, tmp_path, torch.float32)
    assert {p.dtype for p in params.values()} == {torch.float32}
    assert peak > 0.9 * fp32_mb, (peak, fp32_mb)


def test_bf16_run_reads_the_vq_of_an_fp32_checkpoint_unrounded(tiny_workdir, tmp_path):
    """The VQ's weights decide the generation targets: a bf16 run reads them in fp32, bitwise
    as stored (a VQ fitted in fp32, as the demo's, is not rounded to bf16), the rest in bf16."""
    model, processor = build_model(tiny_run().model, workdir=tiny_workdir)
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    ref = model.state_dict()
    cfg = tiny_run([f"model.init_from={tmp_path / 'ckpt'}", "model.tokenizer=null"]).model
    got, _ = build_model(cfg, workdir=tmp_path, dtype=torch.bfloat16)
    assert type(got) is type(model)  # the loader's subclass does not leak
    vq = got.model.vqmodel.state_dict()
    assert vq and all(torch.equal(v, ref[f"model.vqmodel.{k}"]) for k, v in vq.items())
    assert any(not torch.equal(v, v.bfloat16().float()) for v in vq.values())  # can fail
    assert got.lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(("bf16", "dtype"), [(True, torch.bfloat16), (False, torch.float32)])
def test_build_engine_reads_in_the_engine_dtype(monkeypatch, tmp_path, bf16, dtype):
    seen = []

    class Built(Exception):
        pass

    def fake_build_model(cfg, workdir=None, dtype=torch.float32, partitioned=None):
        seen.append((dtype, partitioned))
        raise Built

    monkeypatch.setattr(train, "build_model", fake_build_model)
    monkeypatch.setattr(train, "get_processor", lambda *a, **k: None)
    with pytest.raises(Built):
        run = tiny_run()
        spec = resolve_stage(run)
        train.build_engine(run, spec, DistInfo(0, 1, 0), {"bf16": {"enabled": bf16}}, tmp_path)
    assert seen == [(dtype, None)]  # ZeRO-0/1/2: built whole


def test_partitioned_load_only_under_zero3_and_only_while_loading():
    """HF builds under ``zero.Init`` inside ``loading()`` only: a later ``from_pretrained`` (an
    export's check, evaluation) builds whole again."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    from janus_train.trainer.distributed import partitioned_load

    assert partitioned_load({"zero_optimization": {"stage": 2}}) is None
    load = partitioned_load({"zero_optimization": {"stage": 3}, "train_batch_size": 1})
    with load.loading():
        assert is_deepspeed_zero3_enabled()
    assert not is_deepspeed_zero3_enabled()


def _zero3(**settings) -> dict:
    from janus_train.batch import plan_batch
    from janus_train.trainer.config import DeepSpeedConfig
    from janus_train.trainer.distributed import build_deepspeed_config

    ds = DeepSpeedConfig(zero_stage=3, **settings)
    return build_deepspeed_config(ds, plan_batch(2, 1, 2), "bf16", 0.0, 1e-3)


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"hpz_partition_size": 2}, "deepspeed.hpz_partition_size"),
        ({"quantized_weights": True}, "deepspeed.quantized_weights"),
        ({"quantized_gradients": True}, "deepspeed.quantized_gradients"),
        ({"offload_param": True}, "deepspeed.offload_param"),
    ],
)
def test_partitioned_load_not_used_with_untested_zero3_settings(caplog, settings, key):
    """hpZ, ZeRO++ quantization, parameter offload: ``zero.Init`` would build their
    partitions before ``deepspeed.initialize``, never checked on a GPU: loaded whole, said once."""
    import logging

    from janus_train.trainer.distributed import partitioned_load

    assert partitioned_load(_zero3()) is not None  # plain ZeRO-3 (the generated config)
    caplog.set_level(logging.INFO, logger="janus_train")
    caplog.clear()
    assert partitioned_load(_zero3(**settings)) is None
    said = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(said) == 1 and said[0].getMessage().startswith(key + ":")


@pytest.mark.parametrize(
    ("stage", "weights", "copied"),
    [
        (3, "model.safetensors", False),
        (3, "pytorch_model.bin", True),
        (2, "model.safetensors", True),
    ],
)
def test_no_node_copy_under_the_partitioned_load(
    monkeypatch, caplog, tmp_path, stage, weights, copied
):
    """Partitioned (ZeRO-3, safetensors), rank 0 reads the checkpoint, the others only the VQ's
    tensors: each node leader's whole copy would multiply the file-system reads, so every rank
    reads in place (said once). A whole load (a ``.bin`` checkpoint, ZeRO-2) keeps the copy."""
    import json
    import logging

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "janus"}))
    (ckpt / weights).write_bytes(b"")
    roots = []

    class Entered(Exception):
        pass

    def fake_node_local_init_from(init_from, root, rank, exchange):
        roots.append(root)
        raise Entered

    monkeypatch.setattr(train, "node_local_init_from", fake_node_local_init_from)
    monkeypatch.setattr(train, "get_processor", lambda *a, **k: None)
    caplog.set_level(logging.INFO, logger="janus_train")
    run = tiny_run([f"model.init_from={ckpt}", "train.init_from_node_copy=/dev/shm"])
    ds = _zero3() if stage == 3 else {"zero_optimization": {"stage": 2}}
    with pytest.raises(Entered):
        train.build_engine(run, resolve_stage(run), DistInfo(0, 1, 0), ds, tmp_path)
    assert roots == ["/dev/shm" if copied else None]
    said = [r for r in caplog.records if "init_from_node_copy" in r.getMessage()]
    assert len(said) == (0 if copied else 1)


def _ranks(n, fn):
    """``fn(rank, exchange)`` on ``n`` threads standing in for ranks; their results (or
    exceptions)."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.helpers import ThreadExchange

    ex = ThreadExchange(n)

    def one(r):
        try:
            return fn(r, ex.for_rank(r))
        except Exception as e:  # noqa: BLE001  (returned to the test)
            return e

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_init_from_is_read_once_per_node(tmp_path, monkeypatch):
    """Four ranks on two nodes (threads, hosts a and b, each its own node-local root): one
    copy of the checkpoint directory per node, by the node's lowest rank; every rank of the
    node loads that copy, bitwise the original; the copies are gone afterwards. Too little
    space on one node: every rank reads init_from itself. A rank whose load fails does not
    leave the others waiting. One rank per node: no copy."""
    from janus_train.trainer import startup

    src = tmp_path / "ckpt"
    src.mkdir()
    files = {"config.json": b"{}", "model.safetensors": bytes(range(256)) * 999, "tok.json": b"t"}
    for name, data in files.items():
        (src / name).write_bytes(data)
    copies = []
    real_copytree = shutil.copytree
    monkeypatch.setattr(
        shutil, "copytree", lambda a, b, **kw: copies.append(a) or real_copytree(a, b, **kw)
    )
    host = {0: "a", 1: "a", 2: "b", 3: "b"}

    def load(r, ex, fail=None):
        with startup.node_local_init_from(str(src), str(tmp_path / host[r]), r, ex, host[r]) as d:
            if r == fail:
                raise RuntimeError("load failed")
            return d, {f.name: f.read_bytes() for f in Path(d).iterdir()}

    got = _ranks(4, load)
    assert len(copies) == 2  # once per node
    assert got[0][0] == got[1][0] != got[2][0] == got[3][0]
    assert Path(got[0][0]).parent == tmp_path / "a" and Path(got[2][0]).parent == tmp_path / "b"
    assert all(files_ == files for _, files_ in got)
    assert not list((tmp_path / "a").iterdir()) and not list((tmp_path / "b").iterdir())

    real_usage = shutil.disk_usage
    monkeypatch.setattr(
        shutil,
        "disk_usage",
        lambda p: real_usage(p)._replace(free=0) if str(p).endswith("b") else real_usage(p),
    )
    assert [d for d, _ in _ranks(4, load)] == [str(src)] * 4  # node b cannot: nobody copies
    assert not list((tmp_path / "a").iterdir())
    monkeypatch.setattr(shutil, "disk_usage", real_usage)

    got = _ranks(4, lambda r, ex: load(r, ex, fail=1))
    assert isinstance(got[1], RuntimeError) and all(isinstance(g, tuple) for g in got[::2])
    # a killed attempt (of the same job) left its copy, partial: the next one replaces it
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    left = tmp_path / "a" / startup.copy_name(src)
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"partial")
    got = _ranks(4, load)
    assert got[0][0] == str(left) and all(files_ == files for _, files_ in got)
    assert not list((tmp_path / "a").iterdir())
    monkeypatch.setenv("SLURM_JOB_ID", "4243")  # another job: another name
    assert startup.copy_name(src) != left.name
    host.update({1: "c", 3: "d"})  # one rank per node: nothing to share
    copies.clear()
    assert [d for d, _ in _ranks(4, load)] == [str(src)] * 4 and not copies
