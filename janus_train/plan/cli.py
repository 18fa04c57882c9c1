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

import dataclasses
import sys
from dataclasses import dataclass, fields
from dataclasses import field as dataclass_field
from pathlib import Path

from omegaconf import OmegaConf

from janus_train.config import CONF_DIR, STAGES, compose, to_run_config
from janus_train.plan import checkpointing as ck
from janus_train.plan.config import GIB, ClusterConfig
from janus_train.plan.estimate import Estimate, StageShape, estimate, stage_lengths, stage_shape

CLUSTER_KEYS = {f.name for f in fields(ClusterConfig)}


@dataclass
class Candidate:
    """One point of the search: the overrides that make it, and its estimate."""

    overrides: tuple[str, ...]
    """Exact overrides to paste (``deepspeed=...`` first), node count apart."""
    shape: StageShape
    est: Estimate
    fits: bool
    """Feasible and within the activation-checkpointing headroom (``plan.checkpointing``)."""

    @property
    def knobs(self) -> dict[str, str]:
        return dict(o.split("=", 1) for o in self.overrides)

    def paste(self) -> str:
        return f"nodes={self.est.nodes} " + " ".join(self.overrides)


@dataclass
class StagePlan:
    shape: StageShape
    estimates: list[Estimate]
    chosen: Estimate | None
    candidates: list[Candidate] = dataclass_field(default_factory=list)
    best: Candidate | None = None
    chunked: Estimate | None = None
    """The recommendation with text documents chunked to ``text_chunk`` (a recipe change)."""

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


def _fixed(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in overrides)


def _loses(c: Candidate, best: Candidate) -> str:
    """Why ``c`` is slower than ``best`` (or does not qualify)."""
    e, b = c.est, best.est
    if not e.feasible:
        return e.problems[0]
    if not c.fits:
        return (
            f"memory {e.total_memory / GIB:.1f} GiB leaves less than {ck.HEADROOM:.0%} of "
            f"{e.usable / GIB:.1f} GiB free"
        )
    d_comp, d_exp = e.compute_s - b.compute_s, (e.step_s - e.compute_s) - (b.step_s - b.compute_s)
    parts = []
    if abs(d_comp) >= 0.005:
        why = []
        if e.recompute != b.recompute:
            why.append(f"recompute x{e.recompute:.3f} vs x{b.recompute:.3f}")
        if e.sim and b.sim and abs(e.sim.imbalance - b.sim.imbalance) > 0.005:
            why.append(f"busiest rank {e.sim.imbalance:.2f}x vs {b.sim.imbalance:.2f}x the mean")
        if e.nodes != b.nodes:
            why.append(f"{e.nodes} nodes vs {b.nodes}")
        parts.append(f"compute {d_comp:+.2f} s" + (f" ({', '.join(why)})" if why else ""))
    if abs(d_exp) >= 0.005:
        parts.append(f"exposed communication {d_exp:+.2f} s")
    return "; ".join(parts) or "tie"


