#!/usr/bin/env bash
# Example SLURM job: picollm on 2 nodes x 8 GPUs with torchrun's c10d rendezvous.
#   sbatch scripts/slurm_train.sh budget.compute=1e19 run_dir=/shared/runs/x
#SBATCH --job-name=picollm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one torchrun agent per node; it starts the 8 workers
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120            # preemption warning: picollm saves and exits on SIGTERM
set -euo pipefail
cd "${SLURM_SUBMIT_DIR}"
head_node=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
# Resubmitting the same command resumes from run_dir's newest checkpoint (train.resume=auto).
srun .venv/bin/torchrun \
  --nnodes="${SLURM_NNODES}" --nproc_per_node=8 \
  --rdzv-backend=c10d --rdzv-endpoint="${head_node}:29500" --rdzv-id="${SLURM_JOB_ID}" \
  --max-restarts=3 \
  -m picollm.train "$@"
