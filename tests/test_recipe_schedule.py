"""The shipped Janus and Janus-Pro recipes give the papers' text-to-image source schedule, as the
mixer draws it step by step (Janus arXiv 2410.13848, data setup: ImageNet-1k alone for the first 2/3 of
stage II, 120K of 180K steps, then general text-to-image data; Janus-Pro arXiv 2501.17811, data scaling:
no ImageNet in stage II, real : synthetic aesthetic data 1 : 1)."""

from __future__ import annotations

from collections import Counter

import pytest

from janus_train.batch import task_counts
from janus_train.config import compose, to_run_config
from janus_train.data.mixing import step_plan
from janus_train.data.recipe import check_recipe_for_stage, load_recipe


def _gen_sources(exp: str, stage: str, step: int) -> Counter:
    """Generation samples per source name in one step of the stage's global batch."""
    hp = to_run_config(compose([f"experiment={exp}", f"stage={stage}"])).hparams
    recipe = load_recipe(hp.data_recipe, check_shards=False)
    check_recipe_for_stage(recipe, vars(hp.ratio), hp.steps)
    counts = task_counts(vars(hp.ratio), hp.global_batch_size)
    plan = step_plan(recipe, counts, step, 1, hp.global_batch_size, 1, seed=0)
    srcs = [recipe.sources[i] for i in plan[0][0]]
    return Counter(s.name for s in srcs if s.task == "generation"), hp.steps


# (experiment, stage, step) -> the only generation sources drawn at that step
SCHEDULE = [
    ("janus_1.3b", "stage1", 0, {"imagenet1k"}),
    ("janus_1.3b", "stage1", 9999, {"imagenet1k"}),
    ("janus_1.3b", "stage2", 0, {"imagenet1k"}),
    ("janus_1.3b", "stage2", 119999, {"imagenet1k"}),
    ("janus_1.3b", "stage2", 120000, {"t2i"}),
    ("janus_1.3b", "stage2", 179999, {"t2i"}),
    ("janus_1.3b", "stage3", 0, {"t2i"}),
    ("janus_pro_1b", "stage1", 0, {"imagenet1k"}),
    ("janus_pro_1b", "stage1", 19999, {"imagenet1k"}),
    ("janus_pro_1b", "stage2", 0, {"t2i_real", "t2i_synthetic"}),
    ("janus_pro_1b", "stage2", 359999, {"t2i_real", "t2i_synthetic"}),
    ("janus_pro_7b", "stage2", 200000, {"t2i_real", "t2i_synthetic"}),
    ("janus_pro_1b", "stage3", 0, {"t2i_real", "t2i_synthetic"}),
]


@pytest.mark.parametrize("exp,stage,step,want", SCHEDULE)
def test_generation_sources_per_step(exp, stage, step, want):
    got, steps = _gen_sources(exp, stage, step)
    assert step < steps
    assert set(got) == want, got


def test_janus_stage2_ends_where_the_schedule_ends():
    """The t2i window closes at the stage's last step: a longer stage 2 fails validation
    rather than running without generation data."""
    hp = to_run_config(compose(["experiment=janus_1.3b", "stage=stage2"])).hparams
    recipe = load_recipe(hp.data_recipe, check_shards=False)
    with pytest.raises(ValueError, match="no 'gen' source is active at step 180000"):
        check_recipe_for_stage(recipe, vars(hp.ratio), hp.steps + 1000)


def test_janus_pro_stage2_real_and_synthetic_one_to_one():
    recipe = load_recipe("janus_pro_stage2", check_shards=False)
    w = {s.name: s.weight for s in recipe.sources if s.task == "generation"}
    assert w == {"t2i_real": 1.0, "t2i_synthetic": 1.0}
