"""The one typed config tree: dataclasses registered in Hydra's ConfigStore; YAML in ``conf/``
only fills values, so an unknown key or a wrong type fails at compose time naming the field.

Root layout (``conf/config.yaml`` picks the defaults)::

    model       ModelConfig        conf/model/*.yaml       architecture / checkpoint
    stage       StageConfig        conf/stage/*.yaml       which stage, what trains
    experiment  ExperimentConfig   conf/experiment/*.yaml  every stage's hyper-parameters
    deepspeed   DeepSpeedConfig    conf/deepspeed/*.yaml   ZeRO stage, offload, precision
    data        DataConfig         loader / sample-builder settings
    train       TrainConfig        loop, logging, checkpoints
    eval        EvalConfig         held-out evaluation: when, recipe, sizes, guidance, metrics
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from janus_train.batch import plan_batch
from janus_train.data.config import DataConfig
from janus_train.data.recipe import Recipe, check_recipe_for_stage, load_recipe
from janus_train.model.attention import check_attn_implementation
from janus_train.model.chat_template import PromptFormat
from janus_train.model.compile import check_compile_backend
from janus_train.model.config import ModelConfig
from janus_train.model.freeze import validate_trainable
from janus_train.model.kernels import check_kernels_config
from janus_train.model.lora import validate_lora
from janus_train.trainer.config import DeepSpeedConfig, EvalConfig, TrainConfig
from janus_train.trainer.spec import StageSpec

CONF_DIR = Path(os.environ.get("JANUS_TRAIN_CONF", Path(__file__).resolve().parent.parent / "conf"))
STAGES = ("stage1", "stage2", "stage3")


class Schedule(str, Enum):
    constant = "constant"
    cosine = "cosine"


class ChatTemplate(str, Enum):
    janus = "janus"
    """Janus 1.3B: ``User`` / ``Assistant`` roles."""
    janus_pro = "janus_pro"
    """Janus-Pro: ``<|User|>`` / ``<|Assistant|>`` roles."""


class UndFormat(str, Enum):
    """How captions and conversations (understanding, and text conversations) are framed
    (``docs/data.md``)."""

    plain = "plain"
    """Stage 1: captions ``<image><caption>``; conversations ``<question><answer>``."""
    qa = "qa"
    """The papers' stage 2: captions ``<image>Describe the image in detail.<caption>``,
    conversations ``<question><answer>``; no chat roles, no system prompt."""
    chat = "chat"
    """Stage 3: the chat template (``experiment.chat_template`` roles) headed by
    ``data.system_prompt``; captions as the answer to "Describe the image in detail."."""


class GenFormat(str, Enum):
    """How a text-to-image prompt is framed."""

    plain = "plain"
    """``<caption><image>`` (stages 1 and 2 in the papers)."""
    chat = "chat"
    """``U: caption\\n\\nA:<image>``: the chat template's user turn, no system prompt (stage 3,
    DeepSeek's ``generation_inference.py``)."""


@dataclass
class TaskRatio:
    """Samples of each task per optimizer step, as a ratio (understanding : text : generation)."""

    und: int = 1
    """Understanding samples (image + question -> answer)."""
    text: int = 0
    """Text-only samples (language modelling, chat)."""
    gen: int = 1
    """Generation samples (caption -> image codes)."""


@dataclass
class StageHParams:
    """One stage's hyper-parameters (spec §5 tables)."""

    lr: float = 1e-3
    """Peak learning rate of AdamW, reached at the end of the warmup."""
    schedule: Schedule = Schedule.constant
    """After the warmup: ``constant``, or ``cosine`` down to ``min_lr_ratio * lr`` at ``steps``."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup to ``lr``."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of lr."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to norms, biases and embeddings)."""
    steps: int = 1000
    """Optimizer steps of the stage and its schedule (override: ``experiment.<stage>.steps=N``)."""
    global_batch_size: int = 256
    """Samples per optimizer step over all ranks, split between tasks by ``ratio``."""
    ratio: TaskRatio = field(default_factory=TaskRatio)
    data_recipe: str = "tiny"
    """The stage's data mixture: a name in ``data_recipes/`` (without .yaml) or a path to a
    YAML file (override: ``experiment.<stage>.data_recipe=NAME_OR_PATH``)."""
    stop_at: int | None = None
    """End the stage at this step although the schedule runs to ``steps`` (Janus-Pro stage 2:
    scheduled for 360K, stopped at 270K)."""
    first_sentence_prob: float = 0.0
    """Probability that a generation caption keeps only its first sentence (Janus stage 2:
    0.25, the paper's data setup; the other stages: 0)."""
    und_format: UndFormat | None = None
    """Overrides ``stage.und_format`` for this stage of this experiment (None: the stage's)."""
    gen_format: GenFormat | None = None
    """Overrides ``stage.gen_format`` for this stage of this experiment (None: the stage's)."""


