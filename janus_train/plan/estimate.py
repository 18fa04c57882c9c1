"""One stage under one DeepSpeed preset on a number of nodes: batch arithmetic, memory per
GPU, traffic, step time and days, assembled from the cost model in
:mod:`janus_train.plan.costs` (whose docstring states every formula), and the recommendation
among such estimates."""

from __future__ import annotations

from dataclasses import dataclass, field

from janus_train.batch import BatchPlan, plan_batch
from janus_train.data.config import DataConfig
from janus_train.model.config import ModelConfig
from janus_train.plan.config import ClusterConfig
from janus_train.plan.costs import (
    PHASES,
    ModelSizes,
    Row,
    Transfer,
    activation_bytes,
    buffer_bytes,
    communication,
    lora_adapter_params,
    model_sizes,
    model_state_bytes,
    zero3_backward_gathers,
)
from janus_train.plan.simulate import SimResult, SourceLengths, simulate, source_lengths
from janus_train.trainer.config import DeepSpeedConfig
from janus_train.trainer.spec import StageSpec

__all__ = [
    "Estimate",
    "StageShape",
    "batch_plan",
    "estimate",
    "recommend",
    "stage_shape",
]


@dataclass
class Estimate:
    """One stage on ``nodes`` nodes under DeepSpeed preset ``preset``."""

    preset: str
    ds: DeepSpeedConfig
    nodes: int
    world: int
    batch: BatchPlan | None
    problems: list[str] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)
    usable: float = 0.0
    transfers: list[Transfer] = field(default_factory=list)
    step_flops: float = 0.0
    """Model FLOPs of the busiest rank per step (simulated)."""
    mean_flops: float = 0.0
    """Model FLOPs of the mean rank per step (what the old planner counted)."""
    recompute: float = 1.0
    """Executed / model FLOPs: 1 + the recomputation of checkpointed layers."""
    util: float = 0.0
    compute_s: float = 0.0
    """Compute of the step at its pace (busiest rank, per micro-step under ZeRO-2/3)."""
    comm_s: float = 0.0
    """All transfers back to back."""
    step_s: float = 0.0
    days: float = 0.0
    sim: SimResult | None = None

    @property
    def feasible(self) -> bool:
        return not self.problems

    @property
    def total_memory(self) -> float:
        return sum(self.memory.values())

    @property
    def comm_bytes(self) -> float:
        return sum(t.bytes for t in self.transfers)


@dataclass(frozen=True)
class StageShape:
    """What one stage runs, derived from its ``RunConfig``."""

    name: str
    sizes: ModelSizes
    trainable_groups: list[str]
    global_batch: int
    micro_batch: int
    steps: int
    seq_len: int
    tokens_per_micro: int
    """> 0: micro-batches are token budgets (one row of this many tokens)."""
    pack: bool
    ratio: tuple[int, int, int]
    """(und, text, gen) samples per step."""
    checkpointing: bool
    checkpoint_every: int
    precision: str
    lora_groups: tuple[str, ...] = ()
    """Trainable groups that train through LoRA adapters only (``model.lora``): their weights
    count as frozen, the adapters (``adapter_params``) as trainable."""
    adapter_params: int = 0
    loss_chunk_tokens: int = 0
    """``model.loss_chunk_tokens``: the heads' cross-entropy in chunks."""
    kernels: str = "none"
    """``model.kernels``: ``liger`` fuses the heads' cross-entropy (except under ZeRO-3)."""
    text_chunk: int = 0
    """``data.text_chunk``: the recipe's own text chunk length (0: ``seq_len``)."""
    recipe: str | None = None
    """The stage's data recipe (sources, weights, active ranges) for the busiest-rank
    simulation; None: one source per task."""
    model: str = ""
    """The experiment's name: which measured MFU record is this model's
    (``ClusterConfig.mfu_for``)."""

    @property
    def mfu_key(self) -> tuple[str, int, int]:
        """(experiment, LLM layers, LLM width): ``ClusterConfig.mfu_for``'s arguments."""
        return self.model, self.sizes.layers, self.sizes.hidden

    @property
    def trainable(self) -> int:
        full = set(self.trainable_groups) - set(self.lora_groups)
        return self.adapter_params + sum(n for g, n in self.sizes.groups.items() if g in full)

    @property
    def frozen(self) -> int:
        """Frozen parameters inside the engine (the VQ is held outside it: ``vq``)."""
        full = {*self.trainable_groups, "vq"} - set(self.lora_groups)
        return sum(n for g, n in self.sizes.groups.items() if g not in full)

    @property
    def vq(self) -> int:
        return self.sizes.groups.get("vq", 0)


