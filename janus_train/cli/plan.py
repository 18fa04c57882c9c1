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
from dataclasses import fields

from omegaconf import OmegaConf

from janus_train.config import STAGES
from janus_train.plan import checkpointing as ck
from janus_train.plan.config import GIB, ClusterConfig
from janus_train.plan.estimate import Estimate, StageShape, stage_lengths
from janus_train.plan.search import Candidate, StagePlan, loses, plan_stage

CLUSTER_KEYS = {f.name for f in fields(ClusterConfig)}


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


def _gb(x: float) -> str:
    return f"{x / GIB:6.1f}"


def _row(c: Candidate, mark: str) -> str:
    e, kn = c.est, c.knobs
    ckpt = ck.label(c.shape.checkpointing, c.shape.checkpoint_every)
    red = "fp32" if (e.ds.reduce_fp32 or c.shape.precision != "bf16") else "bf16"
    micro = f"{e.sim.n_micro:.2f}" if c.shape.tokens_per_micro and e.sim else "-"
    tpm = kn.get("train.tokens_per_micro", str(c.shape.tokens_per_micro or "-"))
    times = (
        f"{e.comm_bytes / 1e9:>8.1f}{e.compute_s:>9.2f}{e.comm_s:>8.2f}{e.step_s:>7.2f}"
        f"{e.days:>7.2f}"
        if e.feasible
        else f"{'-':>8}{'-':>9}{'-':>8}{'-':>7}{'-':>7}"
    )
    zpp = "+".join(
        n for n, on in (("qwZ", e.ds.quantized_weights), ("qgZ", e.ds.quantized_gradients)) if on
    )
    return (
        f"{e.preset:<10}{e.nodes:>6} {ckpt:>8}{tpm:>7} {red:>6} {zpp or '-':>7}{micro:>6}"
        f"{e.total_memory / GIB:>8.1f}{times}  {mark}"
    )


def _length_lines(sh: StageShape, cluster: ClusterConfig) -> list[str]:
    """Each source's sample-length distribution and where it comes from."""
    active = {t for t, n in zip(("und", "text", "gen"), sh.ratio) if n}
    lines = [
        "sample tokens per source (recipe: its sample_tokens quantiles; default: the "
        "planner's, uniform; und_tokens= text_tokens= gen_tokens= override a task):"
    ]
    for d in stage_lengths(sh, cluster):
        if d.task in active:
            q = d.quantiles
            dist = f"{q[0]}-{q[1]}" if len(q) == 2 else " ".join(map(str, q))
            lines.append(f"  {d.name:<22}{d.task:<5} {d.origin:<13}mean {d.mean:5.0f}  {dist}")
    return lines


def render(plan: StagePlan, cluster: ClusterConfig, experiment: str) -> str:
    sh, ch, best = plan.shape, plan.chosen, plan.best
    spec = cluster.spec
    util, source = cluster.mfu_for(*sh.mfu_key)
    lines = [
        f"== {experiment} {sh.name}: {sh.steps} steps, global batch {sh.global_batch}, "
        f"trains {', '.join(sh.trainable_groups)} ({sh.trainable / 1e9:.3f} B of "
        f"{(sh.trainable + sh.frozen + sh.vq) / 1e9:.3f} B parameters) ==",
        f"cluster: up to {cluster.nodes} nodes x {cluster.gpus_per_node} {cluster.gpu} "
        f"({spec.memory_gib:.0f} GiB, {spec.peak_bf16 / 1e12:.0f} TFLOP/s bf16, "
        f"{spec.intra_node_gbps:.0f} GB/s in-node, {spec.inter_node_gbps:.0f} GB/s across "
        "nodes per GPU)",
        f"utilisation {util:.3f} of executed FLOPs ({source})",
        *_length_lines(sh, cluster),
        f"{'deepspeed':<10}{'nodes':>6} {'ckpt':>8}{'tokens':>7} {'reduce':>6} {'zero++':>7}"
        f"{'micro':>6}{'mem GiB':>8}{'comm GB':>8}{'compute s':>9}{'comm s':>8}{'step s':>7}{'days':>7}",
    ]
    # per preset: the recommendation, else its fastest fitting point, else its smallest-memory
    # one (why it fails)
    for name in dict.fromkeys(c.est.preset for c in plan.candidates):
        mine = [c for c in plan.candidates if c.est.preset == name]
        fit = [c for c in mine if c.fits]
        c = (
            best
            if best in mine
            else min(fit, key=lambda c: c.est.days)
            if fit
            else min(mine, key=lambda c: (not c.est.feasible, c.est.total_memory))
        )
        mark = "<- recommended" if c is best else ("fits" if c.fits else "no: " + loses(c, c))
        lines.append(_row(c, mark))
    lines += _budget_lines(ch or max(plan.estimates, key=lambda e: (e.nodes, -e.total_memory)))
    if ch and best:
        lines += _recommendation_lines(plan, cluster)
    else:
        lines.append(f"INFEASIBLE: {plan.why_not()}")
    return "\n".join(lines)


