#!/usr/bin/env bash
# Run the three stages one after another, each initialised from the previous stage's HF export:
#   stage1 -> $RUN_ROOT/$RUN_NAME/stage1/hf -> stage2 (model.init_from=...) -> ... -> stage3
#
#   bash launch/pipeline.sh [override ...]                           # torchrun on this node
#   EXPERIMENT=janus_pro_1b LAUNCHER=slurm bash launch/pipeline.sh   # 3 Slurm jobs, chained
#   EXPERIMENT=tiny LAUNCHER=slurm GPUS_PER_NODE=2 SBATCH_ARGS="-c 4" bash launch/pipeline.sh
#   EXPERIMENT=tiny NPROC_PER_NODE=2 bash launch/pipeline.sh \
#     experiment.stage1.steps=2 experiment.stage2.steps=2 experiment.stage3.steps=2   # CPU smoke
#
# Before anything runs or is submitted, every stage is checked (janus_train.cli.check): its
# config, data recipe and shards, batch arithmetic at its world size, the model.init_from chain,
# and janus-plan's feasibility on the GPU model; a failing stage is named and nothing starts.
# The checks run with CLUSTER_ENV sourced (in a subshell), as the jobs do: JANUS_DATA_ROOT and
# the like set there count.
#
# Arguments are Hydra overrides for every stage (not experiment/stage/train.run_dir/
# model.init_from: the pipeline sets those). A stage whose export exists is skipped, so re-running
# the same command after an interruption resumes: a half-done stage resumes from its checkpoint.
# Several nodes without Slurm: run the same command on every node (NNODES, RDZV_ENDPOINT set; the
# run root on a shared filesystem), or once with LAUNCHER=deepspeed and a HOSTFILE.
#
# Environment (all optional):
#   EXPERIMENT      experiment config (default tiny).
#   LAUNCHER        torchrun (default) | deepspeed: run the stages here, one after another, with
#                   launch/torchrun.sh or launch/deepspeed.sh (their variables apply: NNODES,
#                   NPROC_PER_NODE, RDZV_ENDPOINT, HOSTFILE, NUM_GPUS, ...);
#                   slurm: submit one job per stage with `sbatch --dependency=afterok:<previous>
#                   --kill-on-invalid-dep=yes` and return: a requeued job keeps its id, so the
#                   chain waits for it; a stage that fails or is cancelled makes Slurm cancel the
#                   stages after it (none is left pending).
#   STAGES          stages to run, in order (default "stage1 stage2 stage3").
#   RUN_ROOT        root of the run directories (default runs).
#   RUN_NAME        run name under RUN_ROOT (default $EXPERIMENT).
#   INIT_FROM       model.init_from of the first stage run (default: the model config's; for a later
#                   first stage, the previous stage's export when it exists).
#   DEEPSPEED       deepspeed config group for every stage (default: the config's; slurm: the
#                   sbatch file's `#PLAN <stage> nodes=N deepspeed=X` line, what janus-plan
#                   recommends). Per stage: DEEPSPEED_STAGE1, DEEPSPEED_STAGE2, DEEPSPEED_STAGE3.
#   NODES_STAGE1, NODES_STAGE2, NODES_STAGE3  slurm: nodes of one stage's job (default: its #PLAN
#                   line, else the sbatch file's --nodes); passed to sbatch as --nodes.
#   GPUS_PER_NODE   slurm: GPUs (processes) per node (default 8; also read by the jobs: e.g. 2
#                   for the tiny experiment on CPU).
#   GPU             GPU model for the planner check (a100-40gb | a100-80gb | h100-80gb | h200-141gb;
#                   default: the sbatch file's `#PLAN gpu=` line; local: none = no planner check).
#   CHECK           0: skip the checks below (default 1).
#   CHECK_DATA      0: check everything but shard and model.init_from existence (data not mounted
#                   where the pipeline runs; default 1).
#   STAGE1_ARGS, STAGE2_ARGS, STAGE3_ARGS  extra overrides for one stage, split on spaces.
#   EXPORT_SUBDIR   where the trainer writes a stage's export inside its run dir (default hf).
#   SBATCH_SCRIPT   slurm: the job script (default launch/slurm/$EXPERIMENT.sbatch when it exists,
#                   else launch/slurm/janus.sbatch: nodes, GPUs, CPUs from SBATCH_ARGS).
#   SBATCH_ARGS     slurm: extra sbatch options, split on spaces (e.g. "-p gpu -A proj").
#   PYTHON          interpreter with janus_train installed (default python).
#   CLUSTER_ENV     shell file the jobs source (launch/slurm/job.sh); sourced for the checks too.
#   DRY_RUN         1: print the commands instead of running or submitting them.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
EXPERIMENT=${EXPERIMENT:-tiny}
LAUNCHER=${LAUNCHER:-torchrun}
STAGES=${STAGES:-stage1 stage2 stage3}
RUN_ROOT=$(realpath -m "${RUN_ROOT:-runs}")  # absolute: Slurm jobs and init_from outlive this cwd
RUN_NAME=${RUN_NAME:-$EXPERIMENT}
EXPORT_SUBDIR=${EXPORT_SUBDIR:-hf}
DRY_RUN=${DRY_RUN:-0}
case $LAUNCHER in torchrun | deepspeed | slurm) ;; *)
  echo "pipeline.sh: LAUNCHER=$LAUNCHER: torchrun | deepspeed | slurm" >&2; exit 2 ;;
