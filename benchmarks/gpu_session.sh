#!/usr/bin/env bash
# The one prepared GPU run of issue 10: benchmarks/bench_gpu.py (Janus-Pro-1B stage 2 through
# janus_train.train.run against the LLM alone, same run) in the variants worth measuring, each
# under `timeout`, all within BUDGET_S seconds (default 540: a 10-minute device call with room
# for the wheel install). Results: $OUT/summary.jsonl (one JSON line per part and variant, or a
# skip/failure line), $OUT/session.log (every variant's output and metrics.jsonl), $OUT/env.txt.
#
# Preparation, on the development machine, in the repository root (wheels travel in .whl/):
#   echo /.whl/ >> .git/info/exclude
#   bash ../shared/tools/offline_wheels.sh .whl          # the project's dependencies but torch
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform any -d .whl liger-kernel
#                                                         # optional: the --kernels liger rows
# Then through the device tool (carry .whl; this script installs it into /tmp/site):
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# Variants, most informative first (skipped, with a line in summary.jsonl, when the budget is
# spent or what it needs is missing):
#   default     --checkpointing none                  (the shipped janus_pro_1b default)
#   compile     --checkpointing none --compile        (model.compile, inductor)
#   liger       --checkpointing none --kernels liger  (needs liger-kernel)
#   full_ckpt   --checkpointing full                  (issue 10's "as shipped": MFU 0.18)
#   flex        --checkpointing none --attn flex_attention (sparse block mask, compiled kernel)
#   compile_liger --checkpointing none --compile --kernels liger
# The first also measures the LLM-alone reference (the others pass --no-reference: it does not
# depend on their options). A variant starts with at least MIN_S (60) s of budget left and runs
# under min(its timeout, what is left); bench_gpu.py prints its trainer row as soon as it has it.
# Janus-Pro-7B is not run: stage 2 on one GPU needs ~180 GiB by janus-plan (model states alone
# 132 GiB under ZeRO-2 on one rank), more than an H200's 141.
#
# GPU_SESSION_DRY=1: the same variants on CPU with the tiny model for 2 steps (bench_gpu.py's
# CPU mode; compile with the aot_eager backend), no wheel install, OUT defaulting to a
# temporary directory: the script's own test (tests/test_gpu_session.py). PYTHON selects the
# interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${GPU_SESSION_DRY:-0}
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d /tmp/gpu_session_out.XXXXXX)}
BUDGET_S=${BUDGET_S:-540}
WORK=$(mktemp -d /tmp/gpu_session.XXXXXX)
mkdir -p "$OUT"
SUMMARY=$OUT/summary.jsonl
LOG=$OUT/session.log
: >"$SUMMARY"
: >"$LOG"
start=$(date +%s)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  COMMON=(--steps 2 --log-every 1 --ref-steps 2 --ref-accum 1)
  BACKEND=aot_eager
  T_RUN=120
  T_COMPILE=120
else
  if ls .whl/*.whl >/dev/null 2>&1; then
    rm -rf /tmp/site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      >>"$LOG" 2>&1 || { echo '{"error": "wheel install failed, see session.log"}' >>"$SUMMARY"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
  else
    echo "no .whl/ wheels: using the image's packages" >>"$LOG"
    export PYTHONPATH=$PWD
  fi
  COMMON=(--steps 15 --log-every 5)
  BACKEND=inductor
  T_RUN=150
  T_COMPILE=210
fi
MIN_S=60 # a variant starts only with this much budget left; it gets min(its timeout, what is left)

{
  date -u
  git log -1 --format='commit %H %s' 2>/dev/null || true
  nvidia-smi 2>&1 | head -15 || true
  "$PY" - <<'EOF' 2>&1
import importlib
for name in ("torch", "transformers", "deepspeed", "triton", "liger_kernel", "flash_attn"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(name, "missing:", type(e).__name__)
EOF
} >"$OUT/env.txt" 2>&1

have_liger() {
  "$PY" -c "import torch, liger_kernel; assert torch.cuda.is_available()" >/dev/null 2>&1
}

have_cuda() {
  "$PY" -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1
}

# variant NAME TIMEOUT_S NEEDS ARGS...   (NEEDS: - | cuda | liger)
variant() {
  local name=$1 limit=$2 needs=$3
  shift 3
  local left=$((BUDGET_S - ($(date +%s) - start)))
  local skip=""
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$left" -lt "$MIN_S" ]; then
    skip="budget: ${left} s left"
  elif [ "$needs" = liger ] && ! have_liger; then
    skip="liger-kernel or CUDA missing"
  elif [ "$needs" = cuda ] && ! have_cuda; then
    skip="CUDA missing (flex attention compiles its kernel: minutes on CPU)"
  fi
  if [ -n "$skip" ]; then
    printf '{"variant": "%s", "skipped": "%s"}\n' "$name" "$skip" >>"$SUMMARY"
    echo "== $name: skipped ($skip)" >>"$LOG"
    return 0
  fi
  echo "== $name: bench_gpu.py ${COMMON[*]} $* (timeout ${limit} s)" >>"$LOG"
  local t0 rc
  t0=$(date +%s)
  timeout -k 10 "$limit" "$PY" benchmarks/bench_gpu.py "${COMMON[@]}" "$@" \
    --out "$WORK/$name" >"$WORK/$name.out" 2>"$WORK/$name.err"
  rc=$?
  cat "$WORK/$name.out" >>"$LOG"
  tail -n 60 "$WORK/$name.err" >>"$LOG"
  if [ -f "$WORK/$name/trainer/metrics.jsonl" ]; then
    echo "-- $name metrics.jsonl" >>"$LOG"
    cat "$WORK/$name/trainer/metrics.jsonl" >>"$LOG"
  fi
  # every JSON line of bench_gpu.py, tagged with the variant
  "$PY" - "$name" "$rc" "$(($(date +%s) - t0))" "$WORK/$name.out" >>"$SUMMARY" <<'EOF'
import json, sys
name, rc, secs, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rows = []
for line in open(path):
    if line.startswith("{"):
        rows.append({"variant": name, **json.loads(line)})
if rc != 0 or not rows:
    rows.append({"variant": name, "failed": rc, "seconds": secs})
for r in rows:
    r["seconds"] = secs
    print(json.dumps(r))
EOF
  echo "== $name: exit $rc after $(($(date +%s) - t0)) s" >>"$LOG"
}

# the LLM-alone reference does not depend on the trainer's options: measured once, first
variant default "$T_RUN" - --checkpointing none
variant compile "$T_COMPILE" - --checkpointing none --compile --compile-backend "$BACKEND" \
  --no-reference
variant liger "$T_RUN" liger --checkpointing none --kernels liger --no-reference
variant full_ckpt "$T_RUN" - --checkpointing full --no-reference
variant flex "$T_RUN" cuda --checkpointing none --attn flex_attention --no-reference
variant compile_liger "$T_COMPILE" liger --checkpointing none --compile \
  --compile-backend "$BACKEND" --kernels liger --no-reference

echo "== done after $(($(date +%s) - start)) s" >>"$LOG"
rm -rf "$WORK"
echo "$OUT"
