"""``janus-plan``: per stage, the batch arithmetic, memory per GPU, traffic, step time and days
of every DeepSpeed preset in ``conf/deepspeed/`` on up to ``nodes`` nodes, and the one it
recommends.

    janus-plan experiment=janus_pro_7b nodes=32 gpus_per_node=8 gpu=a100-80gb
    janus-plan experiment=janus_pro_7b nodes=16 gpu=h100 stage=stage3 deepspeed=zero3_hpz
    janus-plan experiment=janus_pro_1b nodes=16 gpu=a100-40gb mfu=0.3 inter_node_gbps=12

Arguments are Hydra overrides of the training config (as ``janus-train`` takes them) plus the
cluster keys of :class:`janus_train.plan.config.ClusterConfig`. ``stage=`` plans one stage
(default all three); ``deepspeed=`` evaluates that preset only (default: every preset without
CPU offload, whose host traffic is not modelled); the node counts tried are ``nodes`` and those
below it whose ranks split the global batch evenly; ``search_nodes=false`` plans exactly
``nodes``.
Exit status: 0 when every planned stage has a feasible configuration, 1 otherwise (the failing
stage and why on stderr), 2 on bad arguments.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path

from omegaconf import OmegaConf

from janus_train.config import CONF_DIR, STAGES, compose, to_run_config
from janus_train.plan.config import GIB, ClusterConfig
from janus_train.plan.estimate import Estimate, StageShape, estimate, recommend, stage_shape

CLUSTER_KEYS = {f.name for f in fields(ClusterConfig)}


@dataclass
class StagePlan:
    shape: StageShape
    estimates: list[Estimate]
    chosen: Estimate | None

    @property
    def feasible(self) -> bool:
        return self.chosen is not None

    def why_not(self) -> str:
        """The problems of the largest node count tried, per preset."""
        top = max(e.nodes for e in self.estimates)
        return "; ".join(
            f"deepspeed={e.preset} on {e.nodes} nodes: {', '.join(e.problems)}"
            for e in self.estimates
            if e.nodes == top
        )


def split_args(argv: list[str]) -> tuple[ClusterConfig, list[str], list[str], str | None]:
    """-> (cluster, training overrides, stages, deepspeed preset or None)."""
    cluster_items, overrides, stages, preset = [], [], list(STAGES), None
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            raise ValueError(f"{arg!r}: expected key=value")
        if key in CLUSTER_KEYS:
            cluster_items.append(arg)
        elif key == "stage":
            if value not in STAGES:
                raise ValueError(f"stage={value}: one of {STAGES}")
            stages = [value]
        elif key == "deepspeed":
            preset = value
        else:
            overrides.append(arg)
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(ClusterConfig), OmegaConf.from_dotlist(cluster_items)
        )
    except Exception as e:  # omegaconf's errors name the key and the expected type
        raise ValueError(str(e).splitlines()[0]) from None
    cluster = OmegaConf.to_object(merged)
    assert isinstance(cluster, ClusterConfig)
    cluster.validate()
    return cluster, overrides, stages, preset


def presets(conf_dir: Path = CONF_DIR) -> list[str]:
    """DeepSpeed presets the search considers: those without CPU offload."""
    out = []
    for p in sorted((conf_dir / "deepspeed").glob("*.yaml")):
        raw = OmegaConf.load(p)
        if not (raw.get("offload_optimizer") or raw.get("offload_param")):
            out.append(p.stem)
    return out


def plan_stage(
    stage: str, cluster: ClusterConfig, overrides: list[str], preset: str | None
) -> StagePlan:
    names = [preset] if preset else presets()
    estimates, shape = [], None
    for name in names:
        run = to_run_config(compose([*overrides, f"stage={stage}", f"deepspeed={name}"]))
        shape = stage_shape(run)
        # Searched node counts split the batch evenly over the ranks (token-budget micro-batches
        # accept any count, but the busiest rank sets the pace); `nodes` itself is always shown.
        node_counts = [cluster.nodes]
        if cluster.search_nodes:
            per = cluster.gpus_per_node * (1 if shape.tokens_per_micro else shape.micro_batch)
            node_counts += [
                n for n in range(cluster.nodes - 1, 0, -1) if shape.global_batch % (n * per) == 0
            ]
        estimates += [estimate(shape, cluster, name, run.deepspeed, n) for n in node_counts]
    assert shape is not None
    return StagePlan(shape, estimates, recommend(estimates))


def _gb(x: float) -> str:
    return f"{x / GIB:6.1f}"


def render(plan: StagePlan, cluster: ClusterConfig, experiment: str) -> str:
    sh, ch = plan.shape, plan.chosen
    show = ch or max(plan.estimates, key=lambda e: (e.nodes, -e.total_memory))
    spec = cluster.spec
    lines = [
        f"== {experiment} {sh.name}: {sh.steps} steps, global batch {sh.global_batch}, "
        f"trains {', '.join(sh.trainable_groups)} ({sh.trainable / 1e9:.3f} B of "
        f"{(sh.trainable + sh.frozen) / 1e9:.3f} B parameters), checkpointing "
        f"{'on' if sh.checkpointing else 'off'} ==",
        f"cluster: up to {cluster.nodes} nodes x {cluster.gpus_per_node} {cluster.gpu} "
        f"({spec.memory_gib:.0f} GiB, {spec.peak_bf16 / 1e12:.0f} TFLOP/s bf16, MFU "
        f"{cluster.mfu or _mfu()}, {spec.intra_node_gbps:.0f} GB/s in-node, "
        f"{spec.inter_node_gbps:.0f} GB/s across nodes per GPU)",
        f"{'deepspeed':<11}{'nodes':>6}{'micro x accum':>15}{'mem GiB':>9}{'comm GB':>9}"
        f"{'compute s':>10}{'comm s':>8}{'step s':>8}{'days':>7}  feasible",
    ]
    shown_nodes = {show.nodes, max(e.nodes for e in plan.estimates)}
    for e in plan.estimates:
        if e.nodes not in shown_nodes:
            continue
        bp = f"{e.batch.micro_batch_size} x {e.batch.grad_accum}" if e.batch else "no divide"
        mark = (
            "<- recommended"
            if e is ch
            else ("yes" if e.feasible else "no: " + e.problems[0].split(":")[0])
        )
        lines.append(
            f"{e.preset:<11}{e.nodes:>6}{bp:>15}{e.total_memory / GIB:>9.1f}"
            f"{e.comm_bytes / 1e9:>9.1f}{e.compute_s:>10.2f}{e.comm_s:>8.2f}"
            f"{e.step_s:>8.2f}{e.days:>7.2f}  {mark}"
        )
    lines.append(
        f"memory per GPU, deepspeed={show.preset} on {show.nodes} nodes ({show.world} ranks), GiB:"
    )
    for k, v in show.memory.items():
        lines.append(f"  {k:<24}{_gb(v)}")
    lines.append(f"  {'total':<24}{_gb(show.total_memory)}  (usable {_gb(show.usable).strip()})")
    lines.append("traffic per GPU per step:")
    for t in show.transfers:
        lines.append(
            f"  {t.what:<44}{t.bytes / 1e9:8.2f} GB  "
            f"{'across nodes' if t.inter_node else 'in-node'}"
            f"{', exposed' if t.exposed else ''}"
        )
    lines.append(
        f"  compute {show.step_flops / 1e12:.0f} TFLOP per GPU per step -> "
        f"{show.compute_s:.2f} s; communication {show.comm_s:.2f} s "
        f"({'below' if show.comm_s < show.compute_s else 'ABOVE'} compute)"
    )
    if ch:
        lines.append(
            f"recommended: deepspeed={ch.preset} on {ch.nodes} nodes ({ch.world} "
            f"ranks): step {ch.step_s:.2f} s, {ch.days:.2f} days"
        )
    else:
        lines.append(f"INFEASIBLE: {plan.why_not()}")
    return "\n".join(lines)


def _mfu() -> float:
    from janus_train.plan.config import DEFAULT_MFU

    return DEFAULT_MFU


def plan_help() -> str:
    """The module docstring, then every cluster key with its default and docstring."""
    import textwrap

    from janus_train.cli_help import field_docs

    lines = [__doc__.strip().replace("``", ""), "", "Cluster keys (key=value, default):"]
    docs = field_docs(ClusterConfig)
    for f in fields(ClusterConfig):
        default = "null" if f.default is None else f.default
        lines.append(f"  {f.name} = {default}")
        if f.name in docs:
            lines += textwrap.wrap(
                docs[f.name], 96, initial_indent="      ", subsequent_indent="      "
            )
    lines += ["", "Training keys and groups: janus-train --help (same overrides)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(plan_help())
        return 0
    try:
        cluster, overrides, stages, preset = split_args(argv)
        plans = [plan_stage(s, cluster, overrides, preset) for s in stages]
    except Exception as e:  # config / override errors: one line naming the key
        print(f"janus-plan: {type(e).__name__}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    experiment = next(
        (o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")), "tiny"
    )
    for p in plans:
        print(render(p, cluster, experiment))
        print()
    total = sum(p.chosen.days for p in plans if p.chosen)
    print(
        "summary: "
        + "; ".join(
            f"{p.shape.name} deepspeed={p.chosen.preset} nodes={p.chosen.nodes} "
            f"{p.chosen.days:.2f} d"
            if p.chosen
            else f"{p.shape.name} INFEASIBLE"
            for p in plans
        )
        + f"; total {total:.2f} days"
    )
    bad = [p for p in plans if not p.feasible]
    for p in bad:
        print(f"janus-plan: {p.shape.name} is infeasible: {p.why_not()}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
