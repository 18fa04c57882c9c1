#!/usr/bin/env bash
# LoRA fine-tuning on the demo world: stage 3 with adapters (model.lora) from the demo's stage-2
# export, then held-out understanding accuracy of that stage-2 export vs the LoRA run's merged
# hf/ export (and its adapter/ through peft), asked the same questions
# (benchmarks/lora_demo.py). Run the demo first (`make demo` or launch/demo.sh), or any run that
# left $DEMO_OUT/runs/tiny/stage2/hf.
#
#   bash launch/demo_lora.sh [override ...]      # about 2 minutes on 2 CPU cores
#
# Writes $DEMO_OUT/runs/tiny_lora/stage3/ (checkpoints, hf/, adapter/) and
# $DEMO_OUT/lora_report.json. Extra arguments are Hydra overrides of the LoRA run.
#
# Environment (all optional):
#   DEMO_OUT        the demo's output directory (default demo_out).
#   STEPS           optimizer steps of the LoRA stage 3 (default 600).
#   BATCH           global batch size (default 16).
#   LR              learning rate (default 2e-3: LoRA takes more than full fine-tuning's 5e-4).
#   LORA_GROUPS     module groups with adapters (default [llm,und_encoder]); the stage's other
#                   trainable groups (adaptors, image head) train fully.
#   LORA_R          adapter rank (default 16).
#   NPROC_PER_NODE  training processes (default 2).
#   PYTHON          interpreter with janus_train installed (default: .venv/bin/python when it
#                   exists, else python).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $root/.venv/bin/python ]]; then PYTHON=$root/.venv/bin/python; else PYTHON=python; fi
fi
export PYTHON
OUT=$(realpath -m "${DEMO_OUT:-demo_out}")
base=$OUT/runs/tiny/stage2/hf
if [[ ! -f $base/config.json ]]; then
  echo "demo_lora.sh: no stage-2 export at $base: run the demo first (make demo)" >&2
  exit 2
fi
export NPROC_PER_NODE=${NPROC_PER_NODE:-2}
STEPS=${STEPS:-600}
BATCH=${BATCH:-16}
LR=${LR:-2e-3}
LORA_GROUPS=${LORA_GROUPS:-[llm,und_encoder]}
LORA_R=${LORA_R:-16}
MICRO=$(( BATCH / NPROC_PER_NODE ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
export JANUS_DATA_ROOT=$OUT/data/train JANUS_EVAL_DATA_ROOT=$OUT/data/heldout
run_dir=$OUT/runs/tiny_lora/stage3

# the demo's stage-3 settings (launch/demo.sh), with adapters and the LoRA learning rate
bash "$here/torchrun.sh" experiment=tiny stage=stage3 train.run_dir="$run_dir" \
  model.init_from="$base" model.tokenizer=null model.lora.enabled=true \
  model.lora.groups="$LORA_GROUPS" model.lora.r="$LORA_R" model.lora.alpha=$(( 2 * LORA_R )) \
  deepspeed=zero2 deepspeed.precision=fp32 experiment.stage3.global_batch_size="$BATCH" \
  train.micro_batch_size="$MICRO" experiment.stage3.steps="$STEPS" experiment.stage3.lr="$LR" \
  experiment.stage3.ratio.und=6 experiment.stage3.ratio.text=1 experiment.stage3.ratio.gen=3 \
  train.log_every=10 train.ckpt_every=0 data.num_workers=1 eval.guidance_scale=1 "$@"

"$PYTHON" "$root/benchmarks/lora_demo.py" --base "$base" --lora "$run_dir" \
  --out "$OUT/lora_report.json"
echo "demo_lora: $OUT/lora_report.json"