esac
for arg in "$@"; do
  case $arg in experiment=* | stage=* | train.run_dir=* | model.init_from=*)
    echo "pipeline.sh: '$arg' is set by the pipeline (use EXPERIMENT, STAGES, RUN_ROOT," \
         "RUN_NAME, INIT_FROM)" >&2
    exit 2 ;;
  esac
done

run() {
  if [[ $DRY_RUN == 1 ]]; then printf '%q ' "$@"; printf '\n'; else "$@"; fi
}

script=${SBATCH_SCRIPT:-$here/slurm/$EXPERIMENT.sbatch}
if [[ -z ${SBATCH_SCRIPT:-} && ! -f $script ]]; then script=$here/slurm/janus.sbatch; fi
if [[ $LAUNCHER == slurm && ! -f $script ]]; then
  echo "pipeline.sh: no Slurm script $script; set SBATCH_SCRIPT" >&2; exit 2
fi
plan_value() {  # plan_value <stage|-> <key>: a value from the sbatch file's "#PLAN" lines
  local line re="^#PLAN( .*)? $2=([^ ]+)"
  if [[ $1 != - ]]; then re="^#PLAN $1( .*)? $2=([^ ]+)"; fi
  while read -r line; do
    if [[ $line =~ $re ]]; then echo "${BASH_REMATCH[2]}"; return; fi
  done <"$script"
}
plan_overrides() {  # plan_overrides <stage> <preset>: the #PLAN line's overrides after its preset,
  # when the stage runs that preset (the sbatch file applies them then, so the check must too)
  local line re="^#PLAN $1( .*)? deepspeed=([^ ]+)(.*)$"
  while read -r line; do
    if [[ $line =~ $re ]]; then
      if [[ ${BASH_REMATCH[2]} == "$2" ]]; then echo "${BASH_REMATCH[3]# }"; fi
      return
    fi
  done <"$script"
}
if [[ $LAUNCHER == slurm ]]; then
  gpn=${GPUS_PER_NODE:-8}
  default_nodes=$(sed -n 's/^#SBATCH --nodes=\([0-9]*\).*/\1/p' "$script")
  gpu=${GPU:-$(plan_value - gpu)}
else  # the world the local launchers start
  gpn=${NPROC_PER_NODE:-${NUM_GPUS:-}}
  if [[ -z $gpn ]]; then
    gpn=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    if [[ ${gpn:-0} -eq 0 ]]; then gpn=1; fi
  fi
  default_nodes=${NNODES:-${NUM_NODES:-1}}
  if [[ -n ${HOSTFILE:-} && -z ${NUM_NODES:-} ]]; then
    default_nodes=$(grep -cv '^\s*\(#\|$\)' "$HOSTFILE")
  fi
  gpu=${GPU:-none}
fi