@dataclass
class ExperimentConfig:
    """A published recipe: the three stages' hyper-parameters and the chat template."""

    name: str = "tiny"
    """Label of the recipe (its ``conf/experiment`` file); part of the default ``train.run_dir``
    and of the wandb run name."""
    chat_template: ChatTemplate = ChatTemplate.janus_pro
    """Role strings of the prompt format and of the exported chat template."""
    stage1: StageHParams = field(default_factory=StageHParams)
    stage2: StageHParams = field(default_factory=StageHParams)
    stage3: StageHParams = field(default_factory=StageHParams)


@dataclass
class StageConfig:
    """What a stage is: which module groups train and how samples are framed (spec §5)."""

    name: str = "stage1"
    """``stage1`` | ``stage2`` | ``stage3``: selects ``experiment.<name>``."""
    trainable: list[str] = field(default_factory=lambda: ["und_adaptor", "gen_adaptor", "gen_head"])
    """Module groups that train: und_encoder, und_adaptor, gen_embeddings, gen_adaptor,
    gen_head, llm (vq never). No shipped stage trains ``gen_embeddings`` (the papers do not
    say): add it to the list to train it."""
    und_format: UndFormat = UndFormat.plain
    """Framing of captions and conversations: plain | qa | chat (``UndFormat``)."""
    gen_format: GenFormat = GenFormat.plain
    """Framing of text-to-image prompts: plain | chat (``GenFormat``)."""
    sft: bool = False
    """Conversations with system/user turns masked (stage 3)."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def hparams(self) -> StageHParams:
        """The selected stage's hyper-parameters: ``experiment.<stage.name>``."""
        e = self.experiment
        return {"stage1": e.stage1, "stage2": e.stage2, "stage3": e.stage3}[self.stage.name]

    @property
    def trainable_groups(self) -> list[str]:
        """The module groups that train: ``stage.trainable``."""
        return list(self.stage.trainable)


REMOVED_KEYS = {
    "train.steps": "experiment.<stage>.steps",
    "train.global_batch_size": "experiment.<stage>.global_batch_size",
    "stage.train_gen_embeddings": "stage.trainable",
    "train.eval_every": "eval.every",
    "train.eval_recipe": "eval.recipe",
    "train.eval_metrics": "eval.metrics",
    "train.eval_guidance_scale": "eval.guidance_scale",
    "data.recipe": "experiment.<stage>.data_recipe",
}
"""Keys that no longer exist -> the one key that holds their value. A stage's step count and
batch are part of its published recipe (``experiment.<stage>``), beside its lr and ratio: one
key, which the run's saved ``config.yaml`` shows as trained; so is its data mixture. What
trains is one list. The evaluation has its own group (``eval``)."""
_REMOVED_EXAMPLES = {
    "stage.train_gen_embeddings": "stage.trainable=[und_adaptor,gen_adaptor,gen_head,gen_embeddings]"
}


def _removed(key: str, value: str = "", stage: str = "") -> ValueError:
    """The error for ``key``, its example carrying the user's value and ``stage=`` (when the
    override gave them)."""
    new = REMOVED_KEYS[key]
    example = _REMOVED_EXAMPLES.get(key) or f"{new}={value or '...'}"
    if "<stage>" in new:
        example = example.replace("<stage>", stage or "stage2")
        example = example if stage else f"stage=stage2 {example}"
    return ValueError(f"{key} was removed: set {new} instead (e.g. {example})")


def check_removed_keys(overrides: list[str]) -> None:
    """A removed key among Hydra overrides (``key=v``, ``+key=v``, ``++key=v``, ``~key``) ->
    ``ValueError`` naming the key that replaces it (``data.recipe=x stage=stage1``: "set
    experiment.<stage>.data_recipe instead (e.g. experiment.stage1.data_recipe=x)")."""
    stages = [o.partition("=")[2].strip() for o in overrides if o.startswith("stage=")]
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key.strip() in REMOVED_KEYS:
            raise _removed(key.strip(), value.strip(), stages[-1] if stages else "")


def explain_removed_key(exc: BaseException) -> BaseException:
    """A composition error about a removed key (set in a YAML file of ``conf/``) -> the error
    naming its replacement; any other error unchanged."""
    seen = exc
    while seen is not None:
        for key in REMOVED_KEYS:
            if f"full_key: {key}\n" in f"{seen}\n":
                return _removed(key)
        seen = seen.__cause__ or seen.__context__
    return exc


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)


