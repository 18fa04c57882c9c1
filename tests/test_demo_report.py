"""The demo report explains a held-out loss that rises in stage 3, and only then."""

from janus_demo.report import held_out_loss_section

S2 = {"loss/text": 0.46, "loss/und": 0.12, "loss/gen": 0.83, "und/accuracy": 0.84}
TRAIN = {"stage3": {"loss/text": 0.0, "loss/und": 0.015}}


def test_rising_held_out_loss_is_explained_with_the_figures():
    s3 = {"loss/text": 2.58, "loss/und": 0.11, "loss/gen": 1.26, "und/accuracy": 0.84}
    text = "\n".join(held_out_loss_section({"stage2": S2, "stage3": s3}, TRAIN))
    assert "| stage3 | 2.580 | 0.110 | 1.260 |" in text
    assert "Held-out loss/text, loss/gen rise from stage 2 to stage 3" in text  # not loss/und
    assert "und 0.015" in text


def test_no_explanation_when_nothing_rises():
    s3 = {k: v / 2 for k, v in S2.items()}
    lines = held_out_loss_section({"stage2": S2, "stage3": s3}, TRAIN)
    assert not any("rise from stage 2" in line for line in lines)


def test_report_reads_the_stage_guidance_from_the_eval_group(tmp_path):
    from omegaconf import OmegaConf

    from janus_demo.report import stage_guidance
    from janus_train.config import compose

    assert stage_guidance(tmp_path) == 5.0  # no stage-3 run: eval.guidance_scale's default
    (tmp_path / "stage3").mkdir()
    cfg = compose(["stage=stage3", "eval.guidance_scale=1.5"])
    OmegaConf.save(cfg, tmp_path / "stage3" / "config.yaml")  # as the trainer saves it
    assert stage_guidance(tmp_path) == 1.5
