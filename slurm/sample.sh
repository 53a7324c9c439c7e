#!/bin/bash
# Generate N samples of a trained run for external metrics (python -m jobs.sample), one task per GPU:
# the shards of the request are split over the tasks, and the result does not depend on their number.
#   mkdir -p logs && sbatch slurm/sample.sh runs/cifar10-1234 --num 50000 --guidance 3 --convention w \
#       --sampler ddim --steps 50 --npz fid/cifar10-w3.npz
#   sbatch --dependency=afterok:$jid slurm/sample.sh runs/cifar10-$jid --num 50000 ...   # after training
# Preemption and the time limit: every task stops after its current shard (exit 75) and the job requeues
# itself; the rerun redoes only the shards not yet committed. Output: RUN_DIR/samples/NAME.h5.
#SBATCH --job-name=sample
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4          # one task per GPU: keep equal to --gpus-per-node
#SBATCH --gpus-per-node=4            # a typed GPU: --gpus-per-node=a100:4 (see `sinfo -o "%P %G"`)
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G                    # per node
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out      # the directory must exist: mkdir -p logs
#SBATCH --signal=B:USR2@120          # to the batch shell, which forwards it to the tasks (common.sh)
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --kill-on-invalid-dep=yes
##SBATCH --partition=<gpu partition>
##SBATCH --account=<project account>
set -euo pipefail
# sbatch runs a spooled copy of this file; the job record says where the checkout is (or set DDPM_ROOT).
: "${SLURM_JOB_ID:?submit this script with sbatch}"
: "${DDPM_ROOT:=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's|^ *Command=\(.*\)/slurm/[^/ ]*\.sh\( .*\)\{0,1\}$|\1|p;T;q')}"
# shellcheck source=slurm/common.sh
. "${DDPM_ROOT:?cannot locate the ddpm-hpc checkout: export DDPM_ROOT=/path/to/ddpm-hpc}/slurm/common.sh"

run_dir=${1:?usage: sbatch slurm/sample.sh RUN_DIR --num N [python -m jobs.sample options]}
shift
if [ ! -f "$run_dir/config.json" ]; then
  echo "error: $run_dir is not a run directory (no config.json; relative paths start at $PWD)" >&2
  exit 2
fi
ddpm_sample jobs.sample "$run_dir" "$@"
