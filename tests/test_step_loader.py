"""Every step loader of ``janus_train.data`` implements the declared interface
(``janus_train.step_loader.StepLoader``): an instance passes the runtime check and every method
has the Protocol's exact signature (names, kinds, defaults, annotations), so an interface that
drifts fails here; the trainer calls nothing else on a loader."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import janus_train.data
from janus_train.data.synthetic import caption_records
from janus_train.data.tario import write_tar
from janus_train.step_loader import StepLoader
from tests.helpers import make_run, mutable_parts, recipe_file

ROOT = Path(__file__).resolve().parents[1]
MEMBERS = sorted(n for n, v in vars(StepLoader).items() if callable(v) and n[0] != "_")


def _loader_classes() -> dict[str, type]:
    """Every class defined in a module of ``janus_train.data`` with a ``next_step``."""
    found = {}
    for m in pkgutil.iter_modules(janus_train.data.__path__, "janus_train.data."):
        mod = importlib.import_module(m.name)
        for name, cls in vars(mod).items():
            if inspect.isclass(cls) and cls.__module__ == m.name and hasattr(cls, "next_step"):
                found[name] = cls
    return found


def _drift(cls: type) -> list[str]:
    """How ``cls`` departs from the Protocol's methods (missing or another signature)."""
    bad = []
    for name in MEMBERS:
        impl = getattr(cls, name, None)
        if impl is None:
            bad.append(f"{cls.__name__}.{name} missing")
            continue
        want, got = inspect.signature(getattr(StepLoader, name)), inspect.signature(impl)
        if got != want:
            bad.append(f"{cls.__name__}.{name}{got} != {want}")
    return bad


def _trainer_calls() -> set[str]:
    """Attributes the training loop and its state read on a ``loader``."""
    files = [ROOT / "janus_train/train.py", *sorted((ROOT / "janus_train/trainer").glob("*.py"))]
    return {
        n.attr
        for f in files
        for n in ast.walk(ast.parse(f.read_text()))
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "loader"
    }


def test_the_protocol_is_what_the_trainer_calls():
    assert MEMBERS == [
        "can_resume_exactly",
        "close",
        "counters",
        "finish",
        "load_resharded",
        "load_state_dict",
        "next_step",
        "state_dict",
    ]
    used = _trainer_calls()
    assert {"next_step", "state_dict", "load_resharded"} <= used  # the scan sees the calls
    assert used <= set(MEMBERS), f"the trainer calls {sorted(used - set(MEMBERS))} off-Protocol"


def _caption_recipe(tmp_path):
    """One caption shard of 4 records, read as an understanding and a generation source."""
    write_tar(tmp_path / "cap-0.tar", caption_records(0, 4))
    shards = str(tmp_path / "cap-0.tar")
    return recipe_file(
        tmp_path,
        [
            {"name": t, "task": t, "format": "caption", "shards": shards}
            for t in ("understanding", "generation")
        ],
    )


def test_every_loader_class_implements_the_protocol(tiny_model_and_processor, tmp_path):
    from tests.helpers import stage_loader, synthetic_loader

    classes = _loader_classes()
    assert set(classes) == {"FixedStepLoader", "TokenStepLoader", "SyntheticStepLoader"}
    for cls in classes.values():
        assert _drift(cls) == []
    proc = tiny_model_and_processor[1]
    rec = _caption_recipe(tmp_path)
    run = make_run("stage1", rec, 2, num_workers=0, seq_len=128)
    made = [
        stage_loader(run, proc, micro_batch_size=1),
        stage_loader(run, proc, tokens_per_micro=128),
        synthetic_loader(run, proc),
    ]
    assert {type(x).__name__ for x in made} == set(classes)
    for loader in made:
        assert isinstance(loader, StepLoader)
        assert len(loader.next_step()) >= 1  # a working instance, not just a name check
        loader.close()


def test_loader_args_are_immutable_all_the_way_down(tiny_model_and_processor, tmp_path):
    """The WebDataset loader's shared ``LoaderArgs`` (step loader, worker steps, workers): no
    field, no step count, no piece of the build context can change once built; a pickle
    round-trip (a spawned worker's copy) gives the same values, as read-only."""
    import dataclasses
    import pickle

    from tests.helpers import stage_loader

    rec = _caption_recipe(tmp_path)
    run = make_run("stage1", rec, 2, num_workers=0, seq_len=128)  # und:gen 1:1 of 2
    args = stage_loader(run, tiny_model_and_processor[1], micro_batch_size=1).args
    attempts = {
        "counts item": lambda a: a.counts.__setitem__("und", 9),
        "counts": lambda a: setattr(a, "counts", {}),
        "context": lambda a: setattr(a.ctx, "seq_len", 9),
        "recipe": lambda a: setattr(a.recipe.sources[0], "weight", 3.0),
    }
    for a in (args, pickle.loads(pickle.dumps(args))):
        assert dict(a.counts) == {"und": 1, "text": 0, "gen": 1} and a.ctx.seq_len == 128
        for what, attempt in attempts.items():
            with pytest.raises((TypeError, AttributeError)):
                attempt(a)
                pytest.fail(f"{what} changed")
        assert dict(a.counts) == {"und": 1, "text": 0, "gen": 1} and a.ctx.seq_len == 128
        # what is left mutable: the typed config's own (not frozen) class and the tokenizer
        assert sorted(mutable_parts(a, "args")) == [
            "args.ctx.tokenizer: " + type(a.ctx.tokenizer).__name__,
            "args.dcfg: DataConfig",
        ]
    counts = {"und": 1, "text": 1, "gen": 0}  # a dict given is copied
    other = dataclasses.replace(args, counts=counts)
    counts["und"] = 7
    assert other.counts["und"] == 1


def test_the_check_sees_a_drifted_or_missing_method():
    from janus_train.data.step_loaders import FixedStepLoader

    class Drifted(FixedStepLoader):
        def load_state_dict(self, sd: dict, strict: bool = True) -> None:
            pass

        def counters(self) -> dict:
            return {}

    drift = _drift(Drifted)  # a narrower return annotation, an extra parameter
    assert [d.split("(")[0] for d in drift] == ["Drifted.counters", "Drifted.load_state_dict"]
    assert "strict" in drift[1]

    class NoClose:
        pass

    for name in MEMBERS:
        if name != "close":
            setattr(NoClose, name, getattr(FixedStepLoader, name))
    assert _drift(NoClose) == ["NoClose.close missing"]
    assert not isinstance(NoClose(), StepLoader)
