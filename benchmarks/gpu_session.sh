#!/usr/bin/env bash
# The one prepared GPU run (issue 21): benchmarks/bench_gpu.py on Janus-Pro-1B stage 2 through
# janus_train.train.run, and the LLM alone, all within BUDGET_S seconds of device time (default
# 300, the wheel install included: a 15-minute allowance then holds the machine start, one run
# and a rerun). Results: $OUT/summary.jsonl (one JSON line per part and variant, or a
# skip/failure line), $OUT/session.log (every variant's output, metrics.jsonl, dynamo's
# recompilation / graph-break log), $OUT/profile_default.txt (torch.profiler, top kernels of one
# step of the default variant), $OUT/env.txt, $OUT/mfu.json (the repository's
# benchmarks/results/mfu.json with the default variant's measured MFU appended: copy it back
# there, where janus-plan reads it; compile and liger are not recorded, as janus-plan's
# overrides set neither).
#
# Preparation, on the development machine, in the repository root (wheels travel in .whl/):
#   echo /.whl/ >> .git/info/exclude
#   bash ../shared/tools/offline_wheels.sh .whl          # the project's dependencies but torch
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform any -d .whl liger-kernel
#                                                         # optional: the liger variant
# Then through the device tool (carry .whl; this script installs it into /tmp/site):
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=330)
#
# Parts, in this order (each in its own process, under `timeout`; skipped with a line in
# summary.jsonl when the budget is spent or what it needs is missing):
#   reference   the LLM alone (plain PyTorch, sdpa, no DeepSpeed engine beside it)
#   default     --attn auto (PyTorch's varlen attention) --checkpointing none, profiled
#   compile     the same + model.compile (inductor; TORCH_LOGS=recompiles,graph_breaks)
#   liger       the same + model.kernels=liger (needs liger-kernel)
# Each trainer row has MFU, tokens/s, peak memory (allocated, reserved), host syncs per step and
# inside its micro-steps, dynamo frames / graphs / graph breaks. Micro-batches of
# TOKENS_PER_MICRO (default 4096: janus-plan puts 8192 without checkpointing at 65 of 69 GiB
# on an 80 GB GPU) tokens; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True.
#
# GPU_SESSION_DRY=1: the same parts on CPU with the tiny model for 2 steps (bench_gpu.py's CPU
# mode; compile with the aot_eager backend), no wheel install, OUT defaulting to a temporary
# directory: the script's own test (tests/test_gpu_session.py). PYTHON selects the interpreter
# (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${GPU_SESSION_DRY:-0}
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d /tmp/gpu_session_out.XXXXXX)}
BUDGET_S=${BUDGET_S:-300}
WORK=$(mktemp -d /tmp/gpu_session.XXXXXX)
mkdir -p "$OUT"
SUMMARY=$OUT/summary.jsonl
LOG=$OUT/session.log
: >"$SUMMARY"
: >"$LOG"
start=$(date +%s)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  COMMON=(--steps 2 --log-every 1)
  REF=(--ref-steps 2 --ref-accum 1)
  BACKEND=aot_eager
  PROFILE_STEP=1
  T_REF=60
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
  TPM=${TOKENS_PER_MICRO:-4096}
  COMMON=(--steps 8 --log-every 2 --tokens-per-micro "$TPM")
  REF=(--ref-steps 4 --ref-accum 2)
  BACKEND=inductor
  PROFILE_STEP=3 # after the warm-up steps
  T_REF=45
  T_RUN=80
  T_COMPILE=100
fi
MIN_S=30 # a part starts only with this much budget left; it gets min(its timeout, what is left)

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

# variant NAME TIMEOUT_S NEEDS ARGS...   (NEEDS: - | liger)
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
  fi
  if [ -n "$skip" ]; then
    printf '{"variant": "%s", "skipped": "%s"}\n' "$name" "$skip" >>"$SUMMARY"
    echo "== $name: skipped ($skip)" >>"$LOG"
    return 0
  fi
  echo "== $name: bench_gpu.py $* (timeout ${limit} s)" >>"$LOG"
  local t0 rc
  t0=$(date +%s)
  timeout -k 10 "$limit" "$PY" benchmarks/bench_gpu.py "$@" \
    --out "$WORK/$name" >"$WORK/$name.out" 2>"$WORK/$name.err"
  rc=$?
  cat "$WORK/$name.out" >>"$LOG"
  tail -n 60 "$WORK/$name.err" >>"$LOG"
  if grep -qE "__recompiles|__graph_breaks|Graph break" "$WORK/$name.err"; then
    echo "-- $name recompilations / graph breaks (TORCH_LOGS)" >>"$LOG"
    grep -E -A3 "__recompiles|__graph_breaks|Graph break" "$WORK/$name.err" | head -n 80 >>"$LOG"
  fi
  [ -f "$WORK/$name/trainer/profile.txt" ] && cp "$WORK/$name/trainer/profile.txt" "$OUT/profile_$name.txt"
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

MFU_FILE=$OUT/mfu.json
[ -f benchmarks/results/mfu.json ] && cp benchmarks/results/mfu.json "$MFU_FILE"
# the LLM alone first, in its own process (no DeepSpeed engine holding memory beside it)
variant reference "$T_REF" - --reference-only "${COMMON[@]}" "${REF[@]}"
variant default "$T_RUN" - "${COMMON[@]}" --checkpointing none --no-reference \
  --profile-step "$PROFILE_STEP" --mfu-file "$MFU_FILE"
TORCH_LOGS=recompiles,graph_breaks variant compile "$T_COMPILE" - "${COMMON[@]}" \
  --checkpointing none --compile --compile-backend "$BACKEND" --no-reference --mfu-file ''
variant liger "$T_RUN" liger "${COMMON[@]}" --checkpointing none --kernels liger --no-reference \
  --mfu-file ''

# each trainer variant's MFU and tokens/s over the reference's (the same run, its own process)
"$PY" - "$SUMMARY" >>"$SUMMARY" <<'EOF'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1]) if x.strip()]
ref = next((r for r in rows if r.get("part") == "reference_llm_alone"), None)
for r in rows:
    if ref is None or r.get("part") != "trainer":
        continue
    mfu = r["mfu"] / ref["mfu"] if r.get("mfu") and ref.get("mfu") else None
    tps = r["tokens_per_s"] / ref["tokens_per_s"]
    print(json.dumps({"variant": r["variant"], "mfu_ratio_trainer_over_reference": mfu,
                      "tokens_per_s_ratio": tps}))
EOF
echo "== done after $(($(date +%s) - start)) s" >>"$LOG"
rm -rf "$WORK"
echo "$OUT"
