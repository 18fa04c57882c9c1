"""What a save takes on the training loop's thread: DeepSpeed's file writes captured as host
snapshots (:class:`Capture`, :func:`snapshot`; frozen parameters kept live,
:func:`frozen_storage`), and the files a rank writes outside DeepSpeed's checkpoint engine
(:class:`WrittenHere`). Everything else of a save (writes, fsyncs, manifest, commit) runs from
these in :mod:`janus_train.trainer.ckpt_save`.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class WrittenHere:
    """The files under ``root`` that this process creates, opens for writing or renames into
    place while the ``with`` block runs, seen through Python's audit events (PEP 578: every
    ``open``/``os.open``, ``shutil``'s copies included, ``os.rename``/``os.replace`` and
    ``os.link``): what DeepSpeed writes outside its checkpoint engine (e.g. NVMe offload
    copies), so that the rank that wrote a file is the one that fsyncs it (:attr:`files`,
    relative to ``root``). Not seen: a C++ writer (``torch.save`` to a path name opens the
    file in C++); such a file is synced by rank 0's commit, with a warning naming it.
    The hook is installed once per process (audit hooks cannot be removed) and is idle outside
    the block. Dynamo never traces it: the audit events of code run under a compiled region
    (``model.compile``) would otherwise hand the hook's frame to dynamo, one more compiled
    frame (and guards on the event name) in every later compilation of the process."""

    _active: WrittenHere | None = None
    _installed = False

    def __init__(self, root: Path) -> None:
        self.root = os.path.abspath(root) + os.sep
        self._seen: dict[str, None] = {}  # insertion-ordered set

    def __enter__(self) -> WrittenHere:
        if not WrittenHere._installed:
            sys.addaudithook(torch.compiler.disable(WrittenHere._hook))
            WrittenHere._installed = True
        WrittenHere._active = self
        return self

    def __exit__(self, *exc) -> None:
        WrittenHere._active = None

    @property
    def files(self) -> list[str]:
        return [r for r in self._seen if os.path.isfile(os.path.join(self.root, r))]

    def _add(self, path) -> None:
        if isinstance(path, int):  # open() of a file descriptor: opened (and seen) before
            return
        full = os.path.abspath(os.fsdecode(path))
        if full.startswith(self.root):
            self._seen[full[len(self.root) :]] = None

    @staticmethod
    def _hook(event: str, args: tuple) -> None:
        me = WrittenHere._active
        if me is None or event not in ("open", "os.rename", "os.link"):
            return
        try:  # an exception here would fail the audited call itself
            if event != "open":  # the new name: a rename (os.replace too) or a hard link
                me._add(args[1])
                return
            path, mode, flags = args
            if (flags or 0) & _WRITE_FLAGS or (mode and any(c in mode for c in "wax+")):
                me._add(path)
        except Exception:  # noqa: BLE001,S110  # a path it cannot read is not ours
            pass


_LEAVES = frozenset(
    {int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.Size, torch.device}
)
"""Immutable types kept as they are (exact types: a subclass may add mutable state)."""


def snapshot(obj, _memo: dict | None = None, frozen: frozenset[int] = frozenset()):
    """A deep copy of ``obj`` with every tensor copied to host memory (once, however often it is
    referenced): what a write started now serializes, whatever later optimizer steps do to the
    live tensors. On the loop's thread at every save, so it is lean: containers are rebuilt
    directly (``copy.deepcopy`` is several times slower on a state dict), a tuple or named tuple
    of immutable leaves (an RNG state: 625 ints) is kept as it is, a dataclass of them (ZeRO's
    fragment addresses) copied shallowly; any other object is deep-copied. ``frozen``: where
    parameters that no step changes live on the host (:func:`frozen_storage`): a host tensor
    starting there is kept as it is (written from the live tensor)."""
    memo = {} if _memo is None else _memo
    cls = type(obj)
    if cls in _LEAVES:
        return obj
    if isinstance(obj, torch.Tensor):
        got = memo.get(id(obj))
        if got is None:
            keep = obj.is_cpu and obj.data_ptr() in frozen
            got = memo[id(obj)] = obj.detach() if keep else obj.detach().to("cpu", copy=True)
        return got
    if isinstance(obj, dict):
        if cls is dict:
            return {k: snapshot(v, memo, frozen) for k, v in obj.items()}
        out = copy.copy(obj)  # the same class, with its attributes (a state dict's _metadata)
        for k, v in obj.items():
            out[k] = snapshot(v, memo, frozen)
        return out
    if cls is list:
        return [snapshot(v, memo, frozen) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "__dict__"):  # a tuple, a named tuple
        if all(type(v) in _LEAVES for v in obj):
            return obj  # immutable all through
        if cls is tuple:
            return tuple(snapshot(v, memo, frozen) for v in obj)
    fields = getattr(obj, "__dict__", None)
    if (
        hasattr(cls, "__dataclass_fields__")
        and type(fields) is dict
        and all(type(v) in _LEAVES for v in fields.values())
    ):  # a record of immutable values (ZeRO's fragment addresses): a shallow copy is whole
        return copy.copy(obj)
    return copy.deepcopy(obj)


def frozen_storage(engine) -> frozenset[int]:
    """Where the engine's frozen parameters (``requires_grad`` off, whole on this rank) start
    in host memory: no optimizer step changes them, so a save writes them from the live
    tensors instead of copying them on the loop's thread (both as the model's weights and as
    DeepSpeed's frozen fragments; half the tensors of the tiny stage-2 checkpoint, whose
    vision encoder is frozen). Host (CPU) parameters only: on a GPU each is still copied to
    the host at the save. Read at each save (a parameter whose storage was replaced since is
    followed); an address a trainable parameter also starts at is never taken as frozen."""
    params = getattr(engine, "param_names", None)  # DeepSpeed's {parameter: name}, the module's
    if params is None:
        return frozenset()
    frozen, trainable = set(), set()
    for p in params:
        if p.is_cpu and p.numel():
            (trainable if p.requires_grad else frozen).add(p.data_ptr())
    return frozenset(frozen - trainable)


class Capture:
    """Stands in for DeepSpeed's checkpoint engine during ``engine.save_checkpoint``: ``save``
    keeps a host snapshot of the state dict and the path instead of writing it (step 2a);
    everything else is the engine's own. ``frozen``: see :func:`snapshot`."""

    def __init__(self, inner, frozen: frozenset[int] = frozenset()) -> None:
        self.inner, self.frozen = inner, frozen
        self.writes: list[tuple[Callable, object, str]] = []

    def save(self, state_dict, path: str) -> None:
        self.writes.append((self.inner.save, snapshot(state_dict, frozen=self.frozen), str(path)))

    def preserves_storage_sharing(self) -> bool:
        return False  # the snapshot already copies every tensor by itself

    def __getattr__(self, name: str):
        return getattr(self.inner, name)
