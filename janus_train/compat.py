"""Every private torch / DeepSpeed / transformers API and patch this package relies on, in one
place, each behind a guard that names the upstream version when the API is gone.

Nothing else in ``janus_train``, ``janus_demo`` or ``benchmarks/`` touches a private name of another package
(``tests/test_compat.py`` scans for it), and that test also asserts each private API below still
exists with the shape used here, so an upgrade that changes one fails a test instead of changing
behaviour silently. The upstream modules are imported inside the functions: importing this
module costs nothing and pulls in neither DeepSpeed nor transformers.

=============================  ==========================================================
shim                           private API (why no public one serves)
=============================  ==========================================================
set_process_group_timeouts     torch ``c10d._set_pg_timeout`` over ``c10d._world.pg_map``
                               (no public setter for a live group's timeout)
skip_deepspeed_shm_comm_build  ``deepspeed.ops.__compatible_ops__`` (no switch for the
                               CPU shared-memory all-reduce's JIT build)
reset_deepspeed_groups         five module globals of ``deepspeed.utils.groups`` (its
                               cache of process groups outlives a destroyed group)
convert_to_universal           ``ds_to_universal.main`` driven with the ``Namespace`` of
                               its command line (no library entry point)
restore_torch_linear           ZeRO-3's ``torch.nn.functional.linear`` patch and the
                               original it keeps (``InsertPostInitMethodToModuleSubClasses
                               .linear_bk``): DeepSpeed never puts it back
checkpoint_epilogue_once       ``DeepSpeedEngine._optimizer_has_ckpt_event_epilogue``
                               (a rank whose save failed must join the collective that
                               ``save_checkpoint`` runs after its writes)
save_without_barriers          the module global ``dist`` of ``deepspeed.runtime.engine``
                               and ``DeepSpeedEngine._copy_recovery_script`` (no switch
                               for ``save_checkpoint``'s two barriers and script copies)
reuse_save_metadata            ``DeepSpeedEngine._get_buffer_names``, ``_get_shared_params``,
                               ``_get_zero_param_shapes`` and the shapes of
                               ``_get_zero_frozen_param_attributes``: walks of the model
                               that every save repeats, for values fixed for an engine's life
dataloader_workers             a DataLoader iterator's ``_workers`` and
                               ``_shutdown_workers()`` (no public stop or worker list)
reinit_with_hf_initializer     ``PreTrainedModel._init_weights`` and the
                               ``_is_hf_initialized`` flags it honours
get/set_attn_implementation    ``PretrainedConfig._attn_implementation`` on a config
                               (public only as a model's ``set_attn_implementation``)
mark_generation_config_own     ``GenerationConfig._from_model_config``
from_pretrained_keeping_fp32   ``PreTrainedModel._keep_in_fp32_modules_strict`` (the
                               loader's own "read these in fp32" list is a class
                               attribute; ``from_pretrained`` takes no per-module dtype)
without_duck_shapes            ``torch.fx.experimental._config.use_duck_shape``
wrap_compiled_call             ``nn.Module._compiled_call_impl`` set by ``Module.compile``
dynamo_counters                ``torch._dynamo.utils.counters`` (frames, graphs, breaks:
                               no public counter of compilations)
torch_dispatch_mode            ``torch.utils._python_dispatch.TorchDispatchMode`` (the
                               documented base of dispatch modes, in a private module)
run_atexit_handlers            ``atexit._run_exitfuncs`` (a rank leaving by ``os._exit``
                               runs the handlers that finalization would have run)
=============================  ==========================================================
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.metadata
import logging
import re
import weakref
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)

TESTED = {"torch": (2, 13), "deepspeed": (0, 19), "transformers": (5, 24)}
"""(major, minor) each shim was checked against; ``tests/test_compat.py`` re-checks every
private API on whatever is installed."""

SHM_COMM_OP = "deepspeed_shm_comm"
DEEPSPEED_GROUP_GLOBALS = (
    "_WORLD_GROUP",
    "_DATA_PARALLEL_GROUP",
    "_MODEL_PARALLEL_GROUP",
    "_ZERO_PARAM_INTRA_PARALLEL_GROUP",
    "_TENSOR_MODEL_PARALLEL_GROUP",
)
"""The process groups ``deepspeed.utils.groups`` caches at module level."""


@functools.cache
def version(dist: str) -> tuple[int, int]:
    """(major, minor) of an installed distribution (``(0, 0)`` when not installed); read once
    (``importlib.metadata`` parses the metadata file each time: ~2 ms, in every save)."""
    try:
        v = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return (0, 0)
    nums = [int(x) for x in re.findall(r"\d+", v)[:2]]
    return (nums + [0, 0])[0], (nums + [0, 0])[1]


class UpstreamChanged(RuntimeError):
    """A private API this package relies on is not where it was."""


def _require(ok: bool, what: str, dist: str) -> None:
    if not ok:
        have = ".".join(map(str, version(dist)))
        want = ".".join(map(str, TESTED[dist]))
        raise UpstreamChanged(
            f"{what} is missing in {dist} {have} (janus_train.compat was checked against "
            f"{dist} {want}): adapt janus_train/compat.py"
        )


# --------------------------------------------------------------------------- Python


def run_atexit_handlers() -> None:
    """Run (and clear) the registered ``atexit`` handlers now: ``os._exit`` skips them, and
    ``trainer.distributed.exit_finished`` leaves by it to avoid finalization's aborts."""
    import atexit

    run = getattr(atexit, "_run_exitfuncs", None)
    if run is None:
        raise UpstreamChanged(
            "atexit._run_exitfuncs is missing in this Python: adapt janus_train/compat.py"
        )
    run()


