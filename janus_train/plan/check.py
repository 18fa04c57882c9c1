"""Checks ``launch/pipeline.sh`` runs on every stage before it starts or submits anything
(through ``python -m janus_train.cli.check``): the composed config, the data recipe (shard
existence too: this is the one place that stats every shard; the training ranks do not), the
batch arithmetic at the stage's world size, the ``model.init_from`` chain and, given a GPU
model, ``janus-plan``'s feasibility verdict.
"""

from __future__ import annotations

from pathlib import Path

from janus_train.config import compose, load_stage_recipe, resolve_stage, to_run_config
from janus_train.plan.config import GIB, ClusterConfig
from janus_train.plan.estimate import StageShape, batch_plan, estimate, stage_shape
from janus_train.trainer.config import DeepSpeedConfig


def check_stage(
    experiment: str,
    name: str,
    nodes: int,
    gpus_per_node: int,
    deepspeed: str,
    init_from: str,
    args: list[str],
    gpu: str | None,
    check_data: bool,
    expected_init: str | None,
) -> tuple[list[str], str]:
    """-> (problems, a one-line summary). The stage's config is composed here and each check
    takes its typed piece of it."""
    overrides = [f"experiment={experiment}", f"stage={name}"]
    if deepspeed != "-":
        overrides.append(f"deepspeed={deepspeed}")
    if init_from != "-":
        overrides.append(f"model.init_from={init_from}")
    try:
        run = to_run_config(compose([*overrides, *args]))
    except Exception as e:  # Hydra / OmegaConf / validate(): their message names the key
        return [f"config: {str(e).splitlines()[0]}"], ""
    hp, tc = run.hparams, run.train
    world = nodes * gpus_per_node
    _, batch_problems = batch_plan(
        hp.global_batch_size, tc.micro_batch_size, world, tc.tokens_per_micro
    )
    problems = [f"{p} (at {nodes} nodes x {gpus_per_node} = {world} ranks)" for p in batch_problems]
    try:
        load_stage_recipe(run, check_shards=check_data)
    except (ValueError, FileNotFoundError) as e:
        problems.append(f"recipe: {e}")
    problems += _init_problems(run.model.init_from, expected_init, check_data)
    summary = (
        f"{nodes} nodes x {gpus_per_node}, batch {hp.global_batch_size}, "
        f"deepspeed zero{run.deepspeed.zero_stage}"
    )
    if gpu:
        cluster = ClusterConfig(
            nodes=nodes, gpus_per_node=gpus_per_node, gpu=gpu, search_nodes=False
        )
        try:
            cluster.validate()
            shape = stage_shape(
                resolve_stage(run),
                run.model,
                run.data,
                micro_batch_size=tc.micro_batch_size,
                precision=run.deepspeed.precision,
            )
        except ValueError as e:
            problems.append(f"planner: {e}")
        else:
            planned, verdict = _planner(shape, cluster, deepspeed, run.deepspeed)
            problems += planned
            summary += verdict
    return problems, summary


def _init_problems(init: str | None, expected: str | None, check_data: bool) -> list[str]:
    """``model.init_from`` against the chain: the previous stage's export when the pipeline
    names one (``expected``), else an existing directory (with ``check_data``)."""
    if expected is not None and init != expected:
        return [
            f"init_from chain: model.init_from={init} is not the previous stage's export {expected}"
        ]
    if expected is None and init and check_data and not Path(init).is_dir():
        return [f"init_from chain: model.init_from={init} is not a directory"]
    return []


def _planner(
    shape: StageShape, cluster: ClusterConfig, preset: str, ds: DeepSpeedConfig
) -> tuple[list[str], str]:
    """``janus-plan``'s verdict on ``shape`` as configured on ``cluster``: (problems, the
    summary's memory / step-time / days part)."""
    try:
        est = estimate(shape, cluster, preset, ds, cluster.nodes)
    except ValueError as e:
        return [f"planner: {e}"], ""
    problems = [f"planner: {p}" for p in est.problems if not p.startswith("batch")]
    return problems, (
        f", {est.total_memory / GIB:.1f} of {est.usable / GIB:.1f} GiB per "
        f"{cluster.gpu}, step {est.step_s:.2f} s, {est.days:.2f} days"
    )
