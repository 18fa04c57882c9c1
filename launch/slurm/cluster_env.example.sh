# shellcheck shell=bash
# Site settings for the Slurm jobs: copy, edit, and point CLUSTER_ENV at the copy, e.g.
#   cp launch/slurm/cluster_env.example.sh cluster_env.sh
#   CLUSTER_ENV=$PWD/cluster_env.sh sbatch launch/slurm/janus_pro_1b.sbatch
# launch/slurm/job.sh sources it in the batch shell before `srun`; srun exports the environment
# to every node. Nothing here is set by default: the right values depend on the fabric (ask your
# admins, or check `ibstat`, `ip -br addr`, and the NCCL_DEBUG=INFO lines of a short run).
# Every line is commented out; uncomment what applies.

# --- software -------------------------------------------------------------------------------
# module load cuda/12.4 nccl                      # if the site uses environment modules
# export PYTHON=/shared/envs/janus/bin/python     # same interpreter path on every node

# --- NCCL over InfiniBand / RoCE ------------------------------------------------------------
# export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3  # the HCAs to use (`ibstat`); = excludes none
# export NCCL_IB_GID_INDEX=3                       # RoCE v2 only: the GID with the IPv4 address
# export NCCL_SOCKET_IFNAME=ib0                    # bootstrap/TCP interface (never docker0/lo)
# export GLOO_SOCKET_IFNAME=ib0                    # gloo (CPU collectives, checkpoint barriers)
# export NCCL_NET_GDR_LEVEL=PHB                    # GPUDirect RDMA distance (default usually fine)
# export NCCL_CROSS_NIC=0                          # rail-optimised fabrics: keep traffic on a rail
# export NCCL_IB_TIMEOUT=22                        # long IB retry timeout on large/busy fabrics

# --- AWS EFA (instead of the IB block) ------------------------------------------------------
# export FI_PROVIDER=efa
# export FI_EFA_USE_DEVICE_RDMA=1
# export NCCL_PROTO=simple

# --- failure handling and debugging --------------------------------------------------------
# export TORCH_NCCL_ASYNC_ERROR_HANDLING=1   # a failed collective aborts instead of hanging
# export NCCL_DEBUG=INFO                     # WARN in production; INFO shows the chosen transport
# export NCCL_DEBUG_SUBSYS=INIT,NET
# export TORCH_DISTRIBUTED_DEBUG=DETAIL      # desync reports (slow; debugging only)

# --- rendezvous -----------------------------------------------------------------------------
# export RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)-ib  # IB hostname
# export RDZV_PORT=29500

# --- Hugging Face / wandb on compute nodes without internet --------------------------------
# export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# export WANDB_MODE=offline WANDB_DIR=/shared/wandb   # then `wandb sync` from a login node