def _budget_lines(show: Estimate) -> list[str]:
    """Memory per GPU, traffic per step and the step's compute of one estimate."""
    lines = [
        f"memory per GPU, deepspeed={show.preset} on {show.nodes} nodes ({show.world} ranks), GiB:"
    ]
    for k, v in show.memory.items():
        lines.append(f"  {k:<24}{_gb(v)}")
    lines.append(f"  {'total':<24}{_gb(show.total_memory)}  (usable {_gb(show.usable).strip()})")
    lines.append("traffic per GPU per step (overlaps):")
    for t in show.transfers:
        lines.append(
            f"  {t.what:<46}{t.bytes / 1e9:8.2f} GB  "
            f"{'across nodes' if t.inter_node else 'in-node'}, {t.phase}"
        )
    if show.sim:
        lines.append(
            f"  compute: busiest rank {show.step_flops / 1e12:.0f} TFLOP per step "
            f"({show.sim.imbalance:.2f}x the mean rank's tokens, {show.sim.n_micro:.2f} "
            f"micro-steps; mean rank {show.mean_flops / 1e12:.0f}) x{show.recompute:.3f} "
            f"recomputation -> {show.compute_s:.2f} s; transfers {show.comm_s:.2f} s; "
            f"exposed {show.step_s - show.compute_s:.2f} s"
        )
    return lines


def _recommendation_lines(plan: StagePlan, cluster: ClusterConfig) -> list[str]:
    """The recommendation, the best runner-up per knob changed, the chunked-text variant."""
    ch, best = plan.chosen, plan.best
    lines = [
        f"recommended: {best.paste()}: step {ch.step_s:.2f} s, {ch.days:.2f} days"
        + ("" if best.fits else f" (less than {ck.HEADROOM:.0%} memory headroom)")
        + (f" (lossy: ZeRO++ {' and '.join(best.lossy)})" if best.lossy else ""),
        "runners-up (best with one knob changed):",
    ]
    knobs = {"nodes": str(ch.nodes), **best.knobs}
    for key, val in knobs.items():
        alt = [
            c
            for c in plan.candidates
            if (str(c.est.nodes) if key == "nodes" else c.knobs.get(key)) != val
            and all(
                (str(c.est.nodes) if k == "nodes" else c.knobs.get(k)) == v
                for k, v in knobs.items()
                if k != key
            )
        ]
        if not alt:
            continue
        c = min(alt, key=lambda c: (not c.fits, c.est.days))
        lines.append(
            f"  {key}={c.knobs.get(key, c.est.nodes)}: "
            + (f"{c.est.days:.2f} days, " if c.est.feasible else "")
            + loses(c, best)
        )
    if plan.chunked:
        e = plan.chunked
        lines.append(
            f"recipe change, text documents chunked to {cluster.text_chunk} tokens: busiest "
            f"rank {e.sim.imbalance:.2f}x the mean, step {e.step_s:.2f} s, {e.days:.2f} days "
            "(more, shorter text samples per step: a different recipe)"
        )
    return lines


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


def summary(plans: list[StagePlan]) -> str:
    """Days of each stage and its overrides to paste, and the total."""
    total = sum(p.chosen.days for p in plans if p.chosen)
    lines = [f"summary: total {total:.2f} days"]
    for p in plans:
        if p.chosen and p.best:
            lines.append(f"  {p.shape.name} {p.chosen.days:5.2f} d: {p.best.paste()}")
        else:
            lines.append(f"  {p.shape.name} INFEASIBLE")
    return "\n".join(lines)


def report(plans: list[StagePlan], cluster: ClusterConfig, experiment: str) -> str:
    """What ``janus-plan`` prints on stdout."""
    return "\n\n".join([*(render(p, cluster, experiment) for p in plans), summary(plans)])


def experiment_of(overrides: list[str]) -> str:
    return next((o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")), "tiny")


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
    print(report(plans, cluster, experiment_of(overrides)))
    bad = [p for p in plans if not p.feasible]
    for p in bad:
        print(f"janus-plan: {p.shape.name} is infeasible: {p.why_not()}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
