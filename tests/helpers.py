"""Helpers shared by several test files (batches written by hand after the contract in
``janus_train/batch.py``, the freeze groups' parameter prefixes): test files import from here,
never from one another."""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from janus_train.batch import IMAGE_KEYS, REQUIRED_KEYS
from janus_train.config import compose, to_run_config
from janus_train.model import JanusTrainModel, resolve_special_tokens

IGN = -100
ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("janus_train", "janus_demo")
"""The library and the demo application: what the structure checks scan."""


def token_ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def text_sample(tok, st, text="there is a red circle on the left"):
    ids = [st.bos, *token_ids(tok, text), st.eos]
    return {"ids": ids, "labels": [IGN, *ids[1:]], "codes": [IGN] * len(ids), "task": 0}


def und_sample(tok, st, n_img, q="what color is the circle", a="red"):
    prompt = [st.bos, *token_ids(tok, q), st.boi, *([st.image] * n_img), st.eoi]
    ans = [*token_ids(tok, a), st.eos]
    ids = prompt + ans
    return {"ids": ids, "labels": [IGN] * len(prompt) + ans, "codes": [IGN] * len(ids), "task": 1}


def gen_sample(tok, st, codes, prompt="a blue square at the top"):
    head = [st.bos, *token_ids(tok, prompt), st.boi]
    ids = head + [st.pad] * len(codes)
    return {
        "ids": ids,
        "labels": [IGN] * len(ids),
        "codes": [IGN] * len(head) + list(codes),
        "task": 2,
    }


def collate(samples, pad_id, images=None):
    """Right-padded batch following the contract in janus_train/batch.py, written out by hand
    (independent of janus_train.batch.collate)."""
    T = max(len(s["ids"]) for s in samples)
    B = len(samples)
    out = {
        "input_ids": torch.full((B, T), pad_id),
        "attention_mask": torch.zeros(B, T, dtype=torch.long),
        "position_ids": torch.zeros(B, T, dtype=torch.long),
        "labels": torch.full((B, T), IGN),
        "image_codes": torch.full((B, T), IGN),
        "task_ids": torch.full((B, T), -1),
    }
    for i, s in enumerate(samples):
        n = len(s["ids"])
        out["input_ids"][i, :n] = torch.tensor(s["ids"])
        out["attention_mask"][i, :n] = 1
        out["position_ids"][i, :n] = torch.arange(n)
        out["labels"][i, :n] = torch.tensor(s["labels"])
        out["image_codes"][i, :n] = torch.tensor(s["codes"])
        out["task_ids"][i, :n] = s["task"]
    if images is not None:
        out["pixel_values"] = images
    return out


def check_packed_row_equals_samples_alone(setup) -> None:
    """Two samples packed in one row (position_ids restart) give each sample's own loss:
    attention does not cross the sample boundary. `setup`: (model in eval mode, tokenizer,
    special tokens)."""
    model, tok, st = setup
    n_img = model.config.vision_config.num_image_tokens
    size = model.config.vision_config.image_size
    torch.manual_seed(5)
    img = torch.randn(1, 3, size, size)
    codes = torch.randint(0, model.config.vq_config.num_embeddings, (n_img,)).tolist()
    parts = [text_sample(tok, st), und_sample(tok, st, n_img), gen_sample(tok, st, codes)]
    packed = {k: sum((p[k] for p in parts), []) for k in ("ids", "labels", "codes")}
    batch = collate([{**packed, "task": 0}], st.pad, img)
    batch["task_ids"][0] = torch.tensor(sum(([p["task"]] * len(p["ids"]) for p in parts), []))
    batch["position_ids"][0] = torch.cat([torch.arange(len(p["ids"])) for p in parts])
    # a second, shorter row so the packed row's partner is right-padded
    short = collate([text_sample(tok, st, "one star")], st.pad)
    T = batch["input_ids"].shape[1]
    for k, fill in (
        ("input_ids", st.pad),
        ("attention_mask", 0),
        ("position_ids", 0),
        ("labels", IGN),
        ("image_codes", IGN),
        ("task_ids", -1),
    ):
        row = torch.full((1, T), fill)
        row[0, : short[k].shape[1]] = short[k][0]
        batch[k] = torch.cat([batch[k], row])
    tm = JanusTrainModel(model)
    with torch.no_grad():
        got = tm(batch)
        alone = [tm(collate([p], st.pad, img if p["task"] == 1 else None)) for p in parts]
        alone.append(tm(short))
    torch.testing.assert_close(
        got["loss_sum"], sum(a["loss_sum"] for a in alone), rtol=1e-5, atol=1e-5
    )
    # and the same row without position restarts (one long sample) gives a different loss
    batch["position_ids"][0] = torch.arange(T)
    with torch.no_grad():
        unpacked = tm(batch)
    assert not torch.allclose(unpacked["loss_sum"], got["loss_sum"])


