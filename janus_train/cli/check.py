"""``python -m janus_train.cli.check``: ``launch/pipeline.sh``'s checks of every stage
(:func:`janus_train.plan.check.check_stage`) before it starts or submits anything.

    python -m janus_train.cli.check --experiment janus_pro_7b --gpus-per-node 8 \
        --gpu a100-80gb --stage stage1 32 zero2 - /runs/x/stage1/hf '' \
        --stage stage2 32 zero1 /runs/x/stage1/hf /runs/x/stage2/hf 'train.ckpt_every=500' \
        -- train.log_every=20

``--stage NAME NODES DEEPSPEED INIT_FROM EXPORT_DIR ARGS`` per stage, in order (``-`` = unset;
ARGS: that stage's overrides, space-separated); after ``--`` the overrides of every stage.
Exit status 0 when every stage passes, 1 naming each failing stage and what fails.
"""

from __future__ import annotations

import argparse
import sys

from janus_train.plan.check import check_stage


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    common: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, common = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(prog="python -m janus_train.cli.check")
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--gpus-per-node", type=int, required=True)
    ap.add_argument("--gpu", default="none", help="GPU model for the planner; none: skip it")
    ap.add_argument(
        "--no-data",
        action="store_true",
        help="skip shard and init_from existence (data not mounted here)",
    )
    ap.add_argument(
        "--stage",
        nargs=6,
        action="append",
        required=True,
        metavar=("NAME", "NODES", "DEEPSPEED", "INIT_FROM", "EXPORT_DIR", "ARGS"),
    )
    a = ap.parse_args(argv)
    gpu = None if a.gpu in ("", "none") else a.gpu
    failed, prev_export = 0, None
    for name, nodes, ds, init, export, args in a.stage:
        problems, summary = check_stage(
            a.experiment,
            name,
            int(nodes),
            a.gpus_per_node,
            ds,
            init,
            [*args.split(), *common],
            gpu,
            not a.no_data,
            prev_export,
        )
        for p in problems:
            print(f"pipeline.sh: {name} cannot run: {p}", file=sys.stderr)
        if not problems:
            print(f"pipeline.sh: {name} ok: {summary}")
        failed += bool(problems)
        prev_export = export
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
