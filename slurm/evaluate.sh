#!/bin/bash
# Post-hoc evaluation of a training run (python -m jobs.evaluate): figures, metrics and a report.
#   mkdir -p logs && sbatch slurm/evaluate.sh runs/mnist-1234
#   sbatch slurm/evaluate.sh runs/cifar10-1234 --guidance 0,1,3 --sampler ddim --steps 100
# Paper-scale FID: 50,000 samples per scale, shared by one task per GPU (the scoring and the figures
# then run on the first task). More GPUs on the command line, e.g. four:
#   sbatch --ntasks-per-node=4 --gpus-per-node=4 slurm/evaluate.sh runs/cifar10-1234 --guidance 3 \
#       --convention w --sampler ddim --steps 50 --fid-samples 50000 --inception-weights W.pth
# Preemption and the time limit while the samples are made: the job requeues itself and the rerun
# makes only the missing shards (RUN_DIR/samples/); later, the evaluation simply runs again.
# Chained after training: it starts only once the training job COMPLETED, however often that job was
# requeued on the way; if training fails it is cancelled (--kill-on-invalid-dep) instead of pending forever.
#   jid=$(sbatch --parsable slurm/cifar10.sh) && sbatch --dependency=afterok:$jid slurm/evaluate.sh runs/cifar10-$jid
#SBATCH --job-name=evaluate
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1          # one task per GPU: keep equal to --gpus-per-node
#SBATCH --gpus-per-node=1            # a typed GPU: --gpus-per-node=a100:1 (see `sinfo -o "%P %G"`)
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G                    # per node
#SBATCH --time=02:00:00
#SBATCH --signal=B:USR2@120          # to the batch shell, which forwards it to the tasks (common.sh)
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
case " $* " in
  *" --fid-samples "* | *" --fid-samples="*)
    if [ "${SLURM_NTASKS:-1}" = 1 ]; then
      ddpm_log "note: one task makes all --fid-samples samples; to share them over 4 GPUs submit with" \
               "sbatch --ntasks-per-node=4 --gpus-per-node=4 slurm/evaluate.sh ..."
    fi ;;
esac
ddpm_sample jobs.evaluate "$run_dir" "$@"
