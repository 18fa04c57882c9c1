"""``janus_train/compat.py`` holds every private torch / DeepSpeed / transformers API the package
uses: nothing else touches one (scanned here), and each private API still exists with the shape
the shim uses on the installed versions (these tests fail when an upgrade changes one)."""

from __future__ import annotations

import ast
import contextlib
import datetime
import inspect
import sys
import types
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

from janus_train import compat
from tests.helpers import iter_library_asts

COMPAT = "janus_train/compat.py"

PUBLIC_UNDERSCORE = {("os", "_exit"), ("sys", "_getframe")}
"""``module._name`` that is public, documented API."""
PUBLIC_DUNDERS = {
    n
    for t in (object, type, types.FunctionType, types.ModuleType, types.CodeType, BaseException)
    for n in dir(t)
} | {
    "__wrapped__",
    "__file__",
    "__path__",
    "__all__",
    "__version__",
    "__dataclass_fields__",
    "__enter__",
    "__exit__",
}
"""Python's own dunders (the data model of objects, classes, functions, modules, exceptions;
``functools.wraps``, module metadata, dataclasses, the context-manager protocol); any other (``__compatible_ops__``) is a
library's private table."""
SHIMMED_NAMES = {"ds_to_universal"}
"""Public names used as a private API (a command line's ``main`` driven as a function)."""


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own_names(trees: Iterable[ast.Module]) -> set[str]:
    """Names the package defines itself: functions, classes, variables, arguments, and the
    attributes it assigns on ``self`` / ``cls``."""
    out = set()
    for tree in trees:
        for n in ast.walk(tree):
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                out.add(n.name)
            elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                out.add(n.id)
            elif isinstance(n, ast.arg):
                out.add(n.arg)
            elif (
                isinstance(n, ast.Attribute)
                and isinstance(n.ctx, ast.Store)
                and isinstance(n.value, ast.Name)
                and n.value.id in ("self", "cls")
            ):
                out.add(n.attr)
    return out


def private_uses(modules: dict[str, ast.Module]) -> list[str]:
    """Every use of another package's private API outside compat.py in ``modules`` (path ->
    parsed module): ``x._name`` and ``getattr(x, "_name")`` of a name the package does not
    define itself, a non-Python dunder, an import from a private module or of a private name, a
    shimmed public name."""
    own = _own_names(modules.values())
    out = []
    for rel, tree in modules.items():
        if rel == COMPAT:
            continue
        for n in ast.walk(tree):
            line = getattr(n, "lineno", 0)
            if isinstance(n, ast.Attribute):
                base = n.value.id if isinstance(n.value, ast.Name) else None
                if (
                    _private(n.attr)
                    and n.attr not in own
                    and (base, n.attr) not in PUBLIC_UNDERSCORE
                ):
                    out.append(f"{rel}:{line} .{n.attr}")
                elif n.attr.startswith("__") and n.attr not in PUBLIC_DUNDERS:
                    out.append(f"{rel}:{line} .{n.attr}")
            elif (
                isinstance(n, ast.Call)
                and isinstance(n.func, ast.Name)
                and n.func.id in ("getattr", "hasattr", "setattr", "delattr")
                and len(n.args) > 1
                and isinstance(n.args[1], ast.Constant)
                and isinstance(n.args[1].value, str)
                and n.args[1].value.startswith("_")
                and n.args[1].value not in own
                and n.args[1].value not in PUBLIC_DUNDERS
            ):
                out.append(f"{rel}:{line} {n.func.id}({n.args[1].value!r})")
            elif isinstance(n, ast.Import | ast.ImportFrom):
                mods = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""]
                names = [a.name for a in n.names] if isinstance(n, ast.ImportFrom) else []
                foreign = not mods[0].startswith(("janus_train", "janus_demo")) and not getattr(
                    n, "level", 0
                )
                if foreign and (
                    any(_private(p) for m in mods for p in m.split("."))
                    or any(_private(a) for a in names)
                ):
                    out.append(f"{rel}:{line} import {mods[0]} {names}")
                if any(s in m.split(".") for m in mods + names for s in SHIMMED_NAMES):
                    out.append(f"{rel}:{line} import of a shimmed name")
    return out


