#!/usr/bin/env bash
# Body of the Slurm jobs (launch/slurm/*.sbatch exec this inside the allocation): one stage of one
# experiment on every node of the allocation, one `srun` task per node running launch/torchrun.sh
# (all GPUs of the node), c10d rendezvous on the first host of the allocation; checkpoint before
# the time limit and requeue until the stage is done.
#
#   bash launch/slurm/job.sh [override ...]      # inside an allocation; normally via sbatch
#
# Run directory: $RUN_ROOT/$RUN_NAME/$STAGE, independent of the job id, so a requeued or
# resubmitted job finds its checkpoints there and resumes. The stage is done when its export
# ($RUN_DIR/$EXPORT_SUBDIR/config.json) exists; a job that starts on a finished stage exits 0.
#
# How an attempt ends, and what this shell then does (its log line says which, from what Slurm
# reports: `scontrol show job` fields, the exit status, $JANUS_USER_ERROR_FILE):
#   stage done        the export exists: exit 0.
#   SIGUSR1           sbatch --signal=B:USR1@<secs> (time limit near) or `scancel --signal=USR1
#                     --batch` (a preemption notice; the log line tells them apart by the time
#                     left: under an hour = the time limit). Forwarded to every process of the job
#                     steps (`scancel --signal=USR1`; the torchrun agents ignore it); the ranks
#                     checkpoint at the next step boundary and exit; then `scontrol requeue`
#                     (also when the step ends with REQUEUE_EXIT_CODE).
#   SIGTERM           never requeued here. `scancel` (JobState CANCELLED: the job ends), the time
#                     limit itself (Reason=TimeLimit: USR1 came too late or not at all), or Slurm's
#                     own requeue (PreemptMode=REQUEUE, `scontrol requeue`: Restarts went up; Slurm
#                     restarts the job). The ranks get SIGTERM from Slurm too and checkpoint if
#                     KillWait/GraceTime allow, so a resubmission resumes.
#   user error        exit 2, or a line in JANUS_USER_ERROR_FILE (bad config or override, recipe,
#                     missing file, data failure): never requeued; the job exits 2 (FAILED).
#   storage full      exit 3, or a "storage full:" line there (a checkpoint did not fit): never
#                     requeued (the same save would fail again); the job exits 3.
#   crash             any other failure (lost node, collective error or timeout): requeued only
#                     when this attempt advanced training (a logged step or a checkpoint past the
#                     one it resumed from), so a crash at start-up fails the job (exit 1) instead of
#                     looping through requeues; at most MAX_REQUEUES restarts in all.
#
# Environment (set by the sbatch file or at submission; requeued jobs keep the submission's):
#   EXPERIMENT      experiment config (required; the sbatch files set it).
#   STAGE           stage1 | stage2 | stage3 (default stage1).
#   DEEPSPEED       deepspeed config group: zero1 | zero2 | zero3 | zero3_offload (default zero2).
#   INIT_FROM       HF-format directory for model.init_from, e.g. the previous stage's export
#                   (default: the model config's init_from).
#   RUN_ROOT        root of the run directories (default $JANUS_TRAIN_ROOT/runs).
#   RUN_NAME        name of this run under RUN_ROOT (default $EXPERIMENT).
#   RUN_DIR         the stage's run directory (default $RUN_ROOT/$RUN_NAME/$STAGE).
#   EXPORT_SUBDIR   where the trainer writes the stage's HF export inside RUN_DIR (default hf).
#   LOG_ROOT        per-job log directories go to $LOG_ROOT/<job name>-<job id>/ (default
#                   $JANUS_TRAIN_ROOT/logs): node<N>.r<restart>.log per node and attempt.
#   GPUS_PER_NODE   processes per node (default $SLURM_GPUS_ON_NODE, else the GPUs
#                   `nvidia-smi -L` lists on each node, else 1; e.g. 2 for CPU ranks).
#   CPUS_PER_TASK   CPUs for each node's task (default $SLURM_CPUS_ON_NODE: srun does not inherit
#                   sbatch's CPU count, and one CPU would starve the data loaders).
#   RDZV_HOST       rendezvous host (default: first host of `scontrol show hostnames`).
#   RDZV_PORT       rendezvous port (default 29500).
#   RDZV_CONF       extra c10d rendezvous settings (join_timeout defaults to the trainer's
#                   train.init_timeout_s / INIT_TIMEOUT_S: see launch/torchrun.sh).
#   INIT_TIMEOUT_S  rendezvous + process-group join + set-up timeout (train.init_timeout_s).
#   REQUEUE_EXIT_CODE  exit status meaning "checkpointed, requeue me" (default 75, the trainer's
#                   janus_train.trainer.checkpoint.EXIT_REQUEUE; torchrun reports a failed worker
#                   as 1, so the USR1 this shell forwarded is what normally triggers the requeue).
#   MAX_REQUEUES    stop requeueing (after signals and crashes alike) after this many restarts
#                   (default 50; a crash is requeued only after progress, see above).
#   JANUS_TRAIN_ROOT  repository root (default $SLURM_SUBMIT_DIR: submit from the repo root).
#   PYTHON          interpreter (default $JANUS_TRAIN_ROOT/.venv/bin/python if there, else python).
#   CLUSTER_ENV     shell file sourced before launching: site NCCL/InfiniBand settings, modules
#                   (template: launch/slurm/cluster_env.example.sh; README.md "Train on a cluster").
#   DRY_RUN         1: every node prints its torchrun command instead of running it.
#   SLURM_JOB_ID, SLURM_JOB_NAME, SLURM_JOB_NODELIST, SLURM_JOB_NUM_NODES (or SLURM_NNODES),
#   SLURM_RESTART_COUNT, SLURM_GPUS_ON_NODE, SLURM_CPUS_ON_NODE, SLURM_SUBMIT_DIR: set by Slurm.
set -euo pipefail