def stage_shape(
    spec: StageSpec,
    model: ModelConfig,
    data: DataConfig,
    *,
    micro_batch_size: int,
    precision: str,
) -> StageShape:
    """What stage ``spec`` runs (any world size: the search varies it) with ``model`` and
    ``data``; ``micro_batch_size``: ``train.micro_batch_size`` (fixed micro-batches, also when
    the search tries them on a token-budget stage); ``precision``: ``deepspeed.precision``."""
    return StageShape(
        name=spec.name,
        sizes=model_sizes(model),
        trainable_groups=list(spec.trainable),
        global_batch=spec.plan.global_batch_size,
        micro_batch=micro_batch_size,
        steps=spec.stop_step,
        seq_len=data.seq_len,
        tokens_per_micro=spec.plan.tokens_per_micro,
        pack=data.pack,
        ratio=(spec.ratio["und"], spec.ratio["text"], spec.ratio["gen"]),
        checkpointing=model.gradient_checkpointing,
        checkpoint_every=model.checkpoint_every,
        precision=precision,
        lora_groups=tuple(model.lora.groups) if model.lora.enabled else (),
        adapter_params=lora_adapter_params(model),
        loss_chunk_tokens=model.loss_chunk_tokens,
        kernels=model.kernels,
        text_chunk=data.text_chunk,
        recipe=spec.recipe_ref,
        model=spec.experiment,
    )


