"""run_eval on the demo's held-out split: metrics, files, the held-out text loss against
HF's own forward, and application metrics plugged in through ``eval.metrics``."""

from __future__ import annotations

import json

import pytest
import torch

from janus_demo import synth, world
from janus_demo.metrics import SCENE_METRICS
from janus_train.config import resolve_stage
from janus_train.evaluate import GenerationOutputs, run_eval
from tests.conftest import tiny_run

SMALL = dict(n_caption=8, n_conversation=8, n_chat=4, n_text=4, n_imagenet=8, n_heldout=12)


def evaluate(model, processor, run, step, out_dir) -> dict:
    """``run_eval`` on ``run``'s typed pieces, as the trainer hands them."""
    return run_eval(
        model, processor, resolve_stage(run), run.model, run.data, run.eval, step, out_dir
    )


def ev(**kw) -> list[str]:
    """The ``eval`` group's overrides."""
    return [f"eval.{k}={v}" for k, v in kw.items()]


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaldata")
    synth.synthesize(synth.SynthConfig(out=str(out), **SMALL))
    return out / "heldout"


@pytest.mark.slow  # two whole evaluations (generation, answers, grid): ~10 s idle
def test_run_eval_metrics_and_files(heldout, tiny_model_and_processor, tmp_path, monkeypatch):
    monkeypatch.setenv("JANUS_EVAL_DATA_ROOT", str(heldout))
    model, processor = tiny_model_and_processor
    cfg = ev(max_per_source=6, batch_size=4, n_und=5, n_gen=5, n_grid=3, max_new_tokens=4)
    was_training = model.training
    for stage in ("stage1", "stage3"):
        out = tmp_path / stage
        run = tiny_run([f"stage={stage}", f"eval.metrics=[{SCENE_METRICS}]", *cfg])
        res = evaluate(model, processor, run, 7, out)
        for k in ("loss/text", "loss/und", "loss/gen"):
            assert 0 < res[k] < 20
        for k in ("und/accuracy", "gen/token_accuracy", "gen/scene_accuracy"):
            assert 0.0 <= res[k] <= 1.0
        saved = json.loads((out / "metrics.json").read_text())
        assert saved["step"] == 7 and saved["loss/gen"] == res["loss/gen"]
        answers = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
        assert len(answers) == 5
        assert res["und/accuracy"] == sum(a["correct"] for a in answers) / 5
        # a grid of 3 prompts x (reference, greedy, 2 samples) tiles
        assert (out / "generated.png").exists()
        assert len(json.loads((out / "generated.json").read_text())["rows"]) == 3
    assert model.training == was_training


def test_heldout_text_loss_matches_hf_forward(
    heldout, tiny_model_and_processor, tmp_path, monkeypatch
):
    recipe = tmp_path / "text_only.yaml"
    recipe.write_text(
        "name: text_only\nsources:\n  - name: text\n    task: text\n    format: text\n"
        f"    shards: {heldout}/text/text-{{000000..000001}}.tar\n"
    )
    model, processor = tiny_model_and_processor
    cfg = ev(recipe=recipe, max_per_source=5, batch_size=3, n_und=0, n_gen=0)
    res = evaluate(model, processor, tiny_run(cfg), 0, tmp_path / "ev")
    assert set(res) == {"loss/text"}

    # independent: HF's forward with labels on each text alone, token-weighted
    tok = processor.tokenizer
    texts = [s["txt"].decode() for s in synth.iter_samples(heldout / "text")][:5]
    total, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor(
                [[tok.bos_token_id, *tok.encode(t, add_special_tokens=False), tok.eos_token_id]]
            )
            loss = model(input_ids=ids, labels=ids).loss
            total += float(loss) * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    assert res["loss/text"] == pytest.approx(total / n, rel=1e-4)