: "${SLURM_JOB_ID:?job.sh runs inside a Slurm allocation: sbatch launch/slurm/<experiment>.sbatch}"
: "${EXPERIMENT:?set EXPERIMENT (the sbatch files do)}"

# First, so a USR1 that comes early (short jobs) is never the default action (exit).
signaled=0 termed=0
usr1_why=
forward_usr1() {  # shellcheck disable=SC2317  # (called by the trap)
  if [[ $signaled == 0 ]]; then
    signaled=1
    usr1_why=$(why_usr1)
    echo "job.sh: SIGUSR1 ($usr1_why): asking the ranks to checkpoint and exit"
    scancel --signal=USR1 "$SLURM_JOB_ID" || true
  fi
}
on_term() {  # shellcheck disable=SC2317
  if [[ $termed == 0 ]]; then
    termed=1
    echo "job.sh: SIGTERM from Slurm: the ranks got it too (they checkpoint if the grace allows);" \
         "this attempt ends without a requeue from here"
  fi
}
trap forward_usr1 USR1
trap on_term TERM

job_info=
job_field() {  # job_field KEY: KEY's value in the `scontrol show job` output read last
  if [[ $job_info =~ (^|[[:space:]])$1=([^[:space:]]*) ]]; then echo "${BASH_REMATCH[2]}"; fi
}
read_job_info() { job_info=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null || true); }
secs() {  # [D-]HH:MM:SS | MM:SS | UNLIMITED -> seconds (empty when unlimited or unknown)
  local t=$1 d=0 h=0 m=0 x
  if [[ $t =~ ^(([0-9]+)-)?([0-9]+):([0-9]+):([0-9]+)$ ]]; then
    d=${BASH_REMATCH[2]:-0} h=${BASH_REMATCH[3]} m=${BASH_REMATCH[4]} x=${BASH_REMATCH[5]}
  elif [[ $t =~ ^([0-9]+):([0-9]+)$ ]]; then
    m=${BASH_REMATCH[1]} x=${BASH_REMATCH[2]}
  else
    return 0
  fi
  echo $(( ((10#$d * 24 + 10#$h) * 60 + 10#$m) * 60 + 10#$x ))
}
why_usr1() {  # shellcheck disable=SC2317
  # Slurm does not say who sent a signal; the time left does: --signal=B:USR1@<secs> comes
  # <secs> (the shipped files: 10-15 min) before the limit, a preemption notice at any time.
  read_job_info
  local limit run left
  limit=$(secs "$(job_field TimeLimit)") run=$(secs "$(job_field RunTime)")
  if [[ -z $limit || -z $run ]]; then
    echo "preemption notice: no time limit (TimeLimit=$(job_field TimeLimit))"
  elif (( (left = limit - run) <= 3600 )); then
    echo "time limit near: ${left} s left of TimeLimit=$(job_field TimeLimit)"
  else
    echo "preemption notice, not the time limit: ${left} s left of TimeLimit=$(job_field TimeLimit)"
  fi
}
why_term() {
  # At SIGTERM Slurm shows JobState=COMPLETING whatever the cause; Restarts and Reason tell.
  read_job_info
  local restarts=$(job_field Restarts) reason=$(job_field Reason)
  if [[ -z $restarts ]]; then
    echo "cause unknown (scontrol show job $SLURM_JOB_ID answered nothing); not requeued here"
  elif [[ $restarts -gt $RESTART ]]; then
    echo "requeued by Slurm (preemption with PreemptMode=REQUEUE, or scontrol requeue:" \
         "Restarts=$restarts); it restarts the job, which resumes from the last checkpoint"
  elif [[ $reason == TimeLimit ]]; then
    echo "time limit reached (Reason=TimeLimit, RunTime=$(job_field RunTime)): no checkpoint" \
         "signal came in time (sbatch --signal=B:USR1@<secs>); resubmit to resume"
  else
    echo "cancelled (scancel or an administrator; Restarts=$restarts, Reason=${reason:-?}):" \
         "not requeued; resubmit to resume from the last checkpoint"
  fi
}

ROOT=${JANUS_TRAIN_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ ! -f $ROOT/launch/torchrun.sh ]]; then
  echo "job.sh: $ROOT is not the janus_train repository; submit from its root or set" \
       "JANUS_TRAIN_ROOT" >&2
  exit 2
fi
STAGE=${STAGE:-stage1}
case $STAGE in stage1 | stage2 | stage3) ;; *)
  echo "job.sh: STAGE=$STAGE: stage1 | stage2 | stage3" >&2; exit 2 ;;
esac
for arg in "$@"; do
  case $arg in experiment=* | stage=* | deepspeed=* | train.run_dir=* | model.init_from=*)
    echo "job.sh: '$arg': set EXPERIMENT / STAGE / DEEPSPEED / RUN_DIR / INIT_FROM instead (the" \
         "run directory is derived from them)" >&2
    exit 2 ;;
  esac