def plan_stage(
    stage: str, cluster: ClusterConfig, overrides: list[str], preset: str | None
) -> StagePlan:
    """Every DeepSpeed preset (or ``preset``) x node count, and with ``cluster.search`` every
    activation checkpointing of ``plan.checkpointing.OPTIONS``, ``train.tokens_per_micro`` of
    1, 2 and 4 rows and ``deepspeed.reduce_fp32`` true / false (bf16) that the overrides do not
    fix: the fastest that fits is recommended."""
    names = [preset] if preset else presets()
    estimates, candidates, shape = [], [], None
    for name in names:
        run = to_run_config(compose([*overrides, f"stage={stage}", f"deepspeed={name}"]))
        base = stage_shape(run)
        shape = shape or base
        # Searched node counts split the batch evenly over the ranks (token-budget micro-batches
        # accept any count, but the busiest rank sets the pace); `nodes` itself is always shown.
        node_counts = [cluster.nodes]
        if cluster.search_nodes:
            per = cluster.gpus_per_node * (1 if base.tokens_per_micro else base.micro_batch)
            node_counts += [
                n for n in range(cluster.nodes - 1, 0, -1) if base.global_batch % (n * per) == 0
            ]
        search = cluster.search
        ckpts = [(base.checkpointing, base.checkpoint_every)]
        if search and not (
            _fixed(overrides, "model.gradient_checkpointing")
            or _fixed(overrides, "model.checkpoint_every")
        ):
            ckpts = [(on, k) for _, on, k in ck.OPTIONS]
        tpms = [base.tokens_per_micro]
        if search and base.tokens_per_micro and not _fixed(overrides, "train.tokens_per_micro"):
            tpms = [base.seq_len * m for m in (1, 2, 4)]
        reds = [run.deepspeed.reduce_fp32]
        if search and base.precision == "bf16" and not _fixed(overrides, "deepspeed.reduce_fp32"):
            reds = [True, False]
        for n in node_counts:
            for on, k in ckpts:
                for tpm in tpms:
                    for red in reds:
                        sh = dataclasses.replace(
                            base, checkpointing=on, checkpoint_every=k, tokens_per_micro=tpm
                        )
                        ds = dataclasses.replace(run.deepspeed, reduce_fp32=red)
                        e = estimate(sh, cluster, name, ds, n)
                        ov = [f"deepspeed={name}"]
                        if len(ckpts) > 1:
                            ov.append(f"model.gradient_checkpointing={str(on).lower()}")
                            if on:
                                ov.append(f"model.checkpoint_every={k}")
                        if len(tpms) > 1:
                            ov.append(f"train.tokens_per_micro={tpm}")
                        if len(reds) > 1:
                            ov.append(f"deepspeed.reduce_fp32={str(red).lower()}")
                        c = Candidate(tuple(ov), sh, e, e.feasible and ck.fits(e))
                        candidates.append(c)
                        if (on, k) == (base.checkpointing, base.checkpoint_every) and (
                            tpm == base.tokens_per_micro and red == run.deepspeed.reduce_fp32
                        ):
                            estimates.append(e)  # the preset as configured
    assert shape is not None
    # within the headroom if anything is, else anything feasible (the output says so)
    ok = [c for c in candidates if c.fits] or [c for c in candidates if c.est.feasible]
    best = None
    if ok:
        # fastest; near-ties (2%) to fewer nodes, fp32 reduction, less traffic and memory
        fastest = min(c.est.days for c in ok)
        near = [c for c in ok if c.est.days <= fastest * 1.02]
        best = min(
            near,
            key=lambda c: (
                c.est.nodes,
                not c.est.ds.reduce_fp32,
                round(c.est.step_s, 3),
                c.est.comm_bytes,
                c.est.total_memory,
            ),
        )
    chunked = None
    if best and cluster.text_chunk:
        b = best.est
        chunked = estimate(best.shape, cluster, b.preset, b.ds, b.nodes, cluster.text_chunk)
    return StagePlan(
        shape,
        estimates,
        best.est if best else None,
        candidates,
        best,
        chunked,
    )


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
    return (
        f"{e.preset:<10}{e.nodes:>6} {ckpt:>8}{tpm:>7} {red:>6}{micro:>6}"
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
    util, source = cluster.mfu_source
    lines = [
        f"== {experiment} {sh.name}: {sh.steps} steps, global batch {sh.global_batch}, "
        f"trains {', '.join(sh.trainable_groups)} ({sh.trainable / 1e9:.3f} B of "
        f"{(sh.trainable + sh.frozen) / 1e9:.3f} B parameters) ==",
        f"cluster: up to {cluster.nodes} nodes x {cluster.gpus_per_node} {cluster.gpu} "
        f"({spec.memory_gib:.0f} GiB, {spec.peak_bf16 / 1e12:.0f} TFLOP/s bf16, "
        f"{spec.intra_node_gbps:.0f} GB/s in-node, {spec.inter_node_gbps:.0f} GB/s across "
        "nodes per GPU)",
        f"utilisation {util:.3f} of executed FLOPs ({source})",
        *_length_lines(sh, cluster),
        f"{'deepspeed':<10}{'nodes':>6} {'ckpt':>8}{'tokens':>7} {'reduce':>6}{'micro':>6}"
        f"{'mem GiB':>8}{'comm GB':>8}{'compute s':>9}{'comm s':>8}{'step s':>7}{'days':>7}",
    ]
    # per preset: its fastest fitting point, else its smallest-memory one (why it fails)
    for name in dict.fromkeys(c.est.preset for c in plan.candidates):
        mine = [c for c in plan.candidates if c.est.preset == name]
        fit = [c for c in mine if c.fits]
        c = (
            min(fit, key=lambda c: c.est.days)
            if fit
            else min(mine, key=lambda c: (not c.est.feasible, c.est.total_memory))
        )
        mark = "<- recommended" if c is best else ("fits" if c.fits else "no: " + _loses(c, c))
        lines.append(_row(c, mark))
    show = ch or max(plan.estimates, key=lambda e: (e.nodes, -e.total_memory))
    lines.append(
        f"memory per GPU, deepspeed={show.preset} on {show.nodes} nodes ({show.world} ranks), GiB:"
    )
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
    if ch and best:
        lines.append(
            f"recommended: {best.paste()}: step {ch.step_s:.2f} s, {ch.days:.2f} days"
            + ("" if best.fits else f" (less than {ck.HEADROOM:.0%} memory headroom)")
        )
        lines.append("runners-up (best with one knob changed):")
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
                + _loses(c, best)
            )
        if plan.chunked:
            e = plan.chunked
            lines.append(
                f"recipe change, text documents chunked to {cluster.text_chunk} tokens: busiest "
                f"rank {e.sim.imbalance:.2f}x the mean, step {e.step_s:.2f} s, {e.days:.2f} days "
                "(more, shorter text samples per step: a different recipe)"
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
