"""``janus-plan``'s search: per stage, every DeepSpeed preset in ``conf/deepspeed/`` (or the one
given) on the node counts that split the batch, and, with ``ClusterConfig.search``, every
activation checkpointing, token budget, reduction dtype and (ZeRO-3, ``search_lossy`` only)
ZeRO++ quantization the overrides leave open; the
fastest configuration that fits memory is recommended (the command line: ``janus_train.cli.plan``).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

from omegaconf import OmegaConf

from janus_train.config import CONF_DIR, compose, resolve_stage, to_run_config
from janus_train.plan import checkpointing as ck
from janus_train.plan.config import GIB, ClusterConfig
from janus_train.plan.estimate import Estimate, StageShape, estimate, stage_shape
from janus_train.trainer.config import DeepSpeedConfig

QUANTIZED = ("deepspeed.quantized_weights", "deepspeed.quantized_gradients")
"""ZeRO++ qwZ / qgZ: searched with the ZeRO-3 presets."""


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
        """The overrides as a dict; ZeRO++ quantization, searched under ZeRO-3 only, is off
        (``false``) elsewhere, so presets compare on the other knobs."""
        given = dict(o.split("=", 1) for o in self.overrides)
        return {**given, **{k: "false" for k in QUANTIZED if k not in given}}

    @property
    def lossy(self) -> list[str]:
        """The ZeRO++ quantization it turns on (rounds weights / gradients in transit)."""
        return [k.split(".")[1] for k in QUANTIZED if self.knobs[k] == "true"]

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


def loses(c: Candidate, best: Candidate) -> str:
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
    if len(c.lossy) > len(best.lossy) and e.days <= b.days * 1.02:
        parts.append("quantizes in transit (ZeRO++), for less than 2%")
    return "; ".join(parts) or "tie"


def plan_stage(
    stage: str, cluster: ClusterConfig, overrides: list[str], preset: str | None
) -> StagePlan:
    """Every DeepSpeed preset (or ``preset``) x node count, and with ``cluster.search`` every
    activation checkpointing of ``plan.checkpointing.OPTIONS``, ``train.tokens_per_micro`` of
    1, 2 and 4 rows, ``deepspeed.reduce_fp32`` true / false (bf16) and, under ZeRO-3,
    ``deepspeed.quantized_weights`` x ``quantized_gradients`` (``cluster.search_lossy`` only)
    that the overrides do not fix: the fastest that fits is recommended."""
    names = [preset] if preset else presets()
    estimates, candidates, shape = [], [], None
    for name in names:
        run = to_run_config(compose([*overrides, f"stage={stage}", f"deepspeed={name}"]))
        base = stage_shape(  # world-independent: the stage resolved at one rank
            resolve_stage(run),
            run.model,
            run.data,
            micro_batch_size=run.train.micro_batch_size,
            precision=run.deepspeed.precision,
        )
        shape = shape or base
        _search_preset(name, run.deepspeed, base, cluster, overrides, candidates, estimates)
    assert shape is not None
    best = _recommend(candidates)
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


def _search_preset(
    name: str,
    configured_ds: DeepSpeedConfig,
    base: StageShape,
    cluster: ClusterConfig,
    overrides: list[str],
    candidates: list[Candidate],
    estimates: list[Estimate],
) -> None:
    """Append one preset's candidates (``configured_ds``: the preset as composed, the knobs
    varied from it) to ``candidates``, and to ``estimates`` the estimate of each node count
    with the preset as configured."""
    # Searched node counts split the batch evenly over the ranks (token-budget micro-batches
    # accept any count, but the busiest rank sets the pace); `nodes` itself is always shown.
    node_counts = [cluster.nodes]
    if cluster.search_nodes:
        per = cluster.gpus_per_node * (1 if base.tokens_per_micro else base.micro_batch)
        node_counts += [
            n for n in range(cluster.nodes - 1, 0, -1) if base.global_batch % (n * per) == 0
        ]
    ckpts, tpms, reds, quants = _knob_options(
        base, configured_ds, overrides, cluster.search, cluster.search_lossy
    )
    for n, (on, k), tpm, red, (qw, qg) in itertools.product(node_counts, ckpts, tpms, reds, quants):
        sh = dataclasses.replace(base, checkpointing=on, checkpoint_every=k, tokens_per_micro=tpm)
        ds = dataclasses.replace(
            configured_ds, reduce_fp32=red, quantized_weights=qw, quantized_gradients=qg
        )
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
        for key, on_, was in zip(QUANTIZED, (qw, qg), quants[0]):
            if on_ != was:  # searched, not as configured
                ov.append(f"{key}={str(on_).lower()}")
        c = Candidate(tuple(ov), sh, e, e.feasible and ck.fits(e))
        candidates.append(c)
        configured = (base.checkpointing, base.checkpoint_every, base.tokens_per_micro)
        if (
            (on, k, tpm) == configured
            and red == configured_ds.reduce_fp32
            and (qw, qg) == quants[0]
        ):
            estimates.append(e)  # the preset as configured


def _knob_options(
    base: StageShape, ds: DeepSpeedConfig, overrides: list[str], search: bool, lossy: bool
):
    """The values the search tries per knob (only the configured one where the overrides fix
    it, or without ``search``): checkpointing, tokens per micro-step, reduction dtype, and
    with ``lossy`` ZeRO++ qwZ x qgZ (ZeRO-3 presets only; the configured pair first)."""
    ckpts = [(base.checkpointing, base.checkpoint_every)]
    if search and not (
        _fixed(overrides, "model.gradient_checkpointing")
        or _fixed(overrides, "model.checkpoint_every")
    ):
        ckpts = [(on, k) for _, on, k in ck.OPTIONS]
    tpms = [base.tokens_per_micro]
    if search and base.tokens_per_micro and not _fixed(overrides, "train.tokens_per_micro"):
        tpms = [base.seq_len * m for m in (1, 2, 4)]
    reds = [ds.reduce_fp32]
    if search and base.precision == "bf16" and not _fixed(overrides, "deepspeed.reduce_fp32"):
        reds = [True, False]
    quants = [(ds.quantized_weights, ds.quantized_gradients)]
    if lossy and search and ds.zero_stage == 3 and not any(_fixed(overrides, k) for k in QUANTIZED):
        quants += [q for q in itertools.product((False, True), repeat=2) if q != quants[0]]
    return ckpts, tpms, reds, quants


def _recommend(candidates: list[Candidate]) -> Candidate | None:
    """The fastest candidate within the memory headroom if any is, else the fastest feasible
    one (the output says so); near-ties (2%) to fewer nodes, no quantization, fp32 reduction,
    less traffic and memory."""
    ok = [c for c in candidates if c.fits] or [c for c in candidates if c.est.feasible]
    if not ok:
        return None
    fastest = min(c.est.days for c in ok)
    near = [c for c in ok if c.est.days <= fastest * 1.02]
    return min(
        near,
        key=lambda c: (
            c.est.nodes,
            len(c.lossy),
            not c.est.ds.reduce_fp32,
            round(c.est.step_s, 3),
            c.est.comm_bytes,
            c.est.total_memory,
        ),
    )
