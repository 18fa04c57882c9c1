"""Process group and the DeepSpeed engine (batch arithmetic: ``janus_train.batch.BatchPlan``): the only module (with export and
checkpoint) that imports deepspeed.

The DeepSpeed JSON is generated from the typed config (:func:`build_deepspeed_config`), saved
in the run dir and logged; nothing else in the code base reads DeepSpeed settings.

Gradient normalisation: DeepSpeed averages gradients over data-parallel ranks; the loop runs
its backwards with ``scale_wrt_gas=False`` (no division by the accumulation steps: their number
varies per step with token-budget micro-batches, the loop marks the accumulation boundary
itself) and pre-multiplies each micro-batch loss by ``world`` (:attr:`BatchPlan.loss_scale`), so
the optimizer sees the gradient of the exact step loss (sum of token losses / supervised tokens
of the whole step).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from janus_train import compat
from janus_train.batch import BatchPlan
from janus_train.trainer.config import DeepSpeedConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(timeout_s: float = 1800) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (torchrun, deepspeed launcher, Slurm env,
    or a single process without any launcher). Idempotent. ``timeout_s``
    (``train.init_timeout_s``): joining the process group, and every collective until
    :func:`set_collective_timeout` changes it (the set-up: rank 0 may train a tokenizer or
    read a checkpoint while the others wait)."""
    import deepspeed

    # A bare `python -m janus_train.train` becomes a world of one (DeepSpeed would try MPI).
    for k, v in (
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
    ):
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        # a world of one owns its store: any free port (a pid-derived one collided in CI with
        # a port still held from an earlier run)
        os.environ["MASTER_PORT"] = str(_free_port())
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not torch.cuda.is_available():
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce used only by
            # inference_all_reduce (never by ZeRO training): skip the C++ build (about a minute
            # per fresh machine, and a compiler requirement).
            compat.skip_deepspeed_shm_comm_build()
        deepspeed.init_distributed(
            dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s)
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def shutdown_distributed() -> None:
    """Destroy every process group (DeepSpeed's too). No-op without a process group.

    This unregisters the groups; it does not end their C++ threads (gloo's transport loops and
    workers, the TCPStore's): the DeepSpeed engine, kept alive by its own hooks, still holds
    the group objects. See :func:`exit_finished`."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_finished(status: int) -> NoReturn:
    """Leave a rank whose run returned (done, or checkpointed for a requeue) with ``status``.

    Python's finalization would destroy the still-referenced process groups (above) in no
    particular order while their C++ threads run; a ``std::thread`` destroyed while joinable
    aborts the process: a rank that had finished died with "terminate called without an
    active exception" (SIGABRT; 1 of 40 finished ZeRO-3 bf16 ranks on a loaded CPU machine,
    none of 60 with this exit), which torchrun and Slurm report as a crash. So: destroy the groups, run the
    ``atexit`` handlers, flush the logs and standard streams, and ``os._exit`` without
    finalization (nothing else is left to release: the run's own resources closed in its
    ``RunGuard``)."""
    import sys

    try:
        shutdown_distributed()
        compat.run_atexit_handlers()
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    finally:
        os._exit(status)


def set_collective_timeout(timeout_s: float) -> int:
    """Timeout of every collective from now on, in every process group (the default one and
    those DeepSpeed created, which otherwise keep torch's 10 / 30 min default): a rank that
    stops progressing makes the others fail after ``timeout_s`` instead of waiting. NCCL aborts
    the communicator (TORCH_NCCL_ASYNC_ERROR_HANDLING), gloo raises. Returns the number of
    groups changed (0 without a process group)."""
    if not dist.is_initialized():
        return 0
    # torch has no public setter for an existing group's timeout (janus_train.compat)
    n = compat.set_process_group_timeouts(datetime.timedelta(seconds=timeout_s))
    if n is None:
        logger.warning(
            "this torch cannot change a process group's timeout: collectives keep "
            "train.init_timeout_s"
        )
        return 0
    return n


def is_main_process() -> bool:
    """Rank 0 of the process group, or no process group (one process)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj) -> list:
    """``[obj of rank 0, ..., obj of rank world-1]`` (small picklable objects)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def resolve_precision(requested: str) -> str:
    """``bf16`` only where the accelerator supports it; fp32 otherwise (CPU)."""
    if requested == "bf16" and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        logger.warning("bf16 requested but unsupported on this device: training in fp32")
        return "fp32"
    return requested


def build_deepspeed_config(
    ds_cfg: DeepSpeedConfig, plan: BatchPlan, precision: str, weight_decay: float, lr: float
) -> dict:
    """The DeepSpeed JSON for one stage.

    The optimizer is AdamW (0.9, 0.95) built by DeepSpeed (torch's AdamW, or DeepSpeedCPUAdam
    with optimizer offload); its learning rate is set by the loop every step.
    """
    if ds_cfg.offload_param and ds_cfg.zero_stage != 3:
        raise ValueError("deepspeed.offload_param needs deepspeed.zero_stage=3")
    if ds_cfg.offload_optimizer and ds_cfg.zero_stage == 0:
        raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
    if ds_cfg.hpz_partition_size > 1:
        if ds_cfg.zero_stage != 3:
            raise ValueError("deepspeed.hpz_partition_size > 1 needs deepspeed.zero_stage=3")
        if plan.world_size % ds_cfg.hpz_partition_size:
            raise ValueError(
                f"deepspeed.hpz_partition_size={ds_cfg.hpz_partition_size} does not divide the "
                f"world size {plan.world_size}"
            )
    zero: dict = {
        "stage": ds_cfg.zero_stage,
        "overlap_comm": ds_cfg.overlap_comm and torch.cuda.is_available(),
        "contiguous_gradients": True,
        "reduce_bucket_size": ds_cfg.reduce_bucket_size,
    }
    if ds_cfg.zero_stage >= 2:
        zero["allgather_bucket_size"] = ds_cfg.reduce_bucket_size
    if ds_cfg.zero_stage in (1, 2) and not ds_cfg.bucket_allreduce:
        zero["use_multi_rank_bucket_allreduce"] = False
    if ds_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds_cfg.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds_cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        if ds_cfg.hpz_partition_size > 1:
            zero["zero_hpz_partition_size"] = ds_cfg.hpz_partition_size
        for key in ds_cfg.quantized:  # ZeRO++ (config.validate)
            zero[f"zero_{key}"] = True
    extra: dict = {"checkpoint": {"tag_validation": "Ignore"}}  # a save's tag: the shared step
    if precision == "bf16" and ds_cfg.reduce_fp32 and ds_cfg.zero_stage >= 1:
        extra["communication_data_type"] = "fp32"  # see DeepSpeedConfig.reduce_fp32
        if ds_cfg.zero_stage == 3 and not ds_cfg.offload_optimizer:
            # ZeRO-3 casts each reduced partition to the accumulation dtype (bf16 by default),
            # which would round the fp32 sum straight back; fp32 partitions cost 2 more bytes
            # per parameter / world (janus-plan already counts ZeRO-3 gradients as fp32).
            # ZeRO-1/2 accumulate unpartitioned (an fp32 copy of every gradient), and the
            # offload path keeps fp32 gradients in CPU memory already.
            extra["data_types"] = {"grad_accum_dtype": "fp32"}
    return {
        **extra,
        "train_batch_size": plan.micro_batch_size * plan.grad_accum * plan.world_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": ds_cfg.gradient_clipping,
        "zero_optimization": zero,
        # check_grad_overflow: a non-finite gradient norm skips the update (the loop counts it)
        "bf16": (
            {"enabled": True, "check_grad_overflow": True}
            if precision == "bf16"
            else {"enabled": False}
        ),
        "fp16": {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": lr,
                "betas": [0.9, 0.95],
                "eps": ds_cfg.adam_eps,
                "weight_decay": weight_decay,
                # torch's AdamW needs no compiled op; the CPU-offload path needs DeepSpeed's.
                "torch_adam": not ds_cfg.offload_optimizer,
            },
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


def check_quantized_available(ds_cfg: DeepSpeedConfig, world_size: int) -> None:
    """ZeRO++ qwZ / qgZ run DeepSpeed's CUDA quantizer kernels, and qgZ's all-to-all groups
    take every GPU of a node (``torch.cuda.device_count()`` ranks each): refused in one line
    where that cannot hold, before any model is built (a dry run may plan for another
    machine, so it is not checked there)."""
    keys = ds_cfg.quantized
    if not keys:
        return
    if not torch.cuda.is_available():
        raise ValueError(
            f"deepspeed.{keys[0]}=true needs CUDA (DeepSpeed's quantizer kernels); "
            "set it false on this machine"
        )
    from deepspeed.ops.op_builder import QuantizerBuilder

    if not QuantizerBuilder().is_compatible(verbose=False):
        raise ValueError(
            f"deepspeed.{keys[0]}=true: DeepSpeed's quantizer op cannot be built here (it is "
            "JIT-compiled with nvcc at first use, or DS_BUILD_QUANTIZER=1 at install)"
        )
    per_node = torch.cuda.device_count()
    if ds_cfg.quantized_gradients and world_size % per_node:
        raise ValueError(
            f"deepspeed.quantized_gradients=true needs every GPU of each node: world size "
            f"{world_size} is not a multiple of the {per_node} GPUs per node"
        )


UNTESTED_PARTITIONED = (
    ("zero_hpz_partition_size", "deepspeed.hpz_partition_size"),
    ("zero_quantized_weights", "deepspeed.quantized_weights"),
    ("zero_quantized_gradients", "deepspeed.quantized_gradients"),
    ("offload_param", "deepspeed.offload_param"),
)
"""(``zero_optimization`` key, our config key) of the ZeRO-3 settings under which the
partitioned load is not used: with them ``zero.Init`` itself builds hpZ's secondary partitions,
quantized or offloaded parameters before ``deepspeed.initialize``, and ``GatheredParameters``
(``reinit_gen_*``) then runs on those: never checked on a GPU, so such a run loads whole."""


def partitioned_load(ds_config: dict):
    """How ``build_model`` builds a ZeRO-3 run's ``model.init_from``
    (:class:`janus_train.model.PartitionedLoad`), None under ZeRO-0/1/2 or with a setting of
    :data:`UNTESTED_PARTITIONED` (then loaded whole, as before; one INFO line names the key).

    Loading: transformers' public switch, an ``HfDeepSpeedConfig`` of this run's DeepSpeed
    config kept alive (transformers holds only a weak reference) for the ``from_pretrained``
    call, then removed, so no later ``from_pretrained`` (an export's check, evaluation) builds
    under ``zero.Init``. Gathering: ``deepspeed.zero.GatheredParameters`` with rank 0 as the
    modifier."""
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage") != 3:
        return None
    for ds_key, key in UNTESTED_PARTITIONED:
        value = zero.get(ds_key)
        if value and (ds_key != "zero_hpz_partition_size" or value > 1):
            logger.info(
                "%s: model.init_from loaded whole on every rank, then partitioned (the "
                "partitioned load is not yet checked with it)",
                key,
            )
            return None
    import deepspeed

    from janus_train.model import PartitionedLoad

    @contextlib.contextmanager
    def loading():
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        alive = HfDeepSpeedConfig(ds_config)
        try:
            yield alive
        finally:
            unset_hf_deepspeed_config()

    def gathered(params: list):
        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)

    return PartitionedLoad(loading, gathered)


def init_engine(model: torch.nn.Module, ds_config: dict, param_groups: list[dict]):
    """``deepspeed.initialize`` with our param groups; returns the engine.

    A :class:`JanusTrainModel`'s frozen VQ is held outside the engine
    (``janus_train.model.vq_codes.detach_vq``), whole and in fp32 on every rank: DeepSpeed would
    cast it to bf16 under ``deepspeed.precision=bf16`` (about 1 code in 16 differed from the fp32
    run's) and partition it under ZeRO-3, where it would cost a gather per micro-step. Its cost:
    4 bytes per VQ parameter on each rank, instead of 2 (ZeRO-0/1/2) or 2 / world (ZeRO-3).

    A ZeRO-3 engine replaces ``torch.nn.functional.linear`` process-wide and DeepSpeed never
    restores it; an engine of another stage built later in the same process gets torch's own
    back (``compat.restore_torch_linear``)."""
    import deepspeed

    from janus_train.model import JanusTrainModel
    from janus_train.model.vq_codes import detach_vq

    vq = detach_vq(model.janus) if isinstance(model, JanusTrainModel) else None
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        compat.restore_torch_linear()  # left by a ZeRO-3 engine earlier in this process
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups, config=ds_config
    )
    if vq is not None:
        vq.to(engine.device)
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
