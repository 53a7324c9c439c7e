#!/bin/bash
# Class-conditional MNIST (configs/mnist.yaml) on one GPU: a few minutes on an A40/A100.
#   mkdir -p logs && sbatch slurm/mnist.sh                          # from the checkout
#   sbatch slurm/mnist.sh train.lr=1e-3 train.epochs=5              # config overrides pass through
#   sbatch -p <gpu partition> -A <account> slurm/mnist.sh           # see slurm/README.md
#   DDPM_CONFIG=configs/recipes/bonn_mnist.yaml sbatch slurm/mnist.sh
#   DDPM_RUN_DIR=runs/mnist-1234 sbatch slurm/mnist.sh              # continue an earlier run
# Run dir: runs/<job name>-<job id> (relative to where you ran sbatch); log: logs/<job name>-<job id>.out.
# Preemption / time limit: SIGUSR2 120 s before the end -> checkpoint -> exit 75 -> requeued -> resumed.
#SBATCH --job-name=mnist
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1          # one task per GPU
#SBATCH --gpus-per-node=1            # a typed GPU: --gpus-per-node=a100:1 (see `sinfo -o "%P %G"`)
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=01:00:00
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

ddpm_train "${DDPM_CONFIG:-configs/mnist.yaml}" "${DDPM_RUN_DIR:-runs/$SLURM_JOB_NAME-$SLURM_JOB_ID}" "$@"
