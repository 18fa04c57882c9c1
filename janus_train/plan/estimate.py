"""One stage under one DeepSpeed preset on a number of nodes: batch arithmetic, memory per
GPU, traffic, step time and days, assembled from the cost model in
:mod:`janus_train.plan.costs` (whose docstring states every formula), and the recommendation
among such estimates."""

from __future__ import annotations

from dataclasses import dataclass, field

from janus_train.plan.config import ClusterConfig
from janus_train.plan.costs import (
    ModelSizes,
    Row,
    Transfer,
    activation_bytes,
    buffer_bytes,
    communication,
    lora_adapter_params,
    model_sizes,
    model_state_bytes,
)
from janus_train.trainer.config import DeepSpeedConfig
from janus_train.trainer.distributed import BatchPlan, plan_batch

__all__ = [
    "Estimate",
    "Row",
    "StageShape",
    "activation_bytes",
    "batch_plan",
    "estimate",
    "model_sizes",
    "model_state_bytes",
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
    compute_s: float = 0.0
    comm_s: float = 0.0
    step_s: float = 0.0
    days: float = 0.0

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

    @property
    def trainable(self) -> int:
        full = set(self.trainable_groups) - set(self.lora_groups)
        return self.adapter_params + sum(n for g, n in self.sizes.groups.items() if g in full)

    @property
    def frozen(self) -> int:
        full = set(self.trainable_groups) - set(self.lora_groups)
        return sum(n for g, n in self.sizes.groups.items() if g not in full)


def stage_shape(run) -> StageShape:
    """``run``: a validated ``RunConfig`` with ``stage`` selecting the stage."""
    hp = run.hparams
    return StageShape(
        name=run.stage.name,
        sizes=model_sizes(run.model),
        trainable_groups=run.trainable_groups,
        global_batch=hp.global_batch_size,
        micro_batch=run.train.micro_batch_size,
        steps=min(hp.steps, hp.stop_at) if hp.stop_at else hp.steps,
        seq_len=run.data.seq_len,
        tokens_per_micro=run.train.tokens_per_micro,
        pack=run.data.pack,
        ratio=(hp.ratio.und, hp.ratio.text, hp.ratio.gen),
        checkpointing=run.model.gradient_checkpointing,
        checkpoint_every=run.model.checkpoint_every,
        precision=run.deepspeed.precision,
        lora_groups=tuple(run.model.lora.groups) if run.model.lora.enabled else (),
        adapter_params=lora_adapter_params(run.model),
        loss_chunk_tokens=run.model.loss_chunk_tokens,
        kernels=run.model.kernels,
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


def sample_flops(shape: StageShape, cl: ClusterConfig) -> float:
    """Mean model FLOPs (forward + backward, PaLM) of one sample under the stage's task ratio."""
    s = shape.sizes
    lens = (cl.und_sample_tokens, shape.seq_len, cl.gen_sample_tokens)
    per = []
    for task, t in zip(("und", "text", "gen"), lens):
        row_len = shape.seq_len if shape.pack else t
        f = t * (6.0 * s.flops_params + 12.0 * s.layers * s.hidden * row_len)
        f += s.und_image_flops if task == "und" else 0.0
        f += s.gen_image_flops if task == "gen" else 0.0
        per.append(f)
    w = shape.ratio
    return sum(f * k for f, k in zip(per, w)) / sum(w)


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
    shape: StageShape, cl: ClusterConfig, preset: str, ds: DeepSpeedConfig, nodes: int
) -> Estimate:
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
    s = shape.sizes
    est.memory = model_state_bytes(
        shape.trainable, shape.frozen, s.largest_layer, ds, world, shape.precision
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
    accum = est.batch.grad_accum if est.batch else max(1, shape.global_batch // (mb * world))
    frozen_no_bwd = {"vq", "und_encoder", "gen_embeddings"} - set(shape.trainable_groups)
    bwd = shape.trainable + shape.frozen - sum(s.groups[g] for g in frozen_no_bwd)
    est.transfers = communication(
        ds,
        shape.trainable,
        shape.trainable + shape.frozen,
        bwd,
        nodes,
        gpn,
        accum,
        shape.checkpointing,
        shape.precision,
    )
    spec = cl.spec
    bw = {True: spec.inter_node_gbps * 1e9, False: spec.intra_node_gbps * 1e9}
    overlapped = sum(t.bytes / bw[t.inter_node] for t in est.transfers if not t.exposed)
    exposed = sum(t.bytes / bw[t.inter_node] for t in est.transfers if t.exposed)
    est.comm_s = overlapped + exposed
    est.step_flops = shape.global_batch / world * sample_flops(shape, cl)
    est.compute_s = est.step_flops / ((cl.mfu or _default_mfu()) * spec.peak_bf16)
    est.step_s = max(est.compute_s, overlapped) + exposed
    est.days = shape.steps * est.step_s / 86400
    return est


def _default_mfu() -> float:
    from janus_train.plan.config import DEFAULT_MFU

    return DEFAULT_MFU


def recommend(estimates: list[Estimate]) -> Estimate | None:
    """Fewest days; near-ties (within 2%) go to fewer nodes, then less traffic, then less
    memory. None when nothing is feasible."""
    ok = [e for e in estimates if e.feasible]
    if not ok:
        return None
    best_days = min(e.days for e in ok)
    near = [e for e in ok if e.days <= best_days * 1.02]
    return min(near, key=lambda e: (e.nodes, round(e.step_s, 3), e.comm_bytes, e.total_memory))