# Parameter-name prefixes of the freeze groups, typed out independently of janus_train.model.freeze.
PREFIXES = {
    "und_encoder": ("model.vision_model.",),
    "und_adaptor": ("model.aligner.",),
    "vq": ("model.vqmodel.",),
    "gen_embeddings": ("model.generation_embeddings.",),
    "gen_adaptor": ("model.generation_aligner.",),
    "gen_head": ("model.generation_head.",),
    "llm": ("model.language_model.", "lm_head."),
}


def group_of(name: str) -> str:
    (group,) = [g for g, ps in PREFIXES.items() if name.startswith(ps)]
    return group


def mixed_batch(model, tok):
    st = resolve_special_tokens(tok)
    n_img = model.config.vision_config.num_image_tokens
    size = model.config.vision_config.image_size
    torch.manual_seed(0)
    codes = torch.randint(0, model.config.vq_config.num_embeddings, (n_img,)).tolist()
    samples = [text_sample(tok, st), und_sample(tok, st, n_img), gen_sample(tok, st, codes)]
    return collate(samples, st.pad, torch.randn(1, 3, size, size))


# Loader runs on recipes written in tmp_path (test_data_loader, test_data_reshard).
def make_run(stage: str, recipe: Path | str | None, gbs: int, **data):
    """The tiny experiment's ``stage`` on ``recipe`` (None: the stage's own)."""
    run = to_run_config(
        compose(
            ["experiment=tiny", f"stage={stage}", f"experiment.{stage}.global_batch_size={gbs}"]
        )
    )
    if recipe is not None:
        run.hparams.data_recipe = str(recipe)
    for k, v in data.items():
        setattr(run.data, k, v)
    return run


def recipe_file(tmp_path: Path, sources: list[dict]) -> Path:
    import yaml

    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump({"name": "t", "sources": sources}))
    return p


