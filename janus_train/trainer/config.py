"""Typed configuration of the trainer, of DeepSpeed and of the held-out evaluation the trainer
runs (owned by janus_train.trainer; the evaluation itself: ``janus_train.evaluate``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DeepSpeedConfig:
    """ZeRO settings; the DeepSpeed JSON is generated from this and saved in the run dir."""

    zero_stage: int = 2
    """ZeRO stage: 0 (none) | 1 (optimizer states) | 2 (+ gradients) | 3 (+ parameters)
    partitioned across the data-parallel ranks."""
    offload_optimizer: bool = False
    """ZeRO optimizer state in CPU memory (uses DeepSpeedCPUAdam)."""
    offload_param: bool = False
    """ZeRO-3 parameters in CPU memory."""
    hpz_partition_size: int = 1
    """ZeRO++ hpZ (ZeRO-3 only): keep a secondary copy of the parameters sharded over this many
    GPUs (the GPUs of a node) so the backward all-gathers stay inside the node; 1 = off."""
    quantized_weights: bool = False
    """ZeRO++ qwZ (ZeRO-3 only, CUDA): all-gather parameters as int8 with a scale per group of
    about 8000 (DeepSpeed's ``zero_quantized_weights``), half the bf16 bytes of every forward
    and backward gather; the layers then compute with the dequantized (rounded) weights."""
    quantized_gradients: bool = False
    """ZeRO++ qgZ (ZeRO-3 only, CUDA, more than one node): reduce gradient matrices by an int4
    all-to-all in the node, then across nodes (DeepSpeed's ``zero_quantized_gradients``)
    instead of the reduce-scatter in ``reduce_fp32``'s dtype; 1-D tensors still reduce-scatter.
    Lossy: each gradient is rounded to 4 bits twice."""
    precision: str = "bf16"
    """``bf16`` | ``fp32``; bf16 falls back to fp32 where the device lacks it (CPU)."""
    reduce_bucket_size: int = 500_000_000
    """Elements per gradient reduce bucket (``zero_optimization.reduce_bucket_size``)."""
    bucket_allreduce: bool = True
    """ZeRO-1/2: DeepSpeed's ``use_multi_rank_bucket_allreduce`` (its default): all-reduce each
    gradient bucket and keep one's own partition, twice the bytes of ``false``, which reduces
    each partition to the rank that owns it (``janus-plan`` counts either)."""
    overlap_comm: bool = True
    """Overlap gradient reduction with the backward pass (GPU only; off on CPU)."""
    gradient_clipping: float = 1.0
    """Global gradient-norm clip (spec §5: 1.0 in every stage)."""
    adam_eps: float = 1e-8
    """Epsilon of AdamW."""
    reduce_fp32: bool = True
    """bf16 runs: reduce gradients across ranks in fp32 (DeepSpeed's
    ``communication_data_type``), so the sum over ranks is not rounded to bf16 at every ring
    step; doubles the reduction traffic. Under ZeRO-3 (without optimizer offload) the reduced
    gradient partitions are also kept and accumulated over micro-steps in fp32
    (``data_types.grad_accum_dtype``), else DeepSpeed rounds the fp32 sum back to bf16.
    fp32 runs: no effect."""

    @property
    def quantized(self) -> list[str]:
        """The ZeRO++ quantization keys set true (``quantized_weights``, then
        ``quantized_gradients``)."""
        flags = [
            ("quantized_weights", self.quantized_weights),
            ("quantized_gradients", self.quantized_gradients),
        ]
        return [key for key, on in flags if on]


@dataclass
class TrainConfig:
    """Loop, logging and checkpoint settings shared by all stages."""

    run_dir: str = "runs/${experiment.name}/${stage.name}"
    """Directory of the run: config, DeepSpeed JSON, metrics, checkpoints and the export ``hf/``;
    the same directory again resumes from its latest checkpoint."""
    tokens_per_micro: int = 4096
    """Token-budget micro-batches (> 0, the default): the step's ``global_batch_size`` samples
    (exact task ratio) are assigned to ranks balancing tokens, and each rank packs its share
    into micro-batches of one row of at most this many tokens, samples isolated by attention;
    all ranks run the same number of micro-steps. Must be >= ``data.seq_len``. 0: fixed
    ``micro_batch_size`` samples per micro-batch, one per padded row."""
    micro_batch_size: int = 1
    """With ``tokens_per_micro: 0``: samples per rank per micro-batch; accumulation = global
    batch / (micro x world). Ignored with token-budget micro-batches."""
    loss_reduction: str = "token_mean"
    """``token_mean``: mean over all supervised tokens of the step (all tasks, micro-batches and
    ranks). ``task_mean_sum``: sum over tasks of each task's token mean."""
    log_every: int = 10
    """Write metrics every N optimizer steps (and at the last step)."""
    ckpt_every: int = 1000
    """Checkpoint every N optimizer steps (0: only at the end and on a stop signal)."""
    keep_last: int = 2
    """Committed checkpoints kept; older ones are deleted after a new one is committed."""
    ckpt_async: bool = True
    """Write checkpoints off the critical path: the loop waits only while the states are
    copied to host memory, a thread of each rank writes and fsyncs the files, and the save is
    committed (manifest, rename, ``latest``) at the first step boundary after every rank has
    finished writing (at the latest at the next save, the end of the stage or a stop signal).
    Needs host memory for one more copy of each rank's checkpoint share. false: every save
    writes and commits before the loop goes on."""
    max_consecutive_skips: int = 10
    """Non-finite updates in a row before the run stops."""
    export_at_end: bool = True
    """Write an HF-format directory (``run_dir/hf``) when the stage ends: the next stage's
    ``model.init_from``."""
    export_max_shard_size: str = "5GB"
    """Largest safetensors file of the export (``"5GB"``, ``"500MB"``, ``"2GiB"``): bigger models
    are written in shards with an index, and load shard by shard."""
    export_dtype: str = "auto"
    """Dtype of the export's weights: ``auto`` (the training dtype: bf16 for a bf16 run, as
    DeepSeek's releases are stored, half the bytes of fp32; the next stage reads its
    ``model.init_from`` in its own training dtype anyway), ``bf16`` or ``fp32`` (the fp32
    master weights unrounded). The frozen VQ is written in fp32 either way."""
    dry_run: bool = False
    """Validate config, recipe and batch arithmetic, then exit before building the model."""
    synthetic_data: bool = False
    """Train on deterministic synthetic batches (``janus_train.data.synthetic_loader``)
    instead of the WebDataset loader: tests, benchmarks, smoke runs without data."""
    synthetic_seq_len: int = 64
    """Row length of synthetic batches (the longest synthetic sample)."""
    synthetic_length_mix: str = "uniform"
    """Text tokens per synthetic sample: ``uniform`` (text rows T/2..T, und/gen captions up to
    the row) or ``janus`` (the papers' mix: understanding 20-300 answer tokens, generation
    10-80 prompt tokens, text documents 100-4096 tokens; capped by ``synthetic_seq_len``)."""
    wandb: bool = False
    """Mirror metrics to wandb (offline mode when WANDB_API_KEY is unset)."""
    wandb_project: str = "janus_train"
    """wandb project of the mirrored metrics (with ``wandb``)."""
    progress_bar: bool = True
    """tqdm bar on rank 0 when stderr is a terminal."""
    seed: int = 0
    """Seed of the per-rank RNGs (dropout); the data order has its own seed."""
    collective_timeout_s: float = 600.0
    """Timeout of every collective of the training loop: a rank that stops progressing (frozen,
    lost node, deadlock) makes the others exit non-zero after this long instead of waiting."""
    init_timeout_s: float = 1800.0
    """Timeout of joining the process group and of the collectives of the set-up (model load,
    checkpoint load) and the final export; ``launch/torchrun.sh`` also uses it as the
    rendezvous ``join_timeout``."""
    init_from_node_copy: str | None = "/dev/shm"
    """Node-local directory where one rank per node copies ``model.init_from`` for the node's
    ranks to load, so the shared file system is read once per node, not once per rank
    (``janus_train.trainer.startup``); on tmpfs (``/dev/shm``) the copy is the memory the ranks
    map. null, one rank per node, or too little space on any node: every rank reads
    ``model.init_from`` itself (the last with a warning). Not used (logged) when the checkpoint
    is loaded partitioned (ZeRO-3, safetensors): rank 0 reads it in place, the other ranks only
    the VQ's tensors."""
    stop_grace_s: float = 300.0
    """After SIGTERM/SIGUSR1 the loop must complete a step, evaluation or checkpoint at least
    this often, else the rank is stuck (e.g. in a collective with a dead peer) and exits 70
    without saving (the last committed checkpoint stays valid)."""


@dataclass
class EvalConfig:
    """The held-out evaluation (``janus_train.evaluate.run_eval``): when the trainer runs it, on
    which recipe, how much of it, and how images are generated."""

    every: int = 0
    """Run the evaluation every N optimizer steps, on all ranks (0: never)."""
    recipe: str | None = None
    """Held-out data recipe (name in ``data_recipes/`` or a path); required when ``every`` > 0
    (the ``tiny`` experiment sets ``tiny_heldout``, the demo's held-out split)."""
    metrics: list[str] = field(default_factory=list)
    """Application metrics added to the evaluation: ``"package.module:function"`` callables
    (``janus_train.evaluate.GenerationOutputs`` -> ``{name: value}``); the demo adds
    ``janus_demo.metrics:scene_metrics``."""
    guidance_scale: float = 5.0
    """Classifier-free guidance of the generated images (>= 1; 1 = none)."""
    extra_guidance_scales: list[float] = field(default_factory=list)
    """Further scales whose greedy ``gen/token_accuracy@cfg{s}`` is also reported."""
    max_per_source: int = 32
    """Records read from each source of the eval recipe (loss)."""
    batch_size: int = 16
    """Samples per forward (loss) and prompts per generation batch."""
    n_und: int = 32
    """Held-out questions answered."""
    n_gen: int = 16
    """Held-out prompts generated (greedy, with CFG)."""
    n_grid: int = 8
    """Prompts shown in the image grid (greedy + 2 sampled images each)."""
    max_new_tokens: int = 24
    """Longest generated answer, in tokens."""
