#!/usr/bin/env bash
# Launch `janus-train` with torchrun: one node, or one call per node with c10d rendezvous.
#
#   bash launch/torchrun.sh experiment=janus_pro_1b stage=stage1 deepspeed=zero2 [override ...]
#   NNODES=4 RDZV_ENDPOINT=node001:29500 bash launch/torchrun.sh ...    # run on each of 4 nodes
#
# Every argument is passed through to the trainer as a Hydra override. Re-running the same command
# resumes from the latest checkpoint in train.run_dir (default runs/<experiment>/<stage>).
#
# Environment (all optional):
#   NNODES          nodes taking part (default 1). With 1 and no RDZV_ENDPOINT, torchrun runs
#                   --standalone (local rendezvous on a free port).
#   NPROC_PER_NODE  processes per node (default: the GPUs `nvidia-smi -L` lists, else 1).
#   RDZV_ENDPOINT   host:port of the c10d rendezvous store; required when NNODES > 1. The node
#                   whose hostname matches `host` serves it; every node passes the same value.
#   RDZV_ID         rendezvous id, the same on every node of one job (default janus).
#   RDZV_BACKEND    rendezvous backend (default c10d).
#   RDZV_CONF       extra rendezvous settings (comma-separated key=value). Its join_timeout, when
#                   absent, is the trainer's init timeout: a train.init_timeout_s=N argument,
#                   else INIT_TIMEOUT_S, else 1800 (that field's default).
#   INIT_TIMEOUT_S  seconds to join the rendezvous and the process group and for the set-up's
#                   collectives; passed on as train.init_timeout_s=N (unless given as argument).
#   MAX_RESTARTS    torchrun worker-group restarts on failure (default 0: fail fast, let the
#                   scheduler requeue; the trainer resumes from its last checkpoint either way).
#   TORCHRUN_ARGS   extra torchrun flags, split on spaces (e.g. "--log-dir logs/ranks --tee 3").
#   PYTHON          interpreter with janus_train installed (default python).
#   DRY_RUN         1: print the command (shell-quoted, one line) instead of running it.
#   NCCL_*, TORCH_NCCL_*, GLOO_SOCKET_IFNAME, OMP_NUM_THREADS: read by NCCL/torch, not here;
#                   see README.md ("Train on a cluster"). torchrun sets OMP_NUM_THREADS=1 when unset.
#
# Signals: SIGUSR1 (Slurm's time-limit notice) to this script is forwarded to the training ranks,
# which checkpoint at the next step boundary and exit with the requeue status (75); the torchrun
# agent itself ignores USR1 (it would die of it and orphan the ranks) even when a scheduler signals
# every process of the job, as Slurm with proctrack/cgroup does. The ranks run in their own
# sessions (torchrun starts them so), hence the explicit forwarding. SIGTERM is forwarded to the
# agent, which passes it to the ranks (they also checkpoint; torchrun allows them 30 s). The exit
# status is torchrun's: 0, or 1 when any rank exited non-zero, including with 75.
set -euo pipefail

PYTHON=${PYTHON:-python}
NNODES=${NNODES:-1}
if [[ -z ${NPROC_PER_NODE:-} ]]; then
  NPROC_PER_NODE=1
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    if [[ ${gpus:-0} -gt 0 ]]; then NPROC_PER_NODE=$gpus; fi
  fi
fi

# One init timeout for the rendezvous (here) and the trainer's process group (train.init_timeout_s).
init_timeout=1800
timeout_arg=0
for arg in "$@"; do
  if [[ $arg == train.init_timeout_s=* ]]; then init_timeout=${arg#*=}; timeout_arg=1; fi
done
trainer_args=("$@")
if [[ -n ${INIT_TIMEOUT_S:-} && $timeout_arg == 0 ]]; then
  init_timeout=$INIT_TIMEOUT_S
  trainer_args+=("train.init_timeout_s=$INIT_TIMEOUT_S")
fi
init_timeout=${init_timeout%.*}  # torchrun wants whole seconds

cmd=("$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE")
if [[ $NNODES -eq 1 && -z ${RDZV_ENDPOINT:-} ]]; then
  cmd+=(--standalone)
else
  if [[ -z ${RDZV_ENDPOINT:-} ]]; then
    echo "torchrun.sh: NNODES=$NNODES needs RDZV_ENDPOINT=host:port (same on every node)" >&2
    exit 2
  fi
  cmd+=(--rdzv-backend="${RDZV_BACKEND:-c10d}" --rdzv-endpoint="$RDZV_ENDPOINT"
        --rdzv-id="${RDZV_ID:-janus}")
  rdzv_conf=${RDZV_CONF:-}
  if [[ $rdzv_conf != *join_timeout=* ]]; then
    rdzv_conf="join_timeout=$init_timeout${rdzv_conf:+,$rdzv_conf}"
  fi
  cmd+=(--rdzv-conf="$rdzv_conf")
fi
cmd+=(--max-restarts="${MAX_RESTARTS:-0}")
if [[ -n ${TORCHRUN_ARGS:-} ]]; then
  read -r -a extra <<<"$TORCHRUN_ARGS"
  cmd+=("${extra[@]}")
fi
cmd+=(-m janus_train.train "${trainer_args[@]}")

if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
# The agent starts with USR1 ignored (kept across exec; torchrun installs no USR1 handler).
(trap '' USR1; exec "${cmd[@]}") &
agent=$!
# The ranks are the agent's children: a targeted signal, not a match on process names.
trap 'pkill -USR1 -P "$agent" || true' USR1
trap 'kill -TERM "$agent" 2>/dev/null || true' TERM
while true; do
  rc=0
  wait "$agent" || rc=$?
  # wait returns early (> 128) when a trapped signal arrives; the agent may still be running.
  if [[ $rc -gt 128 ]] && kill -0 "$agent" 2>/dev/null; then continue; fi
  exit "$rc"
done