SCANNED = ("janus_train", "janus_demo", "benchmarks")
"""The library, the demo application and the benchmarks: none touches a private API itself."""


def test_no_private_api_outside_compat():
    modules = dict(iter_library_asts(SCANNED))
    assert {COMPAT, "benchmarks/bench_loss.py", "janus_demo/report.py"} <= set(modules)
    assert private_uses(modules) == []


@pytest.mark.parametrize(
    "src",
    [
        "def f(m):\n    m._init_weights(m)\n",
        "def f(c):\n    c._attn_implementation = 'eager'\n",
        "def f(it):\n    return getattr(it, '_workers', [])\n",
        "from deepspeed import ops\nops.__compatible_ops__['x'] = False\n",
        "from torch.fx.experimental import _config\n",
        "import torch.utils._pytree as p\n",
        "from deepspeed.checkpoint.ds_to_universal import main\n",
    ],
)
def test_the_private_api_scan_sees_every_form(src):
    assert private_uses({"m.py": ast.parse(src)})


def test_the_private_api_scan_spares_own_names_and_public_ones():
    src = (
        "import os\nclass A:\n    _cache = {}\n    def __init__(self):\n        self._n = 1\n"
        "    def _step(self):\n        return A._cache, self._n\n"
        "def g(a):\n    a._step()\n    os._exit(1)\n    return a.__dict__, type(a).__name__\n"
    )
    assert private_uses({"m.py": ast.parse(src)}) == []


# --------------------------------------------------------------------------- torch.distributed