def task_rows(shape: StageShape, cl: ClusterConfig) -> list[Row]:
    """The micro-batches that can need the most activation memory, one per task with a positive
    ratio: the whole token budget as text supervised by ``lm_head`` (the largest vocabulary),
    as packed understanding samples, or as generation samples."""
    s = shape.sizes
    tokens = shape.tokens_per_micro or shape.micro_batch * shape.seq_len
    text = Row(tokens, tokens, 0, 0)
    per_row = shape.seq_len // cl.und_sample_tokens if shape.pack else 1
    n_und = (
        tokens // cl.und_sample_tokens
        if shape.tokens_per_micro
        else shape.micro_batch * max(1, per_row)
    )
    und = Row(
        min(tokens, n_und * cl.und_sample_tokens),
        n_und * (cl.und_sample_tokens - s.image_tokens),
        0,
        n_und,
    )
    gen_n = (
        max(1, tokens // cl.gen_sample_tokens)
        if (shape.pack or shape.tokens_per_micro)
        else shape.micro_batch
    )
    gen = Row(min(tokens, gen_n * cl.gen_sample_tokens), 0, gen_n * s.image_tokens, 0)
    return [r for r, n in zip((und, text, gen), shape.ratio) if n > 0]


def recompute_factor(shape: StageShape, zero3: bool = False) -> float:
    """Executed / model FLOPs: each checkpointed decoder layer runs its forward again in the
    backward, up to the last tensor the backward needs (torch's non-reentrant checkpoint stops
    early: the MLP's down projection, whose output nothing saves, is not recomputed), all of
    it under ZeRO-3 (DeepSpeed replaces ``F.linear`` by its own autograd function there, and
    the recomputation then runs the whole layer: measured with the flop counter);
    ``lm_head`` and the encoders are not recomputed. As a share of PaLM's ``6 N`` (the
    attention term, a few per cent at these lengths, is counted at the same share)."""
    s = shape.sizes
    if not shape.checkpointing:
        return 1.0
    n_ckpt = -(-s.layers // shape.checkpoint_every)
    layer = (s.flops_params - s.vocab * s.hidden - s.hidden) / s.layers  # less lm_head, norm
    redo = layer if zero3 else layer - s.hidden * s.intermediate
    return 1.0 + n_ckpt * 2.0 * redo / (6.0 * s.flops_params)


def stage_lengths(shape: StageShape, cl: ClusterConfig) -> tuple[SourceLengths, ...]:
    """The length distribution of each of the stage's sources, and where it comes from."""
    return source_lengths(
        shape.recipe,
        shape.ratio,
        cl.lengths(shape.seq_len, shape.sizes.image_tokens),
        shape.seq_len,
        cl.lengths_set,
    )


def simulate_stage(
    shape: StageShape, cl: ClusterConfig, world: int, text_chunk: int = 0
) -> SimResult:
    """The busiest-rank simulation of this stage at ``world`` ranks (token-budget micro-batches;
    with fixed micro-batches every rank holds the same count of padded rows: simulated as a
    token budget of one row per micro-batch)."""
    s = shape.sizes
    tpm = shape.tokens_per_micro or shape.micro_batch * shape.seq_len
    return simulate(
        shape.recipe,
        shape.ratio,
        shape.global_batch,
        world,
        tpm,
        cl.lengths(shape.seq_len, s.image_tokens),
        s.flops_params,
        s.layers,
        s.hidden,
        s.und_image_flops,
        s.gen_image_flops,
        text_chunk=text_chunk or shape.text_chunk,
        per_source=tuple(d.quantiles for d in stage_lengths(shape, cl)),
    )


def batch_plan(
    global_batch: int, micro_batch: int, world: int, tokens_per_micro: int
) -> tuple[BatchPlan | None, list[str]]:
    """The trainer's batch arithmetic at ``world`` ranks, plus one rule of its own: with
    token-budget micro-batches any batch is accepted, but fewer samples per step than ranks
    leaves ranks without data (e.g. batch 128 on 256 GPUs)."""
    try:
        plan = plan_batch(global_batch, micro_batch, world, tokens_per_micro)
    except ValueError as e:
        return None, [f"batch: {e}"]
    if global_batch < world:
        return plan, [
            f"batch: global batch {global_batch} < {world} ranks: ranks without "
            "samples; use fewer nodes or a larger batch"
        ]
    return plan, []


def estimate(
    shape: StageShape,
    cl: ClusterConfig,
    preset: str,
    ds: DeepSpeedConfig,
    nodes: int,
    text_chunk: int = 0,
) -> Estimate:
    """``text_chunk`` > 0: text documents chunked to that many tokens (a recipe change)."""
    gpn = cl.gpus_per_node
    world = nodes * gpn
    est = Estimate(preset, ds, nodes, world, None, usable=cl.usable_bytes)
    mb = 1 if shape.tokens_per_micro else shape.micro_batch
    est.batch, problems = batch_plan(shape.global_batch, mb, world, shape.tokens_per_micro)
    est.problems += problems
    if ds.hpz_partition_size > 1 and (ds.zero_stage != 3 or world % ds.hpz_partition_size):
        est.problems.append(
            f"deepspeed.hpz_partition_size={ds.hpz_partition_size} needs ZeRO-3 "
            f"and must divide the world size {world}"
        )
    if ds.offload_param and ds.zero_stage != 3:
        est.problems.append("deepspeed.offload_param needs ZeRO-3")
    _memory(est, shape, cl, ds, world)
    if est.problems:  # infeasible: no time (and no simulation) needed
        est.step_s = est.days = float("inf")
        return est
    sim = simulate_stage(shape, cl, world, text_chunk)
    est.sim = sim
    accum = sim.n_micro if shape.tokens_per_micro else (est.batch.grad_accum if est.batch else 1)
    est.transfers = _transfers(shape, ds, nodes, gpn, accum)
    spec = cl.spec
    bw = {True: spec.inter_node_gbps * 1e9, False: spec.intra_node_gbps * 1e9}
    secs = {ph: 0.0 for ph in PHASES}
    for t in est.transfers:
        secs[t.phase] += t.bytes / bw[t.inter_node]
    est.comm_s = sum(secs.values())
    est.util = cl.mfu_for(*shape.mfu_key)[0]
    est.recompute = recompute_factor(shape, ds.zero_stage == 3)
    est.step_flops, est.mean_flops = sim.busiest_flops, sim.mean_flops
    _step_times(est, sim, secs, ds, accum, est.util * spec.peak_bf16)
    est.days = shape.steps * est.step_s / 86400
    return est


def _memory(
    est: Estimate, shape: StageShape, cl: ClusterConfig, ds: DeepSpeedConfig, world: int
) -> None:
    """``est.memory`` per GPU (model states, DeepSpeed buffers, the worst row's activations);
    a problem when it exceeds the usable memory."""
    s = shape.sizes
    est.memory = model_state_bytes(
        shape.trainable, shape.frozen, s.largest_layer, ds, world, shape.precision, shape.vq
    )
    est.memory["DeepSpeed buffers"] = buffer_bytes(ds)
    # the worst row under the same activation model that sizes it (which row is worst depends
    # on it: Liger's fused CE shrinks the text row's heads, not the other rows' layers)
    est.memory["activations"] = max(
        activation_bytes(
            s,
            row,
            shape.checkpointing,
            shape.trainable_groups,
            2 if shape.precision == "bf16" else 4,
            checkpoint_every=shape.checkpoint_every,
            loss_chunk_tokens=shape.loss_chunk_tokens,
            # Liger reads the head weights outside their modules: not under ZeRO-3 (chunked there)
            fused_ce=shape.kernels == "liger" and ds.zero_stage != 3,
        )
        for row in task_rows(shape, cl)
    )
    if est.total_memory > est.usable:
        est.problems.append(
            f"memory: {est.total_memory / 2**30:.1f} GiB per GPU > {est.usable / 2**30:.1f} GiB "
            f"usable on {cl.gpu}"
        )


def _transfers(shape: StageShape, ds: DeepSpeedConfig, nodes: int, gpn: int, accum: int):
    """The step's collectives (:func:`communication`) for the stage's parameter groups."""
    s = shape.sizes
    frozen_no_bwd = {"vq", "und_encoder", "gen_embeddings"} - set(shape.trainable_groups)
    pers = s.persistent  # none of the VQ's: it is held outside the engine, never gathered
    fwd_np = sum(n - pers.get(g, 0) for g, n in s.groups.items() if g != "vq")
    bwd_np = sum(n - pers.get(g, 0) for g, n in s.groups.items() if g not in frozen_no_bwd)
    # llm = embeddings + layers + final norm + lm_head (vocab x hidden each)
    layer = (s.groups["llm"] - pers.get("llm", 0) - 2 * s.vocab * s.hidden) // s.layers
    heads_np = s.head_params  # matrices: never persistent
    pre = max(0, bwd_np - layer * s.layers - heads_np)
    return communication(
        ds,
        shape.trainable,
        fwd_np,
        zero3_backward_gathers(pre, layer, s.layers, heads_np),
        nodes,
        gpn,
        accum,
        shape.precision,
        persistent=sum(pers.values()),
    )


def _step_times(
    est: Estimate, sim, secs: dict, ds: DeepSpeedConfig, accum: int, rate: float
) -> None:
    """``est.compute_s`` and ``est.step_s``: the mean over the simulated steps of the busiest
    rank's compute (with recomputation) and of what each ZeRO stage leaves exposed of
    ``secs`` (transfer seconds per phase)."""
    rc = est.recompute

    def fwd(f: float) -> float:
        return f / 3 / rate

    def bwd_s(f: float) -> float:  # backward + recomputation
        return (f * rc - f / 3) / rate

    steps, compute = [], []
    for busiest, micro, last in sim.steps:
        if ds.zero_stage <= 1:
            c = busiest * rc / rate
            t = c + max(0.0, secs["last backward"] - bwd_s(last))
        else:  # every micro-step synchronises: its slowest rank sets the pace
            c = sum(m * rc for m in micro) / rate
            t = sum(
                max(fwd(m), secs["forward"] / accum) + max(bwd_s(m), secs["backward"] / accum)
                for m in micro
            )
        steps.append(t + secs["after step"])
        compute.append(c)
    est.compute_s = sum(compute) / len(compute)
    est.step_s = sum(steps) / len(steps)


def recommend(estimates: list[Estimate]) -> Estimate | None:
    """Fewest days; near-ties (within 2%) go to fewer nodes, then less traffic, then less
    memory. None when nothing is feasible."""
    ok = [e for e in estimates if e.feasible]
    if not ok:
        return None
    best_days = min(e.days for e in ok)
    near = [e for e in ok if e.days <= best_days * 1.02]
    return min(near, key=lambda e: (e.nodes, round(e.step_s, 3), e.comm_bytes, e.total_memory))