# --------------------------------------------------------------------------- torch.distributed


def set_process_group_timeouts(timeout: datetime.timedelta) -> int | None:
    """Set the collective timeout of every live process group; the number changed, or None
    where this torch has no setter (torch < 2.2 or the private API moved)."""
    from torch.distributed import distributed_c10d as c10d

    setter = getattr(c10d, "_set_pg_timeout", None)
    groups = list(getattr(getattr(c10d, "_world", None), "pg_map", {}) or [])
    if version("torch") < (2, 2) or setter is None or not groups:
        return None
    for group in groups:
        setter(timeout, group)
    return len(groups)


# --------------------------------------------------------------------------- DeepSpeed


def skip_deepspeed_shm_comm_build() -> bool:
    """Mark DeepSpeed's CPU shared-memory all-reduce as incompatible, so that its C++ build is
    not attempted (it serves only ``inference_all_reduce``). False where the table is gone."""
    from deepspeed import ops

    table = getattr(ops, "__compatible_ops__", None)
    if not isinstance(table, dict):
        logger.warning("deepspeed.ops.__compatible_ops__ is gone: the shm_comm build may run")
        return False
    table[SHM_COMM_OP] = False
    return True


def reset_deepspeed_groups() -> None:
    """Forget the process groups DeepSpeed cached at module level (after the process group was
    destroyed, a later in-process engine would reuse a group torch no longer knows)."""
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name in DEEPSPEED_GROUP_GLOBALS:
        if hasattr(groups, name):
            setattr(groups, name, None)


def universal_args(input_folder: str, output_folder: str) -> dict:
    """The command-line options of ``ds_to_universal`` this package runs it with."""
    return dict(
        input_folder=input_folder,
        output_folder=output_folder,
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )


def convert_to_universal(input_folder: str, output_folder: str) -> None:
    """DeepSpeed's ``ds_to_universal`` on one checkpoint tag, in this process."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    _require(
        hasattr(ds_to_universal, "main"), "deepspeed.checkpoint.ds_to_universal.main", "deepspeed"
    )
    ds_to_universal.main(argparse.Namespace(**universal_args(input_folder, output_folder)))


def restore_torch_linear() -> bool:
    """Put torch's own ``torch.nn.functional.linear`` back where a ZeRO-3 engine left DeepSpeed's
    ``zero3_linear_wrap`` (installed for the engine's backward re-gathers, left in place for the
    rest of the process: every later linear runs through an autograd Function, 2x slower in a
    tiny CPU forward, and activation checkpointing recomputes whole layers). Only once no
    ZeRO-3 engine trains any more. True when it was patched."""
    import sys

    import torch

    zero3 = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    if zero3 is None:  # DeepSpeed's ZeRO-3 never loaded: nothing patched it
        return False
    holder = getattr(zero3, "InsertPostInitMethodToModuleSubClasses", None)
    _require(
        holder is not None and hasattr(zero3, "zero3_linear_wrap"),
        "deepspeed.runtime.zero.partition_parameters.zero3_linear_wrap",
        "deepspeed",
    )
    original = getattr(holder, "linear_bk", None)
    if original is None or torch.nn.functional.linear is not zero3.zero3_linear_wrap:
        return False
    torch.nn.functional.linear = original
    return True


@contextlib.contextmanager
def checkpoint_epilogue_once(engine) -> Iterator[Callable[[], None]]:
    """Around DeepSpeed's ``save_checkpoint``: yields ``finish()``, which runs what the save
    runs after writing its files (ZeRO-3: re-gather the persistent parameters, a collective)
    unless the save ran it already: for a rank whose save failed while the others went on,
    wherever it failed (before the epilogue: it must join the others' collective; after: it
    must not run a second one). An engine without the hook (not DeepSpeed's, or another
    ZeRO stage) has nothing to run."""
    has_epilogue = getattr(engine, "_optimizer_has_ckpt_event_epilogue", None)
    if has_epilogue is None or not has_epilogue():
        yield lambda: None
        return
    optimizer = engine.optimizer
    real = optimizer.checkpoint_event_epilogue
    ran: list[bool] = []

    def recorded(*args, **kwargs):
        ran.append(True)
        return real(*args, **kwargs)

    def finish() -> None:
        if not ran:
            ran.append(True)
            real()

    own = "checkpoint_event_epilogue" in vars(optimizer)
    optimizer.checkpoint_event_epilogue = recorded
    try:
        yield finish
    finally:
        if own:
            optimizer.checkpoint_event_epilogue = real
        else:
            del optimizer.checkpoint_event_epilogue


class _WithoutBarrier:
    """``deepspeed.comm`` as ``deepspeed.runtime.engine`` sees it, less ``barrier``."""

    def __init__(self, comm) -> None:
        self._comm = comm

    def barrier(self, *args, **kwargs) -> None:
        return None

    def __getattr__(self, name: str):
        return getattr(self._comm, name)


SAVE_BARRIERS = 2
"""``dist.barrier()`` calls in DeepSpeed's ``save_checkpoint`` (after rank 0 creates the save
directory; at the end, after every rank's writes), checked by ``tests/test_compat.py``."""


def _tested_deepspeed_engine_module(engine):
    """``deepspeed.runtime.engine`` when ``engine`` is its ``DeepSpeedEngine`` and DeepSpeed is
    the :data:`TESTED` version (the save patches below are checked against it); else None."""
    try:
        from deepspeed.runtime import engine as ds_engine
    except ImportError:
        return None
    if (
        not isinstance(engine, ds_engine.DeepSpeedEngine)
        or version("deepspeed") != TESTED["deepspeed"]
    ):
        return None
    return ds_engine