done
RUN_NAME=${RUN_NAME:-$EXPERIMENT}
RUN_DIR=${RUN_DIR:-${RUN_ROOT:-$ROOT/runs}/$RUN_NAME/$STAGE}
EXPORT_DIR=$RUN_DIR/${EXPORT_SUBDIR:-hf}
RESTART=${SLURM_RESTART_COUNT:-0}
LOG_DIR=${LOG_ROOT:-$ROOT/logs}/${SLURM_JOB_NAME:-janus}-$SLURM_JOB_ID
REQUEUE_EXIT_CODE=${REQUEUE_EXIT_CODE:-75}
MAX_REQUEUES=${MAX_REQUEUES:-50}
CKPT_DIR=$RUN_DIR/checkpoints METRICS=$RUN_DIR/metrics.jsonl
if [[ -z ${PYTHON:-} ]]; then
  PYTHON=python
  if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; fi
fi
if [[ -n ${CLUSTER_ENV:-} ]]; then
  # shellcheck disable=SC1090
  source "$CLUSTER_ENV"
fi

if [[ -f $EXPORT_DIR/config.json ]]; then
  echo "job.sh: $STAGE of $RUN_NAME is complete ($EXPORT_DIR); nothing to do"
  exit 0
fi

nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:?}}
# No `| head -n1`: under pipefail, scontrol dying of SIGPIPE would fail the job.
hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_host=${RDZV_HOST:-${hosts%%$'\n'*}}
overrides=(experiment="$EXPERIMENT" stage="$STAGE" deepspeed="${DEEPSPEED:-zero2}"
           train.run_dir="$RUN_DIR")
if [[ -n ${INIT_FROM:-} ]]; then overrides+=(model.init_from="$INIT_FROM"); fi
overrides+=("$@")

# Read by launch/torchrun.sh on every node (srun exports the environment).
# Empty: launch/torchrun.sh counts each node's GPUs (`nvidia-smi -L`), else starts one process.
export PYTHON NNODES=$nnodes NPROC_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
export RDZV_ENDPOINT=$head_host:${RDZV_PORT:-29500} RDZV_ID=$SLURM_JOB_ID
export RDZV_CONF=${RDZV_CONF:-} MAX_RESTARTS=0
# Where a rank writes its one-line user error (janus_train/errors.py); one file per attempt.
export JANUS_USER_ERROR_FILE=$LOG_DIR/user_error.r$RESTART

mkdir -p "$LOG_DIR"
rm -f "$JANUS_USER_ERROR_FILE"
srun_cmd=(srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1
          --output="$LOG_DIR/node%n.r$RESTART.log")
cpus=${CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-}}
if [[ -n $cpus ]]; then srun_cmd+=(--cpus-per-task="$cpus"); fi
srun_cmd+=(bash "$ROOT/launch/torchrun.sh" "${overrides[@]}")

