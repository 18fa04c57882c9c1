"""VQ code assignment is DeepSeek's (cosine nearest code over L2-normalised latents and codebook,
``janus/models/vq_model.py`` ``VectorQuantizer`` with ``codebook_l2_norm``), not HF's raw squared
distance, in the in-step encode and in ``janus-data vq-encode`` alike. Checked on a codebook whose
rows have spread norms, where the two differ, against a cosine argmax written here."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from janus_train.cli import data as cli
from janus_train.data.preprocess import decode_image, gen_pixels
from janus_train.data.shards import ShardCursor
from janus_train.data.synthetic import caption_records
from janus_train.data.tario import write_tar
from janus_train.model.forward import JanusTrainModel
from janus_train.model.vq_codes import normalized_codebook, normalized_latents, vq_codes
from tests.helpers import reference_codes


def _spread_norms(model, seed: int = 0) -> None:
    """Scale each codebook row by a factor in [0.05, 20] (log-uniform)."""
    emb = model.model.vqmodel.quantize.embedding.weight
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.empty(emb.shape[0], 1).uniform_(np.log(0.05), np.log(20), generator=g))
    with torch.no_grad():
        emb.mul_(scale)


@pytest.fixture(scope="module")
def spread_model(tmp_path_factory):
    from janus_train.model import build_model
    from tests.conftest import tiny_run

    wd = tmp_path_factory.mktemp("vq")
    model, _ = build_model(tiny_run().model, workdir=wd)
    _spread_norms(model)
    model.eval()
    model.save_pretrained(wd / "m")
    return model, wd


def test_in_step_codes_are_the_cosine_argmax(spread_model):
    model, _ = spread_model
    torch.manual_seed(0)
    px = torch.rand(64, 3, 32, 32) * 2 - 1
    want, hf = reference_codes(model.model.vqmodel, px)
    got = JanusTrainModel(model).encode_images(px)
    assert got.shape == (64, 16) and got.dtype == torch.long
    assert torch.equal(got, want)
    # the test can tell the two assignments apart: HF's raw-distance encode differs here
    hf_agree = float((hf == want).float().mean())
    print(f"HF encode agreement with the cosine argmax: {hf_agree:.3f}")
    assert hf_agree < 0.8, hf_agree


def test_codes_of_a_bf16_vq_are_computed_in_fp32(spread_model):
    """A VQ held in bf16 assigns its codes in fp32 (on fp32 copies of its weights): the float64
    argmax over the same (bf16-valued) weights in an fp32 VQ, which a bf16 computation misses
    on some codes; the module itself is left in bf16."""
    import copy

    model, _ = spread_model
    vq16 = copy.deepcopy(model.model.vqmodel).to(torch.bfloat16)
    vq32 = copy.deepcopy(vq16).float()
    torch.manual_seed(1)
    px = torch.rand(8, 3, 32, 32) * 2 - 1
    want, _ = reference_codes(vq32, px)
    assert torch.equal(vq_codes(vq16, px), want)
    assert vq16.quant_conv.weight.dtype == torch.bfloat16
    with torch.no_grad():  # what a bf16 computation would assign
        z = normalized_latents(vq16, px.bfloat16())
        bf16 = (z @ normalized_codebook(vq16).t()).argmax(-1).view(8, -1)
    assert not torch.equal(bf16, want)


def test_detached_vq_is_out_of_the_tree_in_fp32_and_still_exported(tmp_path):
    """``detach_vq``: the wrapping module's parameters, state dict and dtype casts no longer
    reach the VQ (what DeepSpeed would cast and partition); ``janus.model.vqmodel`` still reads
    it; ``vq_state_dict`` gives its tensors under their state-dict names; a checkpoint written
    with the VQ inside the engine still loads strictly (its VQ tensors dropped), while any
    other unexpected key still fails."""
    from janus_train.model import build_model
    from janus_train.model.vq_codes import detach_vq, vq_state_dict
    from janus_train.trainer.checkpoint import load_module_state
    from tests.conftest import tiny_run

    janus, _ = build_model(tiny_run().model, workdir=tmp_path)
    before = {k: v.clone() for k, v in janus.state_dict().items()}
    legacy = JanusTrainModel(janus).state_dict()
    assert vq_state_dict(janus) == {}
    tm = JanusTrainModel(janus)
    vq = detach_vq(janus)
    assert detach_vq(janus) is vq and janus.model.vqmodel is vq
    assert not any("vqmodel" in k for k, _ in tm.named_parameters())
    tm.to(torch.bfloat16)
    assert {p.dtype for p in vq.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in vq.parameters()) and not vq.training
    got = {**janus.state_dict(), **vq_state_dict(janus)}
    assert got.keys() == before.keys()
    assert all(torch.equal(got[k], before[k]) for k in before if "vqmodel" in k)
    load_module_state(legacy, tm)  # legacy VQ keys dropped, the rest strict
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_module_state({**legacy, "janus.extra.weight": torch.zeros(1)}, tm)


def test_vq_encode_writes_the_cosine_argmax(spread_model, tmp_path):
    model, wd = spread_model
    src = write_tar(tmp_path / "in" / "cap-000000.tar", caption_records(0, 6, size=(48, 40)))
    out = tmp_path / "out"
    cli.main(f"vq-encode --model {wd / 'm'} --shards {src} --out {out} --batch-size 4".split())
    recs = [r for _, r in ShardCursor(str(out / "cap-000000.tar"), None).iterate(0, lambda _: True)]
    got = np.stack([np.load(io.BytesIO(r.members["codes.npy"]), allow_pickle=False) for r in recs])
    x = torch.from_numpy(np.stack([gen_pixels(decode_image(r.members["jpg"]), 32) for r in recs]))
    want, _ = reference_codes(model.model.vqmodel, x)
    assert np.array_equal(got, want.numpy())
