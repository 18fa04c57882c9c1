"""Start-up (issue 22 item 4): ``model.init_from`` is read in the training dtype, so a bf16 run's
rank never holds an fp32 copy of the weights (``benchmarks/bench_startup.py`` measures it on
2 ranks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from janus_train import train
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
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    assert peak < 0.25 * fp32_mb, (peak, fp32_mb)  # memory-mapped: not even a bf16 copy
    for k, p in params.items():
        assert torch.equal(p, ref[k]), k
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


@pytest.mark.parametrize(("bf16", "dtype"), [(True, torch.bfloat16), (False, torch.float32)])
def test_build_engine_reads_in_the_engine_dtype(monkeypatch, tmp_path, bf16, dtype):
    seen = []

    class Built(Exception):
        pass

    def fake_build_model(cfg, workdir=None, dtype=torch.float32):
        seen.append(dtype)
        raise Built

    monkeypatch.setattr(train, "build_model", fake_build_model)
    monkeypatch.setattr(train, "get_processor", lambda *a, **k: None)
    with pytest.raises(Built):
        train.build_engine(tiny_run(), DistInfo(0, 1, 0), {"bf16": {"enabled": bf16}}, tmp_path)
    assert seen == [dtype]
