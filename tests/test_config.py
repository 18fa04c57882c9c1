"""The config tree: every shipped config composes, published recipes carry the spec's numbers,
bad configs fail at compose/validate time naming the field."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys

import pytest
from omegaconf.errors import ConfigKeyError, ValidationError

from janus_train.config import CONF_DIR, compose, recipe_ref, to_run_config
from tests.helpers import mutable_parts

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
STAGES = sorted(p.stem for p in (CONF_DIR / "stage").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
DEEPSPEED = sorted(p.stem for p in (CONF_DIR / "deepspeed").glob("*.yaml"))

# Spec §5 hyper-parameter table, typed out independently of the YAML:
# (lr, schedule, wd, warmup, steps, batch, (und, text, gen))
SPEC = {
    "janus_1.3b": {
        "stage1": (1e-3, "cosine", 0.0, 300, 10_000, 256, (1, 0, 1)),
        "stage2": (1e-4, "constant", 0.0, 5000, 180_000, 512, (2, 3, 5)),
        "stage3": (2e-5, "constant", 0.1, 0, 24_000, 256, (7, 3, 10)),
    },
    "janus_pro_1b": {
        "stage1": (1e-3, "constant", 0.0, 600, 20_000, 256, (1, 0, 3)),
        "stage2": (1e-4, "constant", 0.0, 5000, 360_000, 512, (2, 3, 5)),
        "stage3": (4e-5, "constant", 0.0, 0, 80_000, 128, (5, 1, 4)),
    },
    "janus_pro_7b": {
        "stage1": (1e-3, "constant", 0.0, 600, 20_000, 256, (1, 0, 3)),
        "stage2": (1e-4, "constant", 0.0, 5000, 360_000, 512, (2, 3, 5)),
        "stage3": (4e-5, "constant", 0.0, 0, 40_000, 128, (5, 1, 4)),
    },
}
# Published dimensions (spec §1): (d, layers, heads)
DIMS = {
    "janus_1.3b": (2048, 24, 16),
    "janus_pro_1b": (2048, 24, 16),
    "janus_pro_7b": (4096, 30, 32),
}


def test_shipped_groups_present():
    assert {"tiny", "janus_1.3b", "janus_pro_1b", "janus_pro_7b"} <= set(MODELS)
    assert {"stage1", "stage2", "stage3"} <= set(STAGES)
    assert {"janus_1.3b", "janus_pro_1b", "janus_pro_7b"} <= set(EXPERIMENTS)
    assert {"zero1", "zero2", "zero3", "zero3_offload"} <= set(DEEPSPEED)


@pytest.mark.parametrize("exp,stage", list(itertools.product(EXPERIMENTS, STAGES)))
def test_every_experiment_stage_composes(exp, stage):
    if "_lora_sft" in exp and stage != "stage3":  # fine-tuning recipes: stage 3 only
        with pytest.raises(ValueError, match="model.lora.groups"):
            to_run_config(compose([f"experiment={exp}", f"stage={stage}"]))
        return
    run = to_run_config(compose([f"experiment={exp}", f"stage={stage}"]))
    assert run.stage.name == stage
    assert run.experiment.name == exp


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("ds", DEEPSPEED)
def test_every_model_and_deepspeed_composes(model, ds):
    run = to_run_config(compose([f"model={model}", f"deepspeed={ds}"]))
    assert run.model.name == model


@pytest.mark.parametrize("exp", sorted(SPEC))
def test_published_recipes_match_spec(exp):
    for stage, (lr, sched, wd, warm, steps, batch, ratio) in SPEC[exp].items():
        hp = to_run_config(compose([f"experiment={exp}", f"stage={stage}"])).hparams
        assert (hp.lr, hp.schedule.value, hp.weight_decay, hp.warmup_steps) == (lr, sched, wd, warm)
        assert (hp.steps, hp.global_batch_size) == (steps, batch)
        assert (hp.ratio.und, hp.ratio.text, hp.ratio.gen) == ratio
    run = to_run_config(compose([f"experiment={exp}"]))
    assert run.model.name == exp
    t = run.model.text
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads) == DIMS[exp]
    assert run.model.num_image_tokens == 576
    assert run.model.vq.num_embeddings == 16384 and run.model.vq.embed_dim == 8
    assert run.experiment.chat_template.value == ("janus" if exp == "janus_1.3b" else "janus_pro")


def test_stage_freeze_lists():
    get = lambda s: set(to_run_config(compose([f"stage={s}"])).trainable_groups)  # noqa: E731
    assert get("stage1") == {"und_adaptor", "gen_adaptor", "gen_head"}
    assert get("stage2") == {"und_adaptor", "gen_adaptor", "gen_head", "llm"}
    assert get("stage3") == {"und_encoder", "und_adaptor", "gen_adaptor", "gen_head", "llm"}


def _resolved_spec(tmp_path):
    """A stage spec resolved as ``prepare()`` does, with a three-source recipe loaded."""
    from janus_train.config import resolve_stage
    from tests.helpers import make_run, recipe_file

    und = dict(name="u", task="understanding", format="caption", shards="u-{0..1}.tar")
    recipe = recipe_file(
        tmp_path,
        [
            {**und, "steps": [0, 100], "sample_tokens": [10, 20], "weight": 2},
            dict(name="t", task="text", format="text", shards=["t.tar"]),
            dict(name="g", task="generation", format="caption", shards="g.tar"),
        ],
    )
    return resolve_stage(make_run("stage2", recipe, 4), 1, with_recipe=True, check_shards=False)


def test_the_stage_spec_is_immutable_all_the_way_down(tmp_path):
    """``prepare()`` resolves the stage once: neither the spec nor any piece of it (ratio,
    framing, plan, recipe, its sources and their lists) can change afterwards; consumers read
    the same values."""
    import dataclasses

    spec = _resolved_spec(tmp_path)
    src = spec.recipe.sources[0]
    assert spec.ratio == {"und": 2, "text": 3, "gen": 5} and dict(spec.ratio)["gen"] == 5
    assert src.shards == ("u-0.tar", "u-1.tar") and src.steps == (0, 100) and src.weight == 2
    assert [s.name for s in spec.recipe.sources] == ["u", "t", "g"]
    attempts = {
        "ratio item": lambda: spec.ratio.__setitem__("und", 9),
        "ratio": lambda: setattr(spec, "ratio", {}),
        "framing": lambda: setattr(spec.prompt, "system_prompt", "x"),
        "plan": lambda: setattr(spec.plan, "world_size", 2),
        "recipe": lambda: setattr(spec.recipe, "sources", ()),
        "sources": lambda: spec.recipe.sources.append(src),
        "source": lambda: setattr(src, "weight", 3.0),
        "shards": lambda: src.shards.append("x.tar"),
        "trainable": lambda: spec.trainable.append("x"),
    }
    for what, attempt in attempts.items():
        with pytest.raises((TypeError, AttributeError)):
            attempt()
            pytest.fail(f"{what} changed")
    assert mutable_parts(spec) == []
    # lists given to the recipe's types become tuples; a ratio given as a dict is copied
    ratio = {"und": 1, "text": 0, "gen": 1}
    other = dataclasses.replace(spec, ratio=ratio, trainable=["llm"])
    ratio["und"] = 7
    assert other.ratio["und"] == 1 and other.trainable == ("llm",) and spec.ratio["und"] == 2
    assert mutable_parts(dataclasses.replace(spec.recipe, sources=[src])) == []


def test_the_stage_spec_pickles_and_deep_copies_and_stays_immutable(tmp_path):
    """Metric plugins receive the spec (``GenerationOutputs.stage``), which may cross a process
    or be copied: a pickle round-trip, a deep copy and ``dataclasses.asdict`` work and give the
    same values, and the copies are as immutable as the original."""
    import copy
    import dataclasses
    import pickle

    spec = _resolved_spec(tmp_path)
    for other in (pickle.loads(pickle.dumps(spec)), copy.deepcopy(spec)):
        assert other == spec and other is not spec and other.ratio is not spec.ratio
        assert dict(other.ratio) == {"und": 2, "text": 3, "gen": 5}
        assert other.recipe.sources[0].shards == ("u-0.tar", "u-1.tar")
        assert mutable_parts(other) == []
        with pytest.raises(TypeError):
            other.ratio["und"] = 9
        with pytest.raises(AttributeError):
            other.ratio.view = {}
        with pytest.raises(AttributeError):
            other.ratio = {}
        assert other.ratio["und"] == 2
    as_dict = dataclasses.asdict(spec)
    assert dict(as_dict["ratio"]) == {"und": 2, "text": 3, "gen": 5}
    assert as_dict["plan"] == dataclasses.asdict(spec.plan)


def test_stage_steps_and_batch_have_one_key_and_reading_them_writes_nothing():
    run = to_run_config(
        compose(
            ["stage=stage2", "experiment.stage2.steps=7", "experiment.stage2.global_batch_size=4"]
        )
    )
    assert (run.hparams.steps, run.hparams.global_batch_size) == (7, 4)
    assert run.experiment.stage1.steps == 20  # the other stages keep the experiment's values
    assert not hasattr(run.train, "steps") and not hasattr(run.train, "global_batch_size")


@pytest.mark.parametrize("prefix", ["", "+", "++"])
@pytest.mark.parametrize("key", ["steps", "global_batch_size"])
def test_removed_train_keys_name_their_replacement(key, prefix):
    with pytest.raises(ValueError) as e:
        compose([f"{prefix}train.{key}=3"])
    assert str(e.value).startswith(f"train.{key} was removed: set experiment.<stage>.{key}")


@pytest.mark.parametrize("prefix", ["", "+", "~"])
def test_train_gen_embeddings_is_gone_for_one_trainable_list(prefix):
    with pytest.raises(ValueError) as e:
        compose(
            [
                "stage=stage2",
                f"{prefix}stage.train_gen_embeddings" + ("" if prefix == "~" else "=true"),
            ]
        )
    assert str(e.value) == (
        "stage.train_gen_embeddings was removed: set stage.trainable instead "
        "(e.g. stage.trainable=[und_adaptor,gen_adaptor,gen_head,gen_embeddings])"
    )
    run = to_run_config(compose(["stage=stage2", "stage.trainable=[llm,gen_embeddings]"]))
    assert run.trainable_groups == ["llm", "gen_embeddings"]


def test_data_recipe_is_gone_for_the_stage_recipe():
    """One key for a stage's mixture: ``experiment.<stage>.data_recipe``; the old override is
    refused with the user's own value and stage in the example."""
    with pytest.raises(ValueError) as e:
        compose(["stage=stage3", "data.recipe=my_sft"])
    assert str(e.value) == (
        "data.recipe was removed: set experiment.<stage>.data_recipe instead "
        "(e.g. experiment.stage3.data_recipe=my_sft)"
    )
    with pytest.raises(
        ValueError, match=r"\(e\.g\. stage=stage2 experiment\.stage2\.data_recipe=x\)$"
    ):
        compose(["+data.recipe=x"])
    run = to_run_config(compose(["stage=stage3", "experiment.stage3.data_recipe=my_sft"]))
    assert recipe_ref(run) == "my_sft" and not hasattr(run.data, "recipe")