echo "job.sh: job $SLURM_JOB_ID attempt $RESTART, $nnodes nodes x" \
     "${NPROC_PER_NODE:-(GPUs of each node)} processes," \
     "rendezvous $RDZV_ENDPOINT, run dir $RUN_DIR, logs $LOG_DIR"
printf '%q ' "${srun_cmd[@]}" | tee -a "$LOG_DIR/commands.txt"
printf '\n' | tee -a "$LOG_DIR/commands.txt"

ckpt_step() {  # the step of the checkpoint `latest` names (0: none)
  local tag=
  if [[ -f $CKPT_DIR/latest ]]; then tag=$(<"$CKPT_DIR/latest"); fi
  if [[ $tag =~ step_0*([0-9]+) ]]; then echo "${BASH_REMATCH[1]}"; else echo 0; fi
}
start_step=$(ckpt_step)
# The trainer drops metrics rows past the step it resumes from; a row past start_step written
# during this attempt (metrics.jsonl newer than the stamp) is progress.
stamp=$LOG_DIR/attempt.r$RESTART.start
touch "$stamp"
progressed() {
  local last=
  if [[ $(ckpt_step) -gt $start_step ]]; then return 0; fi
  if [[ -f $METRICS && $METRICS -nt $stamp ]]; then last=$(tail -n 1 "$METRICS"); fi
  [[ $last =~ \"step\":\ *([0-9]+) && ${BASH_REMATCH[1]} -gt $start_step ]]
}

# In the background so the traps run while srun is still going (bash defers traps during a
# foreground child, but `wait` returns on them).
"${srun_cmd[@]}" &
srun_pid=$!
while true; do
  rc=0
  wait "$srun_pid" || rc=$?
  if [[ $rc -gt 128 ]] && kill -0 "$srun_pid" 2>/dev/null; then continue; fi
  break
done

if [[ -f $EXPORT_DIR/config.json ]]; then
  echo "job.sh: $STAGE complete: $EXPORT_DIR"
  exit 0
fi
reported=$(cat "$JANUS_USER_ERROR_FILE" 2>/dev/null || true)
# A checkpoint that did not fit fails the same way until space is freed: never requeued.
if [[ $reported == "storage full:"* || $rc == 3 ]]; then
  echo "job.sh: storage full, not requeueing: ${reported:-exit 3}; free space under" \
       "$CKPT_DIR (the previous checkpoint stays latest), then resubmit" >&2
  exit 3
fi
# A user error (bad config or override, recipe, missing file, data above data.max_failure_rate)
# fails the same way again: never requeued. A rank reports it in $JANUS_USER_ERROR_FILE (torchrun
# turns every rank's status into 1); exit 2 is also one.
if [[ -n $reported || $rc == 2 ]]; then
  echo "job.sh: user error, not requeueing: ${reported:-exit 2}" >&2
  exit 2
fi
if [[ $termed == 1 ]]; then
  echo "job.sh: step ended (rc=$rc) after SIGTERM: $(why_term)" >&2
  exit 143
fi
if [[ $rc == 0 && $signaled == 0 ]]; then
  echo "job.sh: step exited 0 without an export at $EXPORT_DIR (DRY_RUN or" \
       "train.export_at_end=false)"
  exit 0
fi
if [[ $signaled == 1 || $rc == "$REQUEUE_EXIT_CODE" ]]; then
  # Checkpointed on a signal (75): resume from that checkpoint in a new attempt.
  why="step ended (rc=$rc) after SIGUSR1 (${usr1_why:-exit $REQUEUE_EXIT_CODE}), checkpointed"
  why+=" at step $(ckpt_step)"
elif progressed; then
  # A crash that is not the user's (lost node, collective error or timeout, a rank stuck after
  # a stop signal) after progress: resume from the last checkpoint in a new attempt.
  why="step crashed (rc=$rc, not a user error; see $LOG_DIR) after progress past step"
  why+=" $start_step"
else
  echo "job.sh: step crashed (rc=$rc, not a user error; see $LOG_DIR) before training advanced" \
       "past step $start_step: not requeueing (the same start-up would fail again)" >&2
  exit 1
fi
if [[ $RESTART -ge $MAX_REQUEUES ]]; then
  echo "job.sh: $why; not requeueing: $RESTART restarts reached MAX_REQUEUES=$MAX_REQUEUES" >&2
  exit 1
fi
echo "job.sh: $why; requeueing job $SLURM_JOB_ID (restart $((RESTART + 1)) of at most" \
     "$MAX_REQUEUES)"
trap '' TERM  # the requeue's own SIGTERM to this shell
scontrol requeue "$SLURM_JOB_ID"
exit 0
