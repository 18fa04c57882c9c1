#!/usr/bin/env bash
# The embedded demo (`make demo`): generate the demo world, fit the tiny VQ, train the tiny Janus
# through stage 1 -> 2 -> 3 with launch/pipeline.sh (2 processes, DeepSpeed on CPU), evaluate on
# held-out combinations, and write $DEMO_OUT/report.md (loss curves, image grid, accuracies).
#
#   bash launch/demo.sh                     # about 10 minutes on 2 CPU cores
#   DEMO_QUICK=1 bash launch/demo.sh        # a few steps per stage (smoke run)
#
# Re-running resumes: data, the VQ init and finished stages are kept (delete $DEMO_OUT to redo).
# Extra arguments are Hydra overrides for every stage.
#
# Environment (all optional):
#   DEMO_OUT        output directory (default demo_out).
#   NPROC_PER_NODE  training processes (default 2).
#   STEPS1, STEPS2, STEPS3   optimizer steps per stage (defaults below; DEMO_QUICK=1: 4 each).
#   BATCH           global batch size of every stage (default 16).
#   VQ_STEPS        steps of the tiny VQ fit (default 600).
#   PYTHON          interpreter with janus_train installed (default: .venv/bin/python when it
#                   exists, else python).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $root/.venv/bin/python ]]; then PYTHON=$root/.venv/bin/python; else PYTHON=python; fi
fi
export PYTHON
# the demo is an application on top of the library (janus_demo/, installed beside janus_train)
if ! "$PYTHON" -c "import janus_demo" 2>/dev/null; then
  echo "demo.sh: $PYTHON cannot import janus_demo (the demo app): pip install -e $root" >&2
  exit 2
fi
OUT=$(realpath -m "${DEMO_OUT:-demo_out}")
export NPROC_PER_NODE=${NPROC_PER_NODE:-2}
if [[ ${DEMO_QUICK:-0} == 1 ]]; then
  STEPS1=${STEPS1:-4}; STEPS2=${STEPS2:-4}; STEPS3=${STEPS3:-4}; VQ_STEPS=${VQ_STEPS:-20}
fi
STEPS1=${STEPS1:-100}
STEPS2=${STEPS2:-3000}
STEPS3=${STEPS3:-2500}
BATCH=${BATCH:-16}
VQ_STEPS=${VQ_STEPS:-600}
# one micro-batch per rank per step: no accumulation needed at this size
MICRO=$(( BATCH / NPROC_PER_NODE ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
# the demo trains on CPU: say so, instead of DeepSpeed warning on every import that it found no GPU
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
timings=$OUT/timings.json
mkdir -p "$OUT"
[[ -f $timings ]] || echo '{}' >"$timings"
phase() {  # phase NAME CMD...: run and record the seconds it took
  local name=$1 t0 t1
  shift
  t0=$(date +%s)
  "$@"
  t1=$(date +%s)
  "$PYTHON" - "$timings" "$name" $(( t1 - t0 )) <<'EOF'
import json, sys
path, name, s = sys.argv[1], sys.argv[2], int(sys.argv[3])
d = json.load(open(path)); d[name] = s; json.dump(d, open(path, "w"))
EOF
}

if [[ ! -f $OUT/data/world.json ]]; then
  phase "generate data" "$PYTHON" -m janus_demo.synth --out "$OUT/data"
fi
if [[ ! -f $OUT/init/config.json ]]; then
  # one process: give it every core (training below runs NPROC_PER_NODE x 1 thread)
  phase "tokenizer + VQ fit" env OMP_NUM_THREADS="$(nproc)" "$PYTHON" -m janus_demo.vq \
    --data "$OUT/data" --out "$OUT/init" --steps "$VQ_STEPS"
fi

export JANUS_DATA_ROOT=$OUT/data/train          # read by data_recipes/tiny_stage*.yaml
export JANUS_EVAL_DATA_ROOT=$OUT/data/heldout   # read by data_recipes/tiny_heldout.yaml (eval.recipe)
export EXPERIMENT=tiny RUN_ROOT=$OUT/runs RUN_NAME=tiny INIT_FROM=$OUT/init LAUNCHER=torchrun
export STAGE1_ARGS="experiment.stage1.steps=$STEPS1 experiment.stage1.global_batch_size=$BATCH eval.every=$STEPS1"
# und:text:gen mixes of the demo (tiny experiment defaults: stage 2 2:3:5, stage 3 5:1:4): the
# world's text is trivial and generation converges first, understanding needs the samples
export STAGE2_ARGS="experiment.stage2.steps=$STEPS2 experiment.stage2.global_batch_size=$BATCH eval.every=$STEPS2 experiment.stage2.ratio.und=5 \
experiment.stage2.ratio.text=1 experiment.stage2.ratio.gen=4"
export STAGE3_ARGS="experiment.stage3.steps=$STEPS3 experiment.stage3.global_batch_size=$BATCH eval.every=$STEPS3 experiment.stage3.ratio.und=6 \
experiment.stage3.ratio.text=1 experiment.stage3.ratio.gen=3"
phase "train stages 1-3" bash "$here/pipeline.sh" model.tokenizer=null deepspeed=zero2 \
  deepspeed.precision=fp32 train.micro_batch_size="$MICRO" \
  train.log_every=10 train.ckpt_every=0 data.num_workers=1 eval.guidance_scale=1 \
  'eval.metrics=[janus_demo.metrics:scene_metrics]' "$@"
# (evaluation generates without classifier-free guidance: the report shows why, with a sweep;
# the demo's scene/object accuracies come from its own metrics, janus_demo.metrics)

"$PYTHON" -m janus_demo.report --out "$OUT" --timings "$timings"
echo "demo: report in $OUT/report.md"