def test_removed_key_in_a_yaml_file_names_its_replacement(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "experiment" / "old.yaml").write_text(
        (conf / "experiment" / "tiny.yaml").read_text() + "train:\n  global_batch_size: 3\n"
    )
    with pytest.raises(ValueError, match=r"^train.global_batch_size was removed: set experiment"):
        compose(["experiment=old"], config_dir=conf)
    (conf / "experiment" / "old.yaml").write_text("# @package _global_\ndata:\n  recipe: mine\n")
    with pytest.raises(
        ValueError, match=r"^data.recipe was removed: set experiment.<stage>.data_r"
    ):
        compose(["experiment=old"], config_dir=conf)


@pytest.mark.parametrize(
    "override,exc,field",
    [
        ("model.text.hidden_sz=3", ConfigKeyError, "hidden_sz"),
        ("model.text.hidden_size=abc", ValidationError, "hidden_size"),
        ("experiment.stage2.lr=fast", ValidationError, "lr"),
        ("experiment.stage1.schedule=linear", ValidationError, "schedule"),
        ("stage.und_format=markdown", ValidationError, "und_format"),
        ("train.micro_batch_sz=2", ConfigKeyError, "micro_batch_sz"),
    ],
)
def test_bad_overrides_fail_at_compose_naming_field(override, exc, field):
    with pytest.raises(Exception) as info:
        compose([override])
    text = str(info.value) + str(getattr(info.value, "__cause__", ""))
    assert field in text