def test_generation_metrics_against_known_outputs(
    heldout, tiny_model_and_processor, tmp_path, monkeypatch
):
    """Wiring of the generation metrics, with the generator replaced by known answers: codes =
    the reference codes and decoded images = the reference renders -> every accuracy is 1; a
    blank image -> no object found and the token accuracy equals the blank baseline. The
    guidance scale comes from ``eval.guidance_scale`` and extra scales are reported."""
    from PIL import Image

    from janus_train import evaluate as E
    from janus_train import sample as S

    monkeypatch.setenv("JANUS_EVAL_DATA_ROOT", str(heldout))
    model, processor = tiny_model_and_processor
    size = model.config.vision_config.image_size
    items = E._generation_items(E.eval_recipe(tiny_run([]).eval), 4)
    assert len(items) == 4 and all(g[2]["scene"] for g in items)  # captions: whole scenes
    unseen = world.heldout_triples()
    assert all(any(o in unseen for o in synth.scene_from_json(g[2]["scene"])) for g in items)
    ref = E.reference_codes(model, [g[1] for g in items], size)
    blank = E.reference_codes(model, [Image.new("RGB", (size, size))], size)
    state = {"mode": "perfect", "scales": []}

    def fake_codes(m, p, prompts, cfg, fmt=None):  # prompt-major, num_images per prompt
        state["scales"].append(cfg.guidance_scale)
        base = ref if state["mode"] == "perfect" else blank.expand(len(items), -1)
        return base[: len(prompts)].repeat_interleave(cfg.num_images, 0)

    def fake_decode(m, codes):
        if state["mode"] == "perfect":
            by_codes = {tuple(r.tolist()): g[1].resize((size, size)) for r, g in zip(ref, items)}
            return [by_codes[tuple(c.tolist())] for c in codes]
        return [Image.new("RGB", (size, size)) for _ in codes]

    monkeypatch.setattr(S, "generate_codes", fake_codes)
    monkeypatch.setattr(S, "decode_codes", fake_decode)
    cfg = ev(max_per_source=4, batch_size=4, n_und=0, n_gen=4, n_grid=2)
    run = tiny_run(
        [
            "stage=stage3",
            "eval.guidance_scale=1.5",
            "eval.extra_guidance_scales=[4.0]",
            f"eval.metrics=[{SCENE_METRICS}]",
            *cfg,
        ]
    )
    for mode in ("perfect", "blank"):
        state.update(mode=mode, scales=[])
        res = evaluate(model, processor, run, 1, tmp_path / mode)
        assert res["gen/guidance_scale"] == 1.5 and state["scales"][0] == 1.5
        assert 4.0 in state["scales"] and "gen/token_accuracy@cfg4" in res
        if mode == "perfect":
            for k in (
                "token_accuracy",
                "object_token_accuracy",
                "scene_accuracy",
                "object_accuracy",
                "unseen_object_accuracy",
            ):
                assert res[f"gen/{k}"] == 1.0, k
        else:
            assert res["gen/token_accuracy"] == res["gen/token_accuracy_blank_baseline"] < 1
            assert res["gen/object_accuracy"] == 0.0 == res["gen/unseen_object_accuracy"]
            assert res["gen/scene_accuracy"] == 0.0


SEEN: list[GenerationOutputs] = []


def record_outputs(outputs: GenerationOutputs) -> dict[str, float]:
    """An application metric (``eval.metrics``) for the test below."""
    SEEN.append(outputs)
    return {"app/n_prompts": len(outputs.prompts)}


def test_application_metrics_hook(heldout, tiny_model_and_processor, tmp_path, monkeypatch):
    """``eval.metrics`` callables get the generation's outputs and add their metrics;
    without them no demo metric appears; a bad name fails before any forward."""
    from janus_train import evaluate as E

    monkeypatch.setenv("JANUS_EVAL_DATA_ROOT", str(heldout))
    model, processor = tiny_model_and_processor
    cfg = ev(max_per_source=2, batch_size=3, n_und=0, n_gen=3, n_grid=1, max_new_tokens=2)
    SEEN.clear()
    run = tiny_run(["stage=stage3", f"eval.metrics=[{__name__}:record_outputs]", *cfg])
    spec = resolve_stage(run)
    res = run_eval(model, processor, spec, run.model, run.data, run.eval, 5, tmp_path / "a")
    assert res["app/n_prompts"] == 3 and len(SEEN) == 1
    out = SEEN[0]
    assert len(out.prompts) == len(out.references) == len(out.images) == len(out.metadata) == 3
    assert out.codes.shape == out.reference_codes.shape and out.codes.shape[0] == 3
    assert all("scene" in m for m in out.metadata)  # the records' json, as the demo wrote it
    assert out.stage is spec and out.step == 5  # typed pieces, not the config tree
    # the encoder of reference images: the reference codes again, one image or several
    assert torch.equal(out.encode(out.references), out.reference_codes)
    assert torch.equal(out.encode(out.references[1:2]), out.reference_codes[1:2])
    res = evaluate(model, processor, tiny_run(["stage=stage3", *cfg]), 0, tmp_path / "b")
    demo = ("scene", "object", "blank")  # janus_demo's metrics, the blank baseline included
    assert "gen/token_accuracy" in res and not any(d in k for k in res for d in demo)

    calls = []
    monkeypatch.setattr(E, "heldout_losses", lambda *a: calls.append(a) or {})
    for spec, msg in [
        ("no_colon", "is not 'package.module:function'"),
        ("janus_no_such_module:f", "cannot load"),
        (f"{__name__}:no_such_function", "cannot load"),
        (f"{__name__}:SEEN", "is not callable"),
    ]:
        bad = tiny_run(["stage=stage3", f"eval.metrics=[{spec}]", *cfg])
        with pytest.raises(ValueError, match=f"eval.metrics: .*{msg}"):
            evaluate(model, processor, bad, 0, tmp_path / "c")
    assert calls == []
