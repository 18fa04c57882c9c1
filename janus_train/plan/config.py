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

from dataclasses import dataclass

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
"""Model-FLOPs utilisation the step time assumes when ``mfu`` is unset. Not measured here
(no GPU figure in BENCHMARKS.md yet): between the 15-25% implied by DeepSeek's published
Janus training times and the 50-60% of well-tuned dense LLM training on A100 (JANUS_SPEC §6)."""


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
    """Model-FLOPs utilisation of the compute estimate (default ``DEFAULT_MFU``)."""
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
        for key in ("nodes", "gpus_per_node", "und_sample_tokens", "gen_sample_tokens"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}={getattr(self, key)}: must be > 0")
        if self.mfu is not None and not 0 < self.mfu <= 1:
            raise ValueError(f"mfu={self.mfu}: must be in (0, 1]")
        if not 0 <= self.memory_margin < 1:
            raise ValueError(f"memory_margin={self.memory_margin}: must be in [0, 1)")


ConfigStore.instance().store(name="cluster_schema", node=ClusterConfig)
