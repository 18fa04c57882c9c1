"""Activation checkpointing per model from ``janus-plan``'s memory estimate (no GPU needed).

    python benchmarks/ckpt_memory.py                 # markdown table for BENCHMARKS.md
    python benchmarks/ckpt_memory.py --gpu h100-80gb

For each shipped model and stage, at the deployment its sbatch file plans (``#PLAN`` lines of
``launch/slurm/<experiment>.sbatch``; Janus 1.3B, which has none, at Janus-Pro-1B's: same LLM
dimensions), the estimated GiB per GPU under every option of
:data:`janus_train.plan.checkpointing.OPTIONS`, the cheapest that leaves ``HEADROOM`` of the
usable memory free, and the model's shipped default. An estimate, not a measurement.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = {
    "janus_1.3b": "janus_pro_1b",
    "janus_pro_1b": "janus_pro_1b",
    "janus_pro_7b": "janus_pro_7b",
}
"""experiment -> the sbatch file whose #PLAN lines give its deployment."""


def deployments(experiment: str) -> dict[str, tuple[int, str]]:
    """stage -> (nodes, deepspeed preset) from the sbatch file's ``#PLAN`` lines."""
    text = (REPO / f"launch/slurm/{MODELS[experiment]}.sbatch").read_text()
    pat = r"^#PLAN (stage\d) nodes=(\d+) deepspeed=(\S+)"  # then the plan's other overrides
    return {m[1]: (int(m[2]), m[3]) for m in re.finditer(pat, text, re.M)}


def rows(gpu: str = "a100-80gb", experiments=tuple(MODELS)) -> list[dict]:
    from janus_train.config import compose, resolve_stage, to_run_config
    from janus_train.plan import checkpointing as ck
    from janus_train.plan.config import GIB, ClusterConfig
    from janus_train.plan.estimate import estimate, stage_shape

    cl = ClusterConfig(gpu=gpu)
    out = []
    for exp in experiments:
        for stage, (nodes, preset) in deployments(exp).items():
            run = to_run_config(
                compose([f"experiment={exp}", f"stage={stage}", f"deepspeed={preset}"])
            )
            shape = stage_shape(
                resolve_stage(run),
                run.model,
                run.data,
                micro_batch_size=run.train.micro_batch_size,
                precision=run.deepspeed.precision,
            )
            opts = ck.estimates(shape, cl, preset, run.deepspeed, nodes)
            default = ck.label(run.model.gradient_checkpointing, run.model.checkpoint_every)
            out.append(
                {
                    "experiment": exp,
                    "stage": stage,
                    "nodes": nodes,
                    "preset": preset,
                    "tokens_per_micro": shape.tokens_per_micro,
                    "usable_gib": cl.usable_bytes / GIB,
                    "gib": {name: e.total_memory / GIB for name, e in opts},
                    "cheapest": ck.cheapest(opts),
                    "default": default,
                    "default_gib": estimate(shape, cl, preset, run.deepspeed, nodes).total_memory
                    / GIB,
                }
            )
    return out


def main() -> None:
    from janus_train.plan.checkpointing import HEADROOM, OPTIONS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", default="a100-80gb")
    args = ap.parse_args()
    table = rows(args.gpu)
    names = [o[0] for o in OPTIONS]
    print(
        f"GiB per GPU ({args.gpu}, usable {table[0]['usable_gib']:.1f}; "
        f"fits = at most {1 - HEADROOM:.0%} of usable)\n"
    )
    print(
        "| model | stage | deployment | " + " | ".join(names) + " | cheapest that fits | default |"
    )
    print("|---" * (len(names) + 5) + "|")
    for r in table:
        cells = " | ".join(f"{r['gib'][n]:.1f}" for n in names)
        print(
            f"| {r['experiment']} | {r['stage']} | {r['nodes']} nodes, {r['preset']} | {cells} "
            f"| {r['cheapest']} | {r['default']} |"
        )


if __name__ == "__main__":
    main()