register_configs()


def validate(cfg: RunConfig) -> None:
    """Semantic checks that types cannot express; raise ``ValueError`` naming the field."""
    if cfg.stage.name not in STAGES:
        raise ValueError(f"stage.name={cfg.stage.name!r}: must be one of {STAGES}")
    validate_trainable(cfg.trainable_groups, "stage.trainable")
    validate_lora(cfg.model.lora, cfg.trainable_groups)
    hp = cfg.hparams
    where = f"experiment.{cfg.stage.name}"
    ratio = _ratio(hp)
    for k, n in ratio.items():
        if n < 0:
            raise ValueError(f"{where}.ratio.{k} must be >= 0")
    if sum(ratio.values()) <= 0:
        raise ValueError(f"{where}.ratio: at least one task must have a positive share")
    if hp.lr <= 0:
        raise ValueError(f"{where}.lr must be > 0")
    if hp.steps <= 0:
        raise ValueError(f"{where}.steps must be > 0")
    if not 0 <= hp.warmup_steps:
        raise ValueError(f"{where}.warmup_steps must be >= 0")
    if hp.global_batch_size <= 0:
        raise ValueError(f"{where}.global_batch_size must be > 0")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}: must be 0..3")
    if cfg.deepspeed.quantized and cfg.deepspeed.zero_stage != 3:
        raise ValueError(
            f"deepspeed.{cfg.deepspeed.quantized[0]}=true needs deepspeed.zero_stage=3 (ZeRO++), "
            f"got {cfg.deepspeed.zero_stage}"
        )
    if cfg.deepspeed.precision not in ("bf16", "fp32"):
        raise ValueError(f"deepspeed.precision={cfg.deepspeed.precision!r}: bf16 | fp32")
    if cfg.train.loss_reduction not in ("token_mean", "task_mean_sum"):
        raise ValueError(
            f"train.loss_reduction={cfg.train.loss_reduction!r}: token_mean | task_mean_sum"
        )
    try:
        from transformers.utils.hub import convert_file_size_to_int

        convert_file_size_to_int(cfg.train.export_max_shard_size)
    except ValueError:
        raise ValueError(
            f"train.export_max_shard_size={cfg.train.export_max_shard_size!r}: a size like "
            "5GB, 500MB or 2GiB"
        ) from None
    if cfg.train.export_dtype not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.export_dtype={cfg.train.export_dtype!r}: auto | bf16 | fp32")
    if cfg.train.micro_batch_size <= 0:
        raise ValueError("train.micro_batch_size must be > 0")
    tpm = cfg.train.tokens_per_micro
    if tpm < 0:
        raise ValueError(f"train.tokens_per_micro={tpm} must be >= 0 (0: fixed micro-batches)")
    seq_field = "train.synthetic_seq_len" if cfg.train.synthetic_data else "data.seq_len"
    seq = cfg.train.synthetic_seq_len if cfg.train.synthetic_data else cfg.data.seq_len
    if tpm and tpm < seq:
        raise ValueError(f"train.tokens_per_micro={tpm} < {seq_field}={seq}: a sample must fit")
    if not (cfg.data.text_chunk == 0 or 2 <= cfg.data.text_chunk <= cfg.data.seq_len):
        raise ValueError(
            f"data.text_chunk={cfg.data.text_chunk}: 0 (= data.seq_len) or 2..data.seq_len"
        )
    if cfg.model.checkpoint_every < 1:
        raise ValueError(f"model.checkpoint_every={cfg.model.checkpoint_every}: must be >= 1")
    # rows hold several samples (token budget, data.pack) or carry position_ids: attention
    # must keep them apart
    check_attn_implementation(cfg.model.attn_implementation)
    check_kernels_config(cfg.model)
    check_compile_backend(cfg.model.compile_backend)
    validate_eval(cfg.eval)
    if cfg.model.image_size % cfg.model.vision.patch_size:
        raise ValueError(
            f"model.image_size={cfg.model.image_size} not a multiple of model.vision.patch_size"
        )


