#!/bin/bash
# Class-conditional CIFAR-10 (configs/cifar10.yaml, 35.7M-parameter UNet, 800k steps) with DDP on the
# 4 GPUs of one node. 800k steps take longer than any time limit: every 24 h the job gets SIGUSR2,
# saves a checkpoint, requeues itself and resumes, until the run is done.
#   mkdir -p logs && sbatch slurm/cifar10.sh
#   sbatch slurm/cifar10.sh train.lr=1e-4                           # config overrides pass through
#   sbatch --nodes=2 slurm/cifar10.sh                               # 8 GPUs: global batch 512, 64 per GPU
#   jid=$(sbatch --parsable slurm/cifar10.sh) && sbatch --dependency=afterok:$jid slurm/evaluate.sh runs/cifar10-$jid
# Run dir: runs/<job name>-<job id> (relative to where you ran sbatch); log: logs/<job name>-<job id>.out.
#SBATCH --job-name=cifar10
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4          # one task per GPU: keep equal to --gpus-per-node
#SBATCH --gpus-per-node=4            # a typed GPU: --gpus-per-node=a100:4 (see `sinfo -o "%P %G"`)
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G                    # per node
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out      # the directory must exist: mkdir -p logs
#SBATCH --signal=B:USR2@120          # to the batch shell, which forwards it to the tasks (common.sh)
#SBATCH --requeue
#SBATCH --open-mode=append           # keep the log of the runs before a requeue
##SBATCH --partition=<gpu partition>
##SBATCH --account=<project account>
set -euo pipefail
# sbatch runs a spooled copy of this file; the job record says where the checkout is (or set DDPM_ROOT).
: "${SLURM_JOB_ID:?submit this script with sbatch}"
: "${DDPM_ROOT:=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's|^ *Command=\(.*\)/slurm/[^/ ]*\.sh\( .*\)\{0,1\}$|\1|p;T;q')}"
# shellcheck source=slurm/common.sh
. "${DDPM_ROOT:?cannot locate the ddpm-hpc checkout: export DDPM_ROOT=/path/to/ddpm-hpc}/slurm/common.sh"

ddpm_train "${DDPM_CONFIG:-configs/cifar10.yaml}" "${DDPM_RUN_DIR:-runs/$SLURM_JOB_NAME-$SLURM_JOB_ID}" "$@"