@contextlib.contextmanager
def save_without_barriers(engine) -> Iterator[bool]:
    """While DeepSpeed's ``save_checkpoint`` runs in the block, its :data:`SAVE_BARRIERS`
    barriers and its copies of the recovery scripts (``zero_to_fp32.py``, into the save
    directory) are skipped; its other collectives (ZeRO-3's gathers, tag validation) run.
    For a caller that writes no file inside the call but the directories (its checkpoint
    engine only records the state dicts; every rank makes the directory itself) and commits
    by a protocol of its own: then those barriers only make every rank wait for the slowest.
    Yields whether they are skipped: not for an engine other than DeepSpeed's or a DeepSpeed
    newer than :data:`TESTED` (the call then runs unchanged)."""
    ds_engine = _tested_deepspeed_engine_module(engine)
    if ds_engine is None:
        yield False
        return
    comm = ds_engine.dist
    _require(callable(getattr(comm, "barrier", None)), "deepspeed.runtime.engine.dist", "deepspeed")
    _require(
        callable(getattr(engine, "_copy_recovery_script", None)),
        "DeepSpeedEngine._copy_recovery_script",
        "deepspeed",
    )
    ds_engine.dist = _WithoutBarrier(comm)
    engine._copy_recovery_script = lambda save_path: None
    try:
        yield True
    finally:
        ds_engine.dist = comm
        del engine._copy_recovery_script