@pytest.mark.parametrize(
    "override,field",
    [
        ("stage.trainable=[llm,vq]", "stage.trainable"),
        ("stage.trainable=[llm,siglip]", "stage.trainable"),
        ("stage.name=stage4", "stage.name"),
        ("experiment.stage1.ratio.gen=-1", "experiment.stage1.ratio.gen"),
        ("experiment.stage1.lr=0", "experiment.stage1.lr"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
        ("train.loss_reduction=mean", "train.loss_reduction"),
        ("model.image_size=30", "model.image_size"),
        ("eval.guidance_scale=0.5", "eval.guidance_scale"),
        ("eval.extra_guidance_scales=[2,0.5]", "eval.extra_guidance_scales"),
        ("eval.n_gen=-1", "eval.n_gen"),
        ("eval.every=-1", "eval.every"),
    ],
)
def test_semantic_errors_name_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        to_run_config(compose([override]))


def test_evaluation_needs_its_recipe():
    """``eval.every`` > 0 without ``eval.recipe`` fails at validation; the tiny experiment names
    its held-out recipe, the real ones none."""
    with pytest.raises(ValueError, match=r"^eval\.every=5 needs eval\.recipe"):
        to_run_config(compose(["experiment=janus_pro_1b", "eval.every=5"]))
    assert to_run_config(compose(["eval.every=5"])).eval.recipe == "tiny_heldout"


@pytest.mark.parametrize("key", ["every", "recipe", "metrics", "guidance_scale"])
def test_eval_keys_left_train_for_the_eval_group(key):
    with pytest.raises(ValueError, match=rf"^train\.eval_{key} was removed: set eval\.{key} "):
        compose([f"train.eval_{key}=1"])


def test_bad_yaml_file_names_the_key(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "stage" / "broken.yaml").write_text("name: stage1\ntrainabel: [llm]\n")
    (conf / "deepspeed" / "typo.yaml").write_text("zero_stage: three\n")
    with pytest.raises(Exception, match="trainabel"):
        compose(["stage=broken"], config_dir=conf)
    with pytest.raises(Exception, match="zero_stage"):
        compose(["deepspeed=typo"], config_dir=conf)


def test_cli_prints_composed_config_and_rejects_unknown_key():
    cmd = [sys.executable, "-m", "janus_train.train"]
    ok = subprocess.run(
        cmd + ["experiment=janus_pro_1b", "stage=stage2", "--cfg", "job"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "hidden_size: 2048" in ok.stdout and "name: stage2" in ok.stdout
    bad = subprocess.run(
        cmd + ["stage.trainabel=[llm]", "--cfg", "job"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode != 0
    assert "trainabel" in bad.stderr


def test_readme_config_table_lists_every_option_of_each_group():
    """The README's config-group table names exactly the YAML files of ``conf/<group>/``."""
    import re

    readme = (CONF_DIR.parent / "README.md").read_text()
    for group in ("model", "stage", "experiment", "deepspeed"):
        row = re.search(rf"^\| `{group}` \| (.*?) \|", readme, re.M)
        assert row, f"README: no row for config group {group}"
        listed = set(re.findall(r"`([^`]+)`", row.group(1)))
        assert listed == {p.stem for p in (CONF_DIR / group).glob("*.yaml")}, group