def concat_batches(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Micro-batches of equal length -> one batch (images keep row-major order): the synthetic
    loader's micro-steps as the single batch a one-process reference computes on."""
    out = {k: torch.cat([b[k] for b in batches]) for k in REQUIRED_KEYS}
    for k in IMAGE_KEYS:
        imgs = [b[k] for b in batches if k in b]
        if imgs:
            out[k] = torch.cat(imgs)
    return out


class ThreadExchange:
    """All-gather of Python objects among ``n`` ranks running as threads (the loaders'
    ``exchange``); a rank that never arrives raises ``BrokenBarrierError`` after 60 s instead of
    hanging the suite."""

    def __init__(self, n: int):
        import threading

        self.slots = [None] * n
        self.barrier = threading.Barrier(n, timeout=60)

    def for_rank(self, r: int):
        def exchange(obj):
            self.slots[r] = obj
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()
            return out

        return exchange


def stage_context(run, proc):
    """The stage's BuildContext, as ``train.build_loader`` builds it."""
    from janus_train.config import resolve_stage

    return resolve_stage(run).context(proc, run.model, run.data)


def stage_loader(
    run,
    proc,
    *,
    rank: int = 0,
    world_size: int = 1,
    micro_batch_size: int = 1,
    tokens_per_micro: int = 0,
    exchange=None,
):
    """``run``'s stage resolved at ``world_size`` ranks (its recipe loaded and checked once,
    ``micro_batch_size`` fixed micro-batches or ``tokens_per_micro`` token budgets) and rank
    ``rank``'s data loader of it, as ``train.build_loader`` builds it."""
    from janus_train.config import resolve_stage
    from janus_train.data.loader import build_train_loader

    run.train.micro_batch_size, run.train.tokens_per_micro = micro_batch_size, tokens_per_micro
    spec = resolve_stage(run, world_size, with_recipe=True, stat_shards=rank == 0)
    ctx = stage_context(run, proc)
    return build_train_loader(
        spec.recipe, ctx, run.data, spec.ratio, spec.plan, rank=rank, exchange=exchange
    )


def synthetic_loader(run, proc, *, rank: int = 0, world_size: int = 1, plan=None, **kw):
    """Rank ``rank``'s synthetic loader of ``run``'s stage at ``world_size`` ranks (``plan``:
    another batch plan), as ``train.build_loader`` builds it."""
    from janus_train.config import resolve_stage
    from janus_train.data.synthetic_loader import SyntheticStepLoader

    spec = resolve_stage(run, world_size)
    kw = {
        "seq_len": run.train.synthetic_seq_len,
        "length_mix": run.train.synthetic_length_mix,
        "seed": run.data.seed,
        **kw,
    }
    return SyntheticStepLoader(proc, run.model, plan or spec.plan, spec.ratio, rank=rank, **kw)


def stage_shape_of(run):
    """``janus-plan``'s StageShape of ``run``'s stage."""
    from janus_train.config import resolve_stage
    from janus_train.plan.estimate import stage_shape

    return stage_shape(
        resolve_stage(run),
        run.model,
        run.data,
        micro_batch_size=run.train.micro_batch_size,
        precision=run.deepspeed.precision,
    )


def thread_token_loaders(run, proc, world: int, tokens_per_micro: int, states=None):
    """``world`` token-budget loaders, one per rank, sharing a :class:`ThreadExchange`; ``states``
    (one per rank) restored concurrently, since ``load_state_dict`` is a collective."""
    from concurrent.futures import ThreadPoolExecutor

    ex = ThreadExchange(world)
    loaders = [
        stage_loader(
            run,
            proc,
            rank=r,
            world_size=world,
            tokens_per_micro=tokens_per_micro,
            exchange=ex.for_rank(r),
        )
        for r in range(world)
    ]
    if states:
        with ThreadPoolExecutor(world) as pool:
            list(pool.map(lambda pair: pair[0].load_state_dict(pair[1]), zip(loaders, states)))
    return loaders


def reference_codes(vq, px: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VQ-code oracle: (cosine argmax in float64 over the latents HF's quantizer receives
    (captured by a hook on its input) against the codebook as stored, HF's own codes)."""
    seen = []
    h = vq.quantize.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        with torch.no_grad():
            hf = vq.encode(px).image_tokens.view(px.shape[0], -1)
    finally:
        h.remove()
    z = seen[0].double().permute(0, 2, 3, 1).reshape(-1, seen[0].shape[1])
    e = vq.quantize.embedding.weight.detach().double()
    cos = (z @ e.t()) / z.norm(dim=1, keepdim=True) / e.norm(dim=1)
    return cos.argmax(1).view(px.shape[0], -1), hf


def mutable_parts(obj, where: str = "spec") -> list[str]:
    """Every place inside ``obj`` that could be changed in place: a list, dict, set or other
    object, a dataclass that is not frozen (a walk of every field, item and value)."""
    import dataclasses
    from types import MappingProxyType

    from janus_train.batch import FrozenMap

    if obj is None or isinstance(obj, str | int | float | bool):
        return []
    if isinstance(obj, tuple):
        return [p for i, x in enumerate(obj) for p in mutable_parts(x, f"{where}[{i}]")]
    if isinstance(obj, MappingProxyType | FrozenMap):
        return [p for k, v in obj.items() for p in mutable_parts(v, f"{where}[{k!r}]")]
    if dataclasses.is_dataclass(obj) and obj.__dataclass_params__.frozen:
        return [
            p
            for f in dataclasses.fields(obj)
            for p in mutable_parts(getattr(obj, f.name), f"{where}.{f.name}")
        ]
    return [f"{where}: {type(obj).__name__}"]


def library_files(pkgs: Sequence[str] = LIBRARY, root: Path = ROOT) -> list[Path]:
    """Every ``*.py`` under the packages ``pkgs`` of ``root``, sorted."""
    return sorted(f for pkg in pkgs for f in (root / pkg).rglob("*.py"))


@functools.cache
def _parsed(path: Path, mtime_ns: int, size: int) -> ast.Module:
    # the file's mtime and size are in the key: an edited file is parsed again
    return ast.parse(path.read_text(), str(path))


def parse_module(path: Path) -> ast.Module:
    """``path`` parsed, once per version of the file (the structure checks share the trees;
    read-only)."""
    st = path.stat()
    return _parsed(path, st.st_mtime_ns, st.st_size)


def iter_library_asts(
    pkgs: Sequence[str] = LIBRARY, root: Path = ROOT
) -> Iterator[tuple[str, ast.Module]]:
    """(path relative to ``root``, as ``janus_train/batch.py``; its parsed module) of every
    module of ``pkgs``, sorted: the walk the structure checks (test_structure, test_compat) run
    over the library."""
    for f in library_files(pkgs, root):
        yield f.relative_to(root).as_posix(), parse_module(f)
