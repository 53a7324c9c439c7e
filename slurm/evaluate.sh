#!/bin/bash
# Post-hoc evaluation of a training run on one GPU (python -m jobs.evaluate): figures and a report.
#   mkdir -p logs && sbatch slurm/evaluate.sh runs/mnist-1234
#   sbatch slurm/evaluate.sh runs/cifar10-1234 --guidance 0,1,3 --sampler ddim --steps 100
# Chained after training: it starts only once the training job COMPLETED, however often that job was
# requeued on the way; if training fails it is cancelled (--kill-on-invalid-dep) instead of pending forever.
#   jid=$(sbatch --parsable slurm/cifar10.sh) && sbatch --dependency=afterok:$jid slurm/evaluate.sh runs/cifar10-$jid
#SBATCH --job-name=evaluate
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1            # a typed GPU: --gpus-per-node=a100:1 (see `sinfo -o "%P %G"`)
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=02:00:00
#SBATCH --output=logs/%x-%j.out      # the directory must exist: mkdir -p logs
#SBATCH --kill-on-invalid-dep=yes
#SBATCH --requeue                    # a preempted evaluation simply runs again
#SBATCH --open-mode=append
##SBATCH --partition=<gpu partition>
##SBATCH --account=<project account>
set -euo pipefail
# sbatch runs a spooled copy of this file; the job record says where the checkout is (or set DDPM_ROOT).
: "${SLURM_JOB_ID:?submit this script with sbatch}"
: "${DDPM_ROOT:=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's|^ *Command=\(.*\)/slurm/[^/ ]*\.sh\( .*\)\{0,1\}$|\1|p;T;q')}"
# shellcheck source=slurm/common.sh
. "${DDPM_ROOT:?cannot locate the ddpm-hpc checkout: export DDPM_ROOT=/path/to/ddpm-hpc}/slurm/common.sh"

run_dir=${1:?usage: sbatch slurm/evaluate.sh RUN_DIR [python -m jobs.evaluate options]}
shift
if [ ! -f "$run_dir/config.json" ]; then
  echo "error: $run_dir is not a run directory (no config.json; relative paths start at $PWD)" >&2
  exit 2
fi
ddpm_log "job $SLURM_JOB_ID: evaluating $run_dir${*:+ with $*}; python $(command -v "$PYTHON")"
srun --kill-on-bad-exit=1 "$PYTHON" -m jobs.evaluate "$run_dir" "$@"