def test_process_group_timeouts_through_c10d(tmp_path):
    """``c10d._set_pg_timeout(timeout, group)`` and ``c10d._world.pg_map`` still exist; every
    live group gets the timeout (a world of one on gloo; conftest destroys it)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    params = list(inspect.signature(c10d._set_pg_timeout).parameters)
    assert params[:2] == ["timeout", "group"]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    groups = list(c10d._world.pg_map)
    assert len(groups) >= 1
    assert compat.set_process_group_timeouts(datetime.timedelta(seconds=123)) == len(groups)


def test_process_group_timeout_guard_on_old_torch(monkeypatch):
    monkeypatch.setattr(compat, "version", lambda dist: (2, 1))
    assert compat.set_process_group_timeouts(datetime.timedelta(seconds=1)) is None


# --------------------------------------------------------------------------- DeepSpeed


def test_deepspeed_compatible_ops_table():
    from deepspeed import ops

    table = ops.__compatible_ops__
    assert isinstance(table, dict) and compat.SHM_COMM_OP in table
    before = table[compat.SHM_COMM_OP]
    try:
        assert compat.skip_deepspeed_shm_comm_build() is True
        assert table[compat.SHM_COMM_OP] is False
    finally:
        table[compat.SHM_COMM_OP] = before


def test_deepspeed_group_globals_exist_and_reset():
    import deepspeed.utils.groups as groups

    missing = [n for n in compat.DEEPSPEED_GROUP_GLOBALS if not hasattr(groups, n)]
    assert missing == []
    saved = {n: getattr(groups, n) for n in compat.DEEPSPEED_GROUP_GLOBALS}
    try:
        for n in saved:
            setattr(groups, n, object())
        compat.reset_deepspeed_groups()
        assert all(getattr(groups, n) is None for n in saved)
    finally:
        for n, v in saved.items():
            setattr(groups, n, v)


def test_ds_to_universal_takes_the_namespace_of_its_command_line(monkeypatch):
    """``main(args)`` with exactly the options its own parser defines (none missing, none
    unknown)."""
    from deepspeed.checkpoint import ds_to_universal

    assert list(inspect.signature(ds_to_universal.main).parameters) == ["args"]
    monkeypatch.setattr(sys, "argv", ["x", "--input_folder", "a", "--output_folder", "b"])
    monkeypatch.setattr("builtins.print", lambda *a, **k: None)
    theirs = vars(ds_to_universal.parse_arguments())
    ours = compat.universal_args("a", "b")
    assert set(ours) == set(theirs)


# --------------------------------------------------------------------------- DataLoader


def test_dataloader_iterator_workers_and_shutdown():
    from torch.utils.data import DataLoader

    it = iter(DataLoader(list(range(4)), num_workers=1))
    workers, shutdown = compat.dataloader_workers(it)
    assert len(workers) == 1 and workers[0].is_alive()
    assert list(inspect.signature(shutdown).parameters) == []
    shutdown()
    workers[0].join(timeout=10)
    assert not workers[0].is_alive()
    assert compat.dataloader_workers(iter(DataLoader([1, 2]))) == ([], None)


def test_workers_guard_on_a_multiprocess_iterator_without_shutdown():
    class _MultiProcessingDataLoaderIter:  # torch's name, without the private API
        pass

    with pytest.raises(compat.UpstreamChanged, match="_shutdown_workers is missing in torch"):
        compat.dataloader_workers(_MultiProcessingDataLoaderIter())


# --------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=16,
    )
    return LlamaForCausalLM(cfg)


def test_hf_initializer_honours_the_flags_and_reinit_clears_them(tiny_llama):
    from transformers.models.janus.modeling_janus import JanusPreTrainedModel

    assert list(inspect.signature(JanusPreTrainedModel._init_weights).parameters) == [
        "self",
        "module",
    ]
    head = tiny_llama.lm_head
    with torch.no_grad():
        head.weight.zero_()
    head.weight._is_hf_initialized = True
    head._is_hf_initialized = True
    tiny_llama._init_weights(head)
    assert head.weight.abs().sum() == 0  # the flag is still honoured: a plain call skips it
    compat.reinit_with_hf_initializer(tiny_llama, head)
    assert head.weight.abs().sum() > 0 and head.weight.std() > 0


def test_reinit_guard_names_the_upstream():
    with pytest.raises(compat.UpstreamChanged, match=r"_init_weights is missing in transformers"):
        compat.reinit_with_hf_initializer(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1))


def test_config_attn_implementation(tiny_llama):
    from transformers import PretrainedConfig

    prop = inspect.getattr_static(PretrainedConfig, "_attn_implementation")
    assert isinstance(prop, property) and prop.fset is not None
    cfg = type(tiny_llama.config)(**tiny_llama.config.to_dict())
    compat.set_attn_implementation(cfg, "eager")
    assert compat.get_attn_implementation(cfg) == "eager"
    with pytest.raises(compat.UpstreamChanged, match="_attn_implementation"):
        compat.set_attn_implementation(object(), "eager")


def test_generation_config_from_model_config_flag(tiny_llama):
    from transformers import GenerationConfig

    gc = GenerationConfig.from_model_config(tiny_llama.config)
    assert gc._from_model_config is True
    compat.mark_generation_config_own(gc)
    assert gc._from_model_config is False
    with pytest.raises(compat.UpstreamChanged, match="_from_model_config"):
        compat.mark_generation_config_own(object())


# --------------------------------------------------------------------------- torch.compile


def test_duck_shape_switch():
    from torch.fx.experimental import _config as fx_config

    assert fx_config.use_duck_shape is True
    with compat.without_duck_shapes():
        assert fx_config.use_duck_shape is False
    assert fx_config.use_duck_shape is True


def test_module_calls_go_through_the_compiled_call():
    """``Module.compile`` installs ``_compiled_call_impl`` and ``__call__`` runs it (checked
    without compiling: the wrapper answers before dynamo is reached)."""
    lin = torch.nn.Linear(2, 2)
    lin.compile(backend="eager")
    seen = []
    compat.wrap_compiled_call(lin, lambda fn: lambda *a, **k: seen.append(fn) or "wrapped")
    assert lin(torch.zeros(2)) == "wrapped" and len(seen) == 1
    with pytest.raises(compat.UpstreamChanged, match="_compiled_call_impl"):
        compat.wrap_compiled_call(torch.nn.Linear(2, 2), lambda fn: fn)


def test_dynamo_counters_count_a_compilation_and_a_break():
    def f(x):
        y = x + 1
        print(end="")  # a graph break
        return y * 2

    before = compat.dynamo_counters()
    assert torch.compile(f, backend="eager")(torch.ones(2)).tolist() == [4.0, 4.0]
    after = compat.dynamo_counters()
    assert after["dynamo_frames"] > before["dynamo_frames"]
    assert after["dynamo_unique_graphs"] >= before["dynamo_unique_graphs"] + 2
    assert after["graph_breaks"] > before["graph_breaks"]


def test_torch_dispatch_mode_sees_aten_ops():
    seen = []

    class Record(compat.torch_dispatch_mode()):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.ones(2)
    with Record():
        y = x.mul(3)
    assert y.tolist() == [3.0, 3.0] and seen == ["aten.mul.Tensor"]


def test_atexit_handlers_run_once_through_the_shim(tmp_path):
    """In a child process: a registered handler runs when the shim is called, and not again at
    the interpreter's exit (the private function also clears the registry)."""
    import subprocess
    import sys

    code = (
        "import atexit\n"
        "from janus_train import compat\n"
        "atexit.register(print, 'handler')\n"
        "compat.run_atexit_handlers()\n"
        "print('after')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["handler", "after"]


def test_from_pretrained_keeping_fp32(tiny_llama, tmp_path):
    """transformers' loader still reads ``_keep_in_fp32_modules_strict`` (``_get_dtype_plan``):
    the named module comes back fp32 and bitwise as stored, the rest in the asked dtype, and
    the instance has its own class again; a class without the attribute is refused."""
    from transformers import LlamaForCausalLM

    tiny_llama.save_pretrained(tmp_path)
    got = compat.from_pretrained_keeping_fp32(
        LlamaForCausalLM, tmp_path, ["lm_head"], dtype=torch.bfloat16
    )
    assert type(got) is LlamaForCausalLM
    assert torch.equal(got.lm_head.weight, tiny_llama.lm_head.weight)
    assert got.model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(compat.UpstreamChanged, match="_keep_in_fp32_modules_strict"):
        compat.from_pretrained_keeping_fp32(torch.nn.Linear, tmp_path, ["x"])


def test_zero3_linear_patch_restored_by_the_next_engine(tmp_path):
    """A ZeRO-3 engine (a world of one, in this process) leaves DeepSpeed's ``zero3_linear_wrap``
    as ``torch.nn.functional.linear`` (the premise: DeepSpeed still does this); the next
    engine of another ZeRO stage built by ``init_engine`` gets torch's own back, and
    ``restore_torch_linear`` is then a no-op."""
    import torch.nn.functional as F
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    from janus_train.trainer.distributed import init_engine, setup_distributed

    original = F.linear
    setup_distributed(60)

    def engine(zero: int):
        model = torch.nn.Linear(4, 4)
        cfg = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": zero},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        }
        return init_engine(model, cfg, list(model.parameters()))

    engine(3)
    assert F.linear is zero3_linear_wrap
    engine(2)
    assert F.linear is original
    assert compat.restore_torch_linear() is False


def test_save_without_barriers_skips_exactly_deepspeeds_save_barriers(monkeypatch):
    """The assumption behind ``compat.save_without_barriers``: DeepSpeed's ``save_checkpoint``
    synchronizes through ``dist.barrier()`` of its module's ``dist`` (``deepspeed.comm``)
    exactly ``SAVE_BARRIERS`` times; inside the block those are no-ops (the rest of ``dist``
    forwarded) and the recovery-script copy does nothing; after it all is restored. Another
    engine, or another DeepSpeed version, runs unchanged."""
    import inspect

    import deepspeed.comm
    from deepspeed.runtime import engine as ds_engine

    src = inspect.getsource(ds_engine.DeepSpeedEngine.save_checkpoint)
    assert src.count("dist.barrier()") == compat.SAVE_BARRIERS
    assert ds_engine.dist is deepspeed.comm
    engine = object.__new__(ds_engine.DeepSpeedEngine)
    torch.nn.Module.__init__(engine)  # an engine's attributes, without a model or a group
    calls = []
    monkeypatch.setattr(deepspeed.comm, "barrier", lambda *a, **k: calls.append("barrier"))
    with compat.save_without_barriers(engine) as skipped:
        assert skipped is True
        assert ds_engine.dist.barrier() is None and calls == []
        assert ds_engine.dist.get_world_size is deepspeed.comm.get_world_size
        assert engine._copy_recovery_script("/nonexistent") is None
    assert ds_engine.dist is deepspeed.comm and "_copy_recovery_script" not in vars(engine)
    ds_engine.dist.barrier()
    assert calls == ["barrier"]
    with compat.save_without_barriers(object()) as skipped:
        assert skipped is False and ds_engine.dist is deepspeed.comm
    monkeypatch.setattr(compat, "version", lambda dist: (0, 99))
    with compat.save_without_barriers(engine) as skipped:
        assert skipped is False and ds_engine.dist is deepspeed.comm


@pytest.mark.parametrize("zero", [2, 3])
def test_reuse_save_metadata_gives_deepspeeds_own_state_and_walks_once(tmp_path, monkeypatch, zero):
    """``compat.reuse_save_metadata``: a save's state dicts (captured, as the checkpoint writer
    does) equal DeepSpeed's own uncached ones, at the first save and after more optimizer
    steps (the data is read again, only the description is kept), on a model with a frozen
    parameter, a tied one and a persistent buffer; the four walks run once per engine."""
    from deepspeed.runtime import engine as ds_engine

    from janus_train.trainer.distributed import init_engine, setup_distributed

    setup_distributed(60)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
            self.frozen = torch.nn.Linear(4, 4).requires_grad_(False)
            self.b.weight = self.a.weight  # tied
            self.register_buffer("count", torch.zeros(2))

        def forward(self, x):
            return self.b(self.a(x)) + self.frozen(x)

    torch.manual_seed(0)
    net = Net()
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": zero},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "checkpoint": {"tag_validation": "Ignore"},
    }
    engine = init_engine(net, cfg, [p for p in net.parameters() if p.requires_grad])

    def train():
        engine.backward(engine(torch.randn(1, 4)).square().sum())
        engine.step()

    class Capture:
        def __init__(self, inner):
            self.inner, self.saved = inner, []

        def save(self, state_dict, path):
            self.saved.append(
                (
                    Path(path).name,
                    torch.save(state_dict, tmp_path / "x")
                    or torch.load(tmp_path / "x", weights_only=False),
                )
            )

        def __getattr__(self, name):
            return getattr(self.inner, name)

    def capture(reuse: bool):
        cap = Capture(engine.checkpoint_engine)
        engine.checkpoint_engine = cap
        try:
            with compat.save_without_barriers(engine), contextlib.ExitStack() as stack:
                if reuse:
                    assert stack.enter_context(compat.reuse_save_metadata(engine)) is True
                engine.save_checkpoint(str(tmp_path / "s"), tag="t", save_latest=False)
        finally:
            engine.checkpoint_engine = cap.inner
        return cap.saved

    def same(x, y) -> bool:
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, list | tuple):
            return len(x) == len(y) and all(same(a, b) for a, b in zip(x, y, strict=True))
        return type(x) is type(y) and (x == y or x is y or repr(x) == repr(y))

    calls = []
    for name in (*compat.SAVE_METADATA, "_get_zero_frozen_param_attributes"):
        real = getattr(ds_engine.DeepSpeedEngine, name)
        monkeypatch.setattr(
            ds_engine.DeepSpeedEngine,
            name,
            lambda self, *a, _real=real, _name=name: calls.append(_name) or _real(self, *a),
        )
    train()
    for round_ in range(2):
        plain = capture(reuse=False)
        calls.clear()
        reused = capture(reuse=True)
        walked = sorted(calls)
        assert [n for n, _ in reused] == [n for n, _ in plain]
        for (name, got), (_, want) in zip(reused, plain, strict=True):
            assert same(got, want), (round_, name)
        frozen_calls = 2 if round_ == 0 else 1  # the shapes once, the fragments (data) each time
        assert walked.count("_get_zero_frozen_param_attributes") == frozen_calls
        assert (walked.count("_get_buffer_names") == 1) == (round_ == 0)
        train()  # the weights and the optimizer's state move on
    assert not {n for n in vars(engine) if n.startswith("_get_")}  # all put back
    monkeypatch.setattr(compat, "version", lambda dist: (0, 99))
    with compat.reuse_save_metadata(engine) as reused:
        assert reused is False
