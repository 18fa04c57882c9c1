"""ZeRO-3 and the frozen VQ: HF's quantizer reads its codebook tensor without calling the
child module, so outside the engine's forward (evaluation, sampling from a live engine) ZeRO-3
would leave it partitioned. ``init_engine`` declares it; codes must match an unsharded copy,
both through the engine's forward and through a direct ``encode_images`` call.

Run by pytest (which launches this file under torchrun with 2 CPU ranks)."""

from __future__ import annotations

import sys

import pytest


def _worker(workdir: str) -> None:
    import torch

    from janus_train.model import JanusTrainModel, apply_freeze, build_model, resolve_special_tokens
    from janus_train.trainer.distributed import init_engine, setup_distributed
    from tests.conftest import tiny_run
    from tests.helpers import collate, gen_sample

    info = setup_distributed()
    run = tiny_run(["stage=stage2"])
    janus, proc = build_model(run.model, workdir=workdir)
    ref = JanusTrainModel(build_model(run.model, workdir=workdir)[0])
    apply_freeze(janus, run.trainable_groups)
    model = JanusTrainModel(janus, params_partitioned=True)
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        # torch's AdamW, as train.py configures it: DeepSpeed's own would JIT-build its fused_adam
        # op (~35 s the first time in a venv), which has nothing to do with what is tested here
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    engine = init_engine(model, cfg, [p for p in model.parameters() if p.requires_grad])
    torch.manual_seed(0)
    px = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(engine.module.encode_images(px), ref.encode_images(px))
    st = resolve_special_tokens(proc.tokenizer)
    n = run.model.num_image_tokens
    batch = collate([gen_sample(proc.tokenizer, st, [-1] * n)] * 2, st.pad)
    batch["gen_pixel_values"] = px
    with torch.no_grad():
        got, want = engine(batch), ref(batch)
    torch.testing.assert_close(got["loss_sum"], want["loss_sum"], rtol=1e-5, atol=1e-5)
    print(f"rank {info.rank} ok", flush=True)


@pytest.mark.dist
def test_vq_encode_under_zero3_matches_unsharded(tmp_path):
    from tests.dist_utils import run_torchrun

    res = run_torchrun([__file__, str(tmp_path)], nproc=2, timeout=300)
    assert res.returncode == 0, res.output[-4000:]
    assert "rank 0 ok" in res.output and "rank 1 ok" in res.output


if __name__ == "__main__":
    _worker(sys.argv[1])
