"""One stage of one run, resolved once (``janus_train.config.resolve_stage``, called by
``train.prepare``): its hyper-parameters, task ratio, data recipe (loaded and checked against the
stage, with its shards), framing, trainable groups and batch plan. Immutable all the way down
(the ratio a read-only :class:`FrozenMap`, the recipe, its sources, the framing and the plan
frozen dataclasses, sequences tuples) and picklable (metric plugins receive it); the components
below the training loop each take their typed piece of it, never the whole config tree."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from janus_train.batch import BatchPlan, FrozenMap
from janus_train.data.builders import BuildContext
from janus_train.data.loader import build_context
from janus_train.data.recipe import Recipe
from janus_train.model.chat_template import PromptFormat


@dataclass(frozen=True)
class StageSpec:
    """The stage a run trains (``stage.name`` of ``experiment.name``), every derived value once."""

    name: str
    """``stage1`` | ``stage2`` | ``stage3``."""
    experiment: str
    """``experiment.name``."""
    lr: float
    schedule: str
    """``constant`` | ``cosine``."""
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    steps: int
    """Steps of the schedule (``experiment.<stage>.steps``)."""
    stop_at: int | None
    """The stage ends here although the schedule runs to ``steps`` (None: at ``steps``)."""
    first_sentence_prob: float
    ratio: Mapping[str, int]
    """Samples per step as a ratio, ``{"und": u, "text": t, "gen": g}``: the one mapping form
    (read-only)."""
    recipe_ref: str | None
    """The data recipe's name or path (``experiment.<stage>.data_recipe``); None with
    synthetic data."""
    recipe: Recipe | None
    """The recipe loaded and checked against ``ratio`` and ``steps`` (None: synthetic data, or
    not loaded, as for the planner)."""
    prompt: PromptFormat
    """The framing: understanding style (``stage.und_format`` or the experiment stage's),
    text-to-image style, chat template roles, system prompt."""
    sft: bool
    """Conversations with system/user turns masked (``stage.sft``)."""
    trainable: tuple[str, ...]
    """Module groups that train."""
    plan: BatchPlan
    """Batch arithmetic at the run's world size, checked (``janus_train.batch.plan_batch``)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", FrozenMap(self.ratio))
        object.__setattr__(self, "trainable", tuple(self.trainable))

    @property
    def stop_step(self) -> int:
        """The step the stage ends at."""
        return min(self.steps, self.stop_at) if self.stop_at else self.steps

    def context(self, processor, model, data) -> BuildContext:
        """The stage's sample-building context (``data.loader.build_context`` with this
        stage's framing, SFT masking and first-sentence probability)."""
        return build_context(
            processor,
            model,
            data,
            self.prompt,
            sft=self.sft,
            first_sentence_prob=self.first_sentence_prob,
        )
