"""Typed configuration of ``janus-plan``: the cluster (nodes, GPU model, bandwidths, MFU) and the
sample shapes the step-time estimate assumes. The run itself (model, stages, DeepSpeed) is the
ordinary ``RunConfig`` tree, composed with the same Hydra overrides as ``janus-train``.

GPU defaults are stated assumptions, not measurements: memory and dense bf16 peak from the
vendors' data sheets; ``intra_node_gbps`` is the NCCL bus bandwidth NVLink reaches per GPU
(A100 NVLink3 ~230 GB/s, H100/H200 NVLink4 ~360 GB/s); ``inter_node_gbps`` assumes one NIC per
GPU at about 90% of line rate (A100 clusters: 200 Gb/s HDR -> 23 GB/s; H100/H200: 400 Gb/s NDR
-> 45 GB/s). Override them with the figures of your cluster (``nccl-tests`` busbw).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore

GIB = 1024**3


@dataclass(frozen=True)
class GpuSpec:
    memory_gib: float
    peak_bf16: float
    """Dense bf16 FLOP/s (as ``janus_train.trainer.metrics.PEAK_BF16_FLOPS``)."""
    intra_node_gbps: float
    inter_node_gbps: float


GPUS: dict[str, GpuSpec] = {
    "a100-40gb": GpuSpec(40.0, 312e12, 230.0, 23.0),
    "a100-80gb": GpuSpec(80.0, 312e12, 230.0, 23.0),
    "h100-80gb": GpuSpec(79.6, 989e12, 360.0, 45.0),
    "h200-141gb": GpuSpec(140.4, 989e12, 360.0, 45.0),
}
GPU_ALIASES = {
    "a100": "a100-80gb",
    "h100": "h100-80gb",
    "h200": "h200-141gb",
    "h200-140gb": "h200-141gb",
}

DEFAULT_MFU = 0.35
"""Utilisation the step time assumes when ``mfu`` is unset and no figure is recorded in
``mfu_file``: between the 15-25% implied by DeepSeek's published Janus training times and the
50-60% of well-tuned dense LLM training on A100 (JANUS_SPEC §6). Not measured: the only GPU
figures measured for this code so far are 0.18-0.24 (one H200, Janus-Pro-1B, BENCHMARKS.md)."""

MFU_FILE = "benchmarks/results/mfu.json"
"""Where ``benchmarks/bench_gpu.py`` records measured MFU (relative to the repository root)."""


def _gpu_family(name: str) -> str:
    name = name.lower()
    return next((f for f in ("a100", "h100", "h200") if f in name), name)


def _same_model(r: dict, model: str, layers: int, hidden: int) -> bool:
    if model and r.get("model") == model:
        return True
    return bool(layers and hidden and r.get("layers") == layers and r.get("hidden") == hidden)


def measured_mfu(
    path: str | Path, gpu: str, model: str = "", layers: int = 0, hidden: int = 0
) -> tuple[float, str] | None:
    """The newest record of ``path`` for ``gpu``'s family (a100 / h100 / h200) as a utilisation
    of the executed FLOPs: its ``mfu`` (model FLOPs / (time x peak)) times the recomputation
    its checkpointing added, so it applies to any checkpointing. Of the family's records, the
    newest of the planned model's is taken (its ``model``, the experiment name, equal to
    ``model``, or its ``layers`` and ``hidden`` equal to the LLM's), else the family's newest
    whatever it measured; the source line says which. None when the file or a matching record
    is absent.

    Format (a JSON object ``{"records": [...]}`` or a list of records), one record per run::

        {"date": "2026-12-05T13:00:00Z", "gpu": "NVIDIA A100-SXM4-40GB", "mfu": 0.24,
         "model": "janus_pro_1b", "layers": 24, "checkpointing": "every 4", "commit": "abc1234"}

    ``checkpointing``: ``none`` | ``full`` | ``every k`` (of ``layers`` decoder layers)."""
    p = Path(path)
    if not p.is_file():
        return None
    raw = json.loads(p.read_text())
    recs = raw.get("records", []) if isinstance(raw, dict) else raw
    fam = _gpu_family(gpu)
    mine = [r for r in recs if _gpu_family(str(r.get("gpu", ""))) == fam and r.get("mfu")]
    if not mine:
        return None
    same = [r for r in mine if _same_model(r, model, layers, hidden)]
    r = max(same or mine, key=lambda r: str(r.get("date", "")))
    planned = model or (f"{layers} layers x {hidden}" if layers and hidden else "")
    which = (
        f"; the newest of {planned}"
        if same
        else f"; none of {planned}: the {fam} family's newest"
        if planned
        else ""
    )
    layers = int(r.get("layers") or 1)
    ck = str(r.get("checkpointing", "none"))
    every = 0 if ck == "none" else (1 if ck == "full" else int(ck.split()[-1]))
    redo = -(-layers // every) / (3 * layers) if every else 0.0
    util = float(r["mfu"]) * (1 + redo)
    return util, (
        f"measured {float(r['mfu']):.3f} MFU on {r.get('gpu')} ({r.get('model', '?')}, "
        f"checkpointing {ck}, {r.get('date', '?')}, {p}{which})"
    )


def append_mfu_record(path: str | Path, record: dict) -> int:
    """Append ``record`` (the format :func:`measured_mfu` reads) to ``path``'s ``records``,
    creating the file; never rewrites what is there: a file that is not that format is
    refused (``ValueError``, one line naming it) and left as it is. The new file replaces
    the old one atomically, under an exclusive lock beside it (concurrent benchmark runs).
    Returns the number of records now in the file."""
    import fcntl
    import os

    p = Path(path)
    missing = [k for k in ("date", "gpu", "mfu", "layers", "checkpointing") if k not in record]
    if missing or not (isinstance(record["mfu"], float | int) and 0 < record["mfu"] <= 1):
        raise ValueError(f"{p}: record without {missing or 'an mfu in (0, 1]'}: {record}")
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p.with_name(p.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        raw: object = {"records": []}
        if p.exists():
            try:
                raw = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: not JSON ({e}); left unchanged") from None
        recs = raw.get("records") if isinstance(raw, dict) else raw
        if not isinstance(recs, list):
            raise ValueError(f'{p}: not {{"records": [...]}} or a list; left unchanged')
        recs.append(record)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(raw, indent=1) + "\n")
        os.replace(tmp, p)
    return len(recs)


@dataclass
class ClusterConfig:
    """What ``janus-plan`` plans for: ``nodes=32 gpus_per_node=8 gpu=a100-80gb`` on its command
    line, beside the usual ``experiment=... stage=... deepspeed=...`` overrides."""

    nodes: int = 1
    """Nodes available; a stage may be planned on fewer (``search_nodes``)."""
    gpus_per_node: int = 8
    """GPUs per node (world size = nodes x gpus_per_node)."""
    gpu: str = "a100-80gb"
    """``a100-40gb`` | ``a100-80gb`` | ``h100-80gb`` | ``h200-141gb`` (or a100 / h100 / h200)."""
    gpu_memory_gib: float | None = None
    """Override the GPU model's memory."""
    mfu: float | None = None
    """Utilisation of the executed FLOPs (model FLOPs + recomputation) / peak; unset: the newest
    figure in ``mfu_file`` for this GPU, else ``DEFAULT_MFU`` (the output says which)."""
    mfu_file: str = MFU_FILE
    """Measured MFU records (``benchmarks/bench_gpu.py``), relative to the repository root."""
    intra_node_gbps: float | None = None
    """GB/s per GPU inside a node (collective bus bandwidth); default per GPU model."""
    inter_node_gbps: float | None = None
    """GB/s per GPU across nodes; default per GPU model."""
    memory_margin: float = 0.1
    """Fraction of GPU memory kept free (allocator fragmentation, spikes)."""
    memory_reserved_gib: float = 2.5
    """GPU memory taken before training (CUDA context, NCCL buffers)."""
    search_nodes: bool = True
    """Try every node count up to ``nodes`` and recommend one; false: exactly ``nodes``."""
    und_sample_tokens: int = 700
    """Tokens of an understanding sample (576 image tokens + text) for the step time."""
    gen_sample_tokens: int = 650
    """Tokens of a generation sample (prompt + 576 codes); text samples fill data.seq_len."""
    und_tokens: str = ""
    """Understanding sample length ``lo-hi`` (uniform; tokens incl. image) for the busiest-rank
    simulation of every understanding source (overrides a recipe's ``sample_tokens``); empty:
    the recipe's declaration, else the papers' mix
    (``janus_train.plan.simulate.default_lengths``)."""
    gen_tokens: str = ""
    """Generation sample length ``lo-hi``; empty: the recipe's, else the papers' mix."""
    text_tokens: str = ""
    """Text sample (document) length ``lo-hi``; empty: the recipe's, else the papers' mix,
    100-4096 tokens."""
    text_chunk: int = 0
    """Also report the stage with text documents chunked to at most this many tokens (a recipe
    change, shown beside the plan, never instead of it); 0: do not."""
    search: bool = True
    """Search activation checkpointing, ``train.tokens_per_micro`` and
    ``deepspeed.reduce_fp32`` beside the preset and node count; false: as configured."""
    search_lossy: bool = False
    """Let the search also turn on ZeRO++ quantization under ZeRO-3
    (``deepspeed.quantized_weights``: int8 parameter gathers; ``quantized_gradients``: int4
    gradient all-to-all). Lossy numerics the papers did not use, never trained by this
    project's tests or GPU sessions; off: kept as the overrides set them."""

    @property
    def mfu_source(self) -> tuple[float, str]:
        """(utilisation, where it comes from), whatever model a record measured."""
        return self.mfu_for()

    def mfu_for(self, model: str = "", layers: int = 0, hidden: int = 0) -> tuple[float, str]:
        """(utilisation, where it comes from) for the planned model (experiment name, LLM
        layers and width): :func:`measured_mfu` prefers that model's records."""
        if self.mfu is not None:
            return self.mfu, "mfu= on the command line"
        root = Path(__file__).resolve().parents[2]
        path = Path(self.mfu_file)
        found = measured_mfu(
            path if path.is_absolute() else root / path, self.gpu, model, layers, hidden
        )
        if found:
            return found
        return DEFAULT_MFU, f"default: no figure for {self.gpu} in {self.mfu_file}"

    def lengths(self, seq_len: int, image_tokens: int) -> tuple[tuple[str, int, int], ...]:
        from janus_train.plan.simulate import default_lengths

        out = default_lengths(seq_len, image_tokens)
        for task, spec in (
            ("und", self.und_tokens),
            ("gen", self.gen_tokens),
            ("text", self.text_tokens),
        ):
            if spec:
                lo, _, hi = spec.partition("-")
                try:
                    out[task] = (int(lo), int(hi or lo))
                except ValueError:
                    raise ValueError(f"{task}_tokens={spec!r}: expected lo-hi") from None
                if not 0 < out[task][0] <= out[task][1]:
                    raise ValueError(f"{task}_tokens={spec!r}: expected 0 < lo <= hi")
        return tuple((t, *out[t]) for t in ("und", "text", "gen"))

    @property
    def lengths_set(self) -> frozenset[str]:
        """Tasks whose lengths the command line sets (they override a recipe's declaration)."""
        given = {"und": self.und_tokens, "text": self.text_tokens, "gen": self.gen_tokens}
        return frozenset(t for t, v in given.items() if v)

    @property
    def spec(self) -> GpuSpec:
        name = GPU_ALIASES.get(self.gpu.lower(), self.gpu.lower())
        if name not in GPUS:
            raise ValueError(f"gpu={self.gpu!r}: one of {sorted(GPUS)}")
        s = GPUS[name]
        return GpuSpec(
            self.gpu_memory_gib or s.memory_gib,
            s.peak_bf16,
            self.intra_node_gbps or s.intra_node_gbps,
            self.inter_node_gbps or s.inter_node_gbps,
        )

    @property
    def usable_bytes(self) -> float:
        return (self.spec.memory_gib * (1 - self.memory_margin) - self.memory_reserved_gib) * GIB

    def validate(self) -> None:
        self.spec  # noqa: B018  (raises on an unknown GPU)
        for key, value in [
            ("nodes", self.nodes),
            ("gpus_per_node", self.gpus_per_node),
            ("und_sample_tokens", self.und_sample_tokens),
            ("gen_sample_tokens", self.gen_sample_tokens),
        ]:
            if value <= 0:
                raise ValueError(f"{key}={value}: must be > 0")
        self.lengths(4096, 576)
        if self.text_chunk < 0:
            raise ValueError(f"text_chunk={self.text_chunk}: must be >= 0")
        if self.mfu is not None and not 0 < self.mfu <= 1:
            raise ValueError(f"mfu={self.mfu}: must be in (0, 1]")
        if not 0 <= self.memory_margin < 1:
            raise ValueError(f"memory_margin={self.memory_margin}: must be in [0, 1)")


ConfigStore.instance().store(name="cluster_schema", node=ClusterConfig)