# ---- plan every stage: run dir, init_from, DeepSpeed preset, nodes --------------------------
init_from=${INIT_FROM:-}
prev_export=
plan_stages=() plan_inits=() plan_ds=() plan_nodes=() check_args=()
for stage in $STAGES; do
  case $stage in stage1 | stage2 | stage3) ;; *)
    echo "pipeline.sh: unknown stage '$stage' in STAGES" >&2; exit 2 ;;
  esac
  run_dir=$RUN_ROOT/$RUN_NAME/$stage
  export_dir=$run_dir/$EXPORT_SUBDIR
  if [[ -z $prev_export && -z $init_from && $stage != stage1 ]]; then
    # Starting mid-pipeline: hand off from the earlier stage's export.
    earlier=$RUN_ROOT/$RUN_NAME/stage$(( ${stage#stage} - 1 ))/$EXPORT_SUBDIR
    if [[ -f $earlier/config.json ]]; then init_from=$earlier; fi
  fi
  if [[ -n $prev_export ]]; then init_from=$prev_export; fi
  upper=${stage^^}
  ds_var=DEEPSPEED_$upper nodes_var=NODES_$upper args_var=${upper}_ARGS
  ds=${!ds_var:-${DEEPSPEED:-}}
  nodes=$default_nodes
  stage_check_args=${!args_var:-}
  if [[ $LAUNCHER == slurm ]]; then
    ds=${ds:-$(plan_value "$stage" deepspeed)}
    nodes=${!nodes_var:-$(plan_value "$stage" nodes)}
    nodes=${nodes:-$default_nodes}
    # the job runs the plan's checkpointing/token budget/reduction before the stage's own args
    extra=$(plan_overrides "$stage" "$ds")
    stage_check_args="$extra${extra:+${stage_check_args:+ }}$stage_check_args"
  fi
  plan_stages+=("$stage") plan_inits+=("$init_from") plan_ds+=("$ds") plan_nodes+=("$nodes")
  if [[ $LAUNCHER == slurm || ! -f $export_dir/config.json ]]; then  # a done stage never reruns
    check_args+=(--stage "$stage" "$nodes" "${ds:--}" "${init_from:--}" "$export_dir"
                 "$stage_check_args")
  fi
  prev_export=$export_dir
done

check_stages() {  # in a subshell: CLUSTER_ENV (what the jobs source) stays out of this shell
  if [[ -n ${CLUSTER_ENV:-} ]]; then
    # shellcheck disable=SC1090
    source "$CLUSTER_ENV"
  fi
  local py=${PYTHON:-python}
  if [[ -z ${PYTHON:-} && -x $here/../.venv/bin/python ]]; then py=$here/../.venv/bin/python; fi
  local check=("$py" -m janus_train.cli.check --experiment "$EXPERIMENT"
               --gpus-per-node "$gpn" --gpu "${gpu:-none}")
  if [[ ${CHECK_DATA:-1} == 0 ]]; then check+=(--no-data); fi
  "${check[@]}" "${check_args[@]}" -- "$@"
}
if [[ ${CHECK:-1} != 0 && ${#check_args[@]} -gt 0 ]]; then
  if ! (check_stages "$@"); then
    echo "pipeline.sh: nothing started or submitted (set CHECK=0 to skip the checks)" >&2
    exit 1
  fi
fi

# ---- run or submit ------------------------------------------------------------------------
prev_job=
for k in "${!plan_stages[@]}"; do
  stage=${plan_stages[$k]} init_from=${plan_inits[$k]} ds=${plan_ds[$k]} nodes=${plan_nodes[$k]}
  run_dir=$RUN_ROOT/$RUN_NAME/$stage
  export_dir=$run_dir/$EXPORT_SUBDIR
  args_var=${stage^^}_ARGS
  read -r -a stage_args <<<"${!args_var:-}"

  if [[ $LAUNCHER != slurm && -f $export_dir/config.json ]]; then
    echo "pipeline.sh: $stage done ($export_dir); skipping"
  elif [[ $LAUNCHER == slurm ]]; then
    if [[ $DRY_RUN != 1 ]]; then mkdir -p logs; fi  # the sbatch files' --output directory
    read -r -a sbatch_args <<<"${SBATCH_ARGS:-}"
    env_list=ALL,EXPERIMENT=$EXPERIMENT,STAGE=$stage,RUN_ROOT=$RUN_ROOT,RUN_NAME=$RUN_NAME
    env_list+=,EXPORT_SUBDIR=$EXPORT_SUBDIR
    if [[ -n $init_from ]]; then env_list+=,INIT_FROM=$init_from; fi
    if [[ -n $ds ]]; then env_list+=,DEEPSPEED=$ds; fi
    cmd=(sbatch --parsable --job-name="$EXPERIMENT-$stage" --nodes="$nodes" --export="$env_list")
    if [[ -n $prev_job ]]; then
      # a failed or cancelled previous stage cancels this one (not left pending forever)
      cmd+=(--dependency=afterok:"$prev_job" --kill-on-invalid-dep=yes)
    fi
    cmd+=("${sbatch_args[@]}" "$script" "${stage_args[@]}" "$@")
    after=$prev_job
    if [[ $DRY_RUN == 1 ]]; then
      run "${cmd[@]}"
      prev_job=DRYRUN_$stage
    else
      prev_job=$("${cmd[@]}")
      prev_job=${prev_job%%;*}  # --parsable prints "id" or "id;cluster"
      if [[ -n $after ]]; then
        echo "pipeline.sh: $stage submitted as job $prev_job: starts when job $after" \
             "completes; Slurm cancels it if job $after fails or is cancelled"
      else
        echo "pipeline.sh: $stage submitted as job $prev_job"
      fi
    fi
  else
    overrides=(experiment="$EXPERIMENT" stage="$stage" train.run_dir="$run_dir")
    if [[ -n $ds ]]; then overrides+=(deepspeed="$ds"); fi
    if [[ -n $init_from ]]; then overrides+=(model.init_from="$init_from"); fi
    echo "pipeline.sh: $stage -> $run_dir${init_from:+ (from $init_from)}"
    run bash "$here/$LAUNCHER.sh" "${overrides[@]}" "${stage_args[@]}" "$@"
    if [[ $DRY_RUN != 1 && ! -f $export_dir/config.json ]]; then
      echo "pipeline.sh: $stage ended without an export at $export_dir" >&2
      exit 1
    fi
  fi
done