def validate_eval(ev: EvalConfig) -> None:
    """The ``eval`` group's checks (``ValueError`` naming the key)."""
    if ev.every < 0:
        raise ValueError(f"eval.every={ev.every}: must be >= 0 (0 = never)")
    if ev.every and not ev.recipe:
        raise ValueError(
            f"eval.every={ev.every} needs eval.recipe (a held-out recipe name or path)"
        )
    for key, s in [("guidance_scale", ev.guidance_scale)] + [
        (f"extra_guidance_scales[{i}]", x) for i, x in enumerate(ev.extra_guidance_scales)
    ]:
        if s < 1:
            raise ValueError(f"eval.{key}={s}: must be >= 1 (1 = none)")
    for key, value, low in [
        ("max_per_source", ev.max_per_source, 0),
        ("n_und", ev.n_und, 0),
        ("n_gen", ev.n_gen, 0),
        ("n_grid", ev.n_grid, 0),
        ("batch_size", ev.batch_size, 1),
        ("max_new_tokens", ev.max_new_tokens, 1),
    ]:
        if value < low:
            raise ValueError(f"eval.{key}={value}: must be >= {low}")


def prompt_format(run: RunConfig) -> PromptFormat:
    """The framing a run trains: the stage's understanding and text-to-image styles (the
    experiment stage's ``und_format`` / ``gen_format`` win), the experiment's chat template,
    ``data.system_prompt``."""
    hp = run.hparams
    und = hp.und_format or run.stage.und_format
    gen = hp.gen_format or run.stage.gen_format
    return PromptFormat(
        und.value, run.experiment.chat_template.value, run.data.system_prompt, gen.value
    )


def recipe_ref(run: RunConfig) -> str | None:
    """The stage's data recipe (``experiment.<stage>.data_recipe``); None with synthetic data."""
    return None if run.train.synthetic_data else run.hparams.data_recipe


def load_stage_recipe(
    run: RunConfig, *, check_shards: bool = True, stat_shards: bool = True
) -> Recipe | None:
    """The stage's recipe loaded (``data.recipe.load_recipe``: shard existence with
    ``check_shards``, every shard statted with ``stat_shards``) and checked against the stage's
    ratio and steps; None with synthetic data."""
    ref = recipe_ref(run)
    if ref is None:
        return None
    recipe = load_recipe(ref, check_shards=check_shards, stat_shards=stat_shards)
    hp = run.hparams
    check_recipe_for_stage(recipe, _ratio(hp), hp.steps)
    return recipe


def _ratio(hp: StageHParams) -> dict[str, int]:
    return {"und": hp.ratio.und, "text": hp.ratio.text, "gen": hp.ratio.gen}


def resolve_stage(
    run: RunConfig,
    world_size: int = 1,
    *,
    with_recipe: bool = False,
    check_shards: bool = True,
    stat_shards: bool = True,
) -> StageSpec:
    """The stage ``run`` selects, every derived value once (``trainer.spec.StageSpec``): its
    batch plan at ``world_size`` ranks first (``ValueError`` when the arithmetic does not hold,
    before any I/O), then, ``with_recipe``, its data recipe (:func:`load_stage_recipe`;
    ``check_shards`` / ``stat_shards`` as there). Without: no I/O, ``recipe`` None."""
    hp, tc = run.hparams, run.train
    plan = plan_batch(hp.global_batch_size, tc.micro_batch_size, world_size, tc.tokens_per_micro)
    recipe = None
    if with_recipe:
        recipe = load_stage_recipe(run, check_shards=check_shards, stat_shards=stat_shards)
    return StageSpec(
        name=run.stage.name,
        experiment=run.experiment.name,
        lr=hp.lr,
        schedule=hp.schedule.value,
        warmup_steps=hp.warmup_steps,
        min_lr_ratio=hp.min_lr_ratio,
        weight_decay=hp.weight_decay,
        steps=hp.steps,
        stop_at=hp.stop_at,
        first_sentence_prob=hp.first_sentence_prob,
        ratio=_ratio(hp),
        recipe_ref=recipe_ref(run),
        recipe=recipe,
        prompt=prompt_format(run),
        sft=run.stage.sft,
        trainable=tuple(run.trainable_groups),
        plan=plan,
    )


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Hydra's DictConfig -> typed ``RunConfig`` (resolving interpolations), then validated."""
    run = OmegaConf.to_object(cfg)
    assert isinstance(run, RunConfig)
    validate(run)
    return run


def compose(
    overrides: list[str] | None = None,
    config_name: str = "config",
    config_dir: str | os.PathLike | None = None,
) -> DictConfig:
    """Compose the config tree outside a Hydra app (tests, tools)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    check_removed_keys(overrides or [])
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir or CONF_DIR), version_base="1.3"):
        try:
            return hydra_compose(config_name=config_name, overrides=overrides or [])
        except Exception as e:
            new = explain_removed_key(e)
            if new is e:
                raise
            raise new from e