_SAVE_METADATA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""engine -> {method name: its result}, for :func:`reuse_save_metadata`."""

SAVE_METADATA = ("_get_buffer_names", "_get_shared_params", "_get_zero_param_shapes")
"""DeepSpeed's methods whose results :func:`reuse_save_metadata` keeps (with the shapes of
``_get_zero_frozen_param_attributes``): names, shapes and sharing of the model's parameters
and buffers, which no training step changes."""


@contextlib.contextmanager
def reuse_save_metadata(engine) -> Iterator[bool]:
    """While DeepSpeed's ``save_checkpoint`` runs in the block, the walks of the model that
    describe it (the persistent buffers' names, which parameters share storage, the shapes of
    the optimized and of the frozen parameters: :data:`SAVE_METADATA`) are computed at the
    engine's first save only and reused at the next ones (~0.8 ms of a tiny model's ~2 ms
    save on the loop's thread, more for a bigger model): an engine's modules, parameter set,
    frozen set (``requires_grad``, set when the model is built) and ZeRO groups do not change
    after it is built. Data (the parameters, the frozen fragments, the optimizer's state) is
    read at every save. Yields whether they are reused:
    not for an engine other than DeepSpeed's or a DeepSpeed newer than :data:`TESTED`."""
    if _tested_deepspeed_engine_module(engine) is None:
        yield False
        return
    names = (*SAVE_METADATA, "_get_zero_frozen_param_attributes", "_get_param_shape_func")
    for name in names:
        _require(callable(getattr(engine, name, None)), f"DeepSpeedEngine.{name}", "deepspeed")
    kept = _SAVE_METADATA.setdefault(engine, {})

    def keep(name: str, fn: Callable) -> Callable:
        def kept_fn():
            if name not in kept:
                kept[name] = fn()
            return kept[name]

        return kept_fn

    frozen = engine._get_zero_frozen_param_attributes
    shape_fn = engine._get_param_shape_func
    frozen_shapes = keep("frozen_param_shapes", lambda: frozen(shape_fn))

    def frozen_attributes(attr_func):
        return frozen_shapes() if attr_func == shape_fn else frozen(attr_func)

    for name in SAVE_METADATA:
        setattr(engine, name, keep(name, getattr(engine, name)))
    engine._get_zero_frozen_param_attributes = frozen_attributes
    try:
        yield True
    finally:
        for name in (*SAVE_METADATA, "_get_zero_frozen_param_attributes"):
            delattr(engine, name)


# --------------------------------------------------------------------------- DataLoader


def dataloader_workers(it) -> tuple[list, Callable[[], None] | None]:
    """A DataLoader iterator's worker processes and its shutdown (``None`` for a single-process
    iterator, which has neither)."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is None:
        multi = "MultiProcessing" in type(it).__name__
        _require(not multi, "the multi-process DataLoader iterator's _shutdown_workers", "torch")
        return [], None
    return list(getattr(it, "_workers", [])), shutdown


# --------------------------------------------------------------------------- transformers


def reinit_with_hf_initializer(model, module) -> None:
    """Initialise ``module`` (inside ``model``) again with the model's own initialiser:
    transformers skips tensors and modules flagged as initialised (e.g. loaded ones)."""
    _require(hasattr(model, "_init_weights"), "PreTrainedModel._init_weights", "transformers")
    for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
        t._is_hf_initialized = False
    module._is_hf_initialized = False
    model._init_weights(module)


def get_attn_implementation(config) -> str | None:
    """The attention implementation a (sub-)config was built with."""
    _require(hasattr(config, "_attn_implementation"), "config._attn_implementation", "transformers")
    return config._attn_implementation


def set_attn_implementation(config, impl: str) -> None:
    _require(hasattr(config, "_attn_implementation"), "config._attn_implementation", "transformers")
    config._attn_implementation = impl


def mark_generation_config_own(gc) -> None:
    """A generation config marked "from the model config" is rebuilt by ``from_pretrained``
    (its ``generation_kwargs`` lost): mark it as written by hand."""
    _require(
        hasattr(gc, "_from_model_config"), "GenerationConfig._from_model_config", "transformers"
    )
    gc._from_model_config = False


def from_pretrained_keeping_fp32(cls, path, keep: list[str], **kwargs):
    """``cls.from_pretrained(path, **kwargs)`` with the modules named by ``keep`` (name patterns
    of the state dict) read in float32 whatever ``dtype`` asks, by transformers' own
    ``_keep_in_fp32_modules_strict``: set on a same-named subclass for this one load (the
    loader reads it from the instance it builds), then the instance gets ``cls`` back."""
    _require(
        hasattr(cls, "_keep_in_fp32_modules_strict") and hasattr(cls, "_get_dtype_plan"),
        "PreTrainedModel._keep_in_fp32_modules_strict",
        "transformers",
    )
    own = set(cls._keep_in_fp32_modules_strict or [])
    sub = type(
        cls.__name__,
        (cls,),
        {"_keep_in_fp32_modules_strict": sorted(own | set(keep)), "__module__": cls.__module__},
    )
    model = sub.from_pretrained(path, **kwargs)
    model.__class__ = cls
    return model


# --------------------------------------------------------------------------- torch.compile


@contextlib.contextmanager
def without_duck_shapes() -> Iterator[None]:
    """Dynamo traces with duck shaping off (equal sizes stay distinct symbols)."""
    from torch.fx.experimental import _config as fx_config

    _require(hasattr(fx_config, "use_duck_shape"), "torch.fx.experimental._config", "torch")
    with fx_config.patch(use_duck_shape=False):
        yield


def wrap_compiled_call(module, wrap: Callable[[Callable], Callable]) -> None:
    """Wrap the compiled forward that ``module.compile()`` installed."""
    _require(
        getattr(module, "_compiled_call_impl", None) is not None,
        "nn.Module._compiled_call_impl after Module.compile",
        "torch",
    )
    module._compiled_call_impl = wrap(module._compiled_call_impl)


def dynamo_counters() -> dict[str, int]:
    """Dynamo's process-wide counts so far: frames compiled, unique graphs, graph breaks."""
    from torch._dynamo import utils as dynamo_utils

    counters = getattr(dynamo_utils, "counters", None)
    _require(counters is not None, "torch._dynamo.utils.counters", "torch")
    return {
        "dynamo_frames": counters["frames"]["total"],
        "dynamo_unique_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def torch_dispatch_mode() -> type:
    """The base class of a ``__torch_dispatch__`` mode (sees every aten op run under it)."""
    from torch.utils import _python_dispatch

    mode = getattr(_python_dispatch, "TorchDispatchMode", None)
    _require(mode is not None, "torch.utils._python_dispatch.TorchDispatchMode", "torch")
    return mode
