#!/usr/bin/env bash
# Launch `janus-train` with the DeepSpeed launcher: this node's GPUs, or every host of a hostfile
# (reached over passwordless ssh with pdsh, or through OpenMPI/MVAPICH/Slurm).
#
#   bash launch/deepspeed.sh experiment=janus_pro_1b stage=stage1 deepspeed=zero2 [override ...]
#   HOSTFILE=hosts.txt bash launch/deepspeed.sh experiment=janus_pro_7b stage=stage2 deepspeed=zero3
#
# A hostfile has one line per node, `hostname slots=<GPUs>`; the first host is the rendezvous
# (MASTER_ADDR) unless MASTER_ADDR says otherwise. Every argument is passed through to the trainer
# as a Hydra override (`--no_local_rank`: the ranks read LOCAL_RANK from the environment).
# Re-running the same command resumes from the latest checkpoint in train.run_dir.
#
# Environment (all optional):
#   HOSTFILE        hostfile for multi-node runs (default: none = this node only).
#   NUM_NODES       use the first N hosts of the hostfile (default: all).
#   NUM_GPUS        GPUs per node to use (default: all the launcher finds).
#   INCLUDE         DeepSpeed --include filter, e.g. "n1:0,1@n2" (not with NUM_NODES/NUM_GPUS).
#   MASTER_ADDR     address of the first node (default: the launcher resolves the first host).
#   MASTER_PORT     rendezvous port (default 29500).
#   DS_LAUNCHER     multi-node backend: pdsh (default), openmpi, mvapich, slurm, mpich, impi.
#   DS_LAUNCHER_ARGS  extra arguments for that backend, one string (e.g. "-x NCCL_DEBUG").
#   DEEPSPEED_ARGS  extra launcher flags, split on spaces (e.g. "--enable_each_rank_log logs").
#   PYTHON          interpreter with janus_train and deepspeed installed (default python); remote
#                   nodes run the same path, so install into the same location everywhere.
#   DRY_RUN         1: print the command (shell-quoted, one line) instead of running it.
#   NCCL_*, PYTHON*, UCX_*: the launcher forwards these to remote nodes by itself; anything else a
#                   remote rank needs goes into ./.deepspeed_env or ~/.deepspeed_env (KEY=VALUE
#                   lines). See README.md ("Train on a cluster") for the InfiniBand/NCCL settings.
set -euo pipefail

PYTHON=${PYTHON:-python}
cmd=("$PYTHON" -m deepspeed.launcher.runner)
if [[ -n ${HOSTFILE:-} ]]; then
  if [[ ! -f $HOSTFILE ]]; then
    echo "deepspeed.sh: HOSTFILE=$HOSTFILE does not exist" >&2
    exit 2
  fi
  cmd+=(--hostfile="$HOSTFILE" --launcher="${DS_LAUNCHER:-pdsh}")
  if [[ -n ${DS_LAUNCHER_ARGS:-} ]]; then cmd+=(--launcher_args="$DS_LAUNCHER_ARGS"); fi
fi
if [[ -n ${INCLUDE:-} ]]; then cmd+=(--include="$INCLUDE"); fi
if [[ -n ${NUM_NODES:-} ]]; then cmd+=(--num_nodes="$NUM_NODES"); fi
if [[ -n ${NUM_GPUS:-} ]]; then cmd+=(--num_gpus="$NUM_GPUS"); fi
if [[ -n ${MASTER_ADDR:-} ]]; then cmd+=(--master_addr="$MASTER_ADDR"); fi
cmd+=(--master_port="${MASTER_PORT:-29500}")
if [[ -n ${DEEPSPEED_ARGS:-} ]]; then
  read -r -a extra <<<"$DEEPSPEED_ARGS"
  cmd+=("${extra[@]}")
fi
cmd+=(--no_local_rank --module janus_train.train "$@")

if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
exec "${cmd[@]}"
