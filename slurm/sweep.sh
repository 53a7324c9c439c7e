#!/bin/bash
# A sweep as a job array: array task i trains with the overrides on run line i of SWEEP_FILE.
# Run lines are the lines left after dropping blank lines and comments (`#` at the start of a line or
# after a space), counted from 0. Words are split like a shell does (quote a value that has spaces:
# sample.guidance="[1, 3]"); arguments after SWEEP_FILE apply to every run, a line's own overrides win.
#   bash slurm/sweep.sh slurm/sweeps/example.txt            # checks every run line, prints the sbatch line:
#   sbatch --array=0-3 slurm/sweep.sh slurm/sweeps/example.txt
#   sbatch --array=0-3%2 slurm/sweep.sh slurm/sweeps/example.txt train.epochs=5   # 2 at a time
#   sbatch --array=2 slurm/sweep.sh slurm/sweeps/example.txt                      # rerun only line 2
#   DDPM_CONFIG=configs/cifar10.yaml sbatch --array=0-3 --ntasks-per-node=4 --gpus-per-node=4 slurm/sweep.sh f.txt
#   DDPM_RUN_DIR=runs/example-1234 sbatch --array=1 slurm/sweep.sh f.txt   # continue run 1 of array 1234
# Run dir: runs/<sweep file name>-<array job id>_<index>; log: logs/<job name>-<array job id>_<index>.out.
# Edits to SWEEP_FILE reach tasks that have not started yet: copy the file to change it mid-sweep.
#SBATCH --job-name=sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1          # one task per GPU
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=01:00:00
#SBATCH --output=logs/%x-%A_%a.out   # the directory must exist: mkdir -p logs
#SBATCH --signal=B:USR2@120          # to the batch shell, which forwards it to the tasks (common.sh)
#SBATCH --requeue                    # requeues only the preempted array task
#SBATCH --open-mode=append
##SBATCH --partition=<gpu partition>
##SBATCH --account=<project account>
set -euo pipefail
if [ -z "${SLURM_JOB_ID:-}" ]; then  # started with bash on the login node
  DDPM_ROOT=${DDPM_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
fi
# sbatch runs a spooled copy of this file; the job record says where the checkout is (or set DDPM_ROOT).
: "${DDPM_ROOT:=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's|^ *Command=\(.*\)/slurm/[^/ ]*\.sh\( .*\)\{0,1\}$|\1|p;T;q')}"
# shellcheck source=slurm/common.sh
. "${DDPM_ROOT:?cannot locate the ddpm-hpc checkout: export DDPM_ROOT=/path/to/ddpm-hpc}/slurm/common.sh"

sweep=${1:?usage: sbatch --array=0-N slurm/sweep.sh SWEEP_FILE [key.sub=value ...]}
shift
if [ ! -f "$sweep" ]; then echo "error: sweep file $sweep not found (relative paths start at $PWD)" >&2; exit 2; fi
config=$(ddpm_resolve_config "${DDPM_CONFIG:-configs/mnist.yaml}")
n=$(ddpm_sweep_runs "$sweep" | wc -l)
if [ "$n" = 0 ]; then echo "error: $sweep has no run lines (one line of key.sub=value overrides per run)" >&2; exit 2; fi

run_overrides() {  # run_overrides I: the overrides of run line I, one per line
  local line
  line=$(ddpm_sweep_runs "$sweep" | sed -n "$(($1 + 1))p")
  xargs printf '%s\n' <<<"$line" 2>/dev/null ||
    { echo "error: $sweep run $1 has an unbalanced quote: $line" >&2; return 2; }
}

if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "checking the $n runs of $sweep against $config (a --dry-run each)" >&2
  for ((i = 0; i < n; i++)); do
    overrides_text=$(run_overrides "$i")
    mapfile -t overrides <<<"$overrides_text"
    "$PYTHON" -m jobs.train --config "$config" "$@" "${overrides[@]}" --dry-run >/dev/null ||
      { echo "error: run $i of $sweep is invalid (see above); fix it before submitting" >&2; exit 2; }
  done
  printf 'sbatch --array=0-%d' "$((n - 1))"; printf ' %q' "$0" "$sweep" "$@"; echo
  exit 0
fi

i=${SLURM_ARRAY_TASK_ID:-}
if [ -z "$i" ]; then echo "error: submit as an array job: sbatch --array=0-$((n - 1)) slurm/sweep.sh $sweep" >&2; exit 2; fi
if [ "$i" -ge "$n" ]; then echo "error: array index $i but $sweep has $n run lines (0-$((n - 1)))" >&2; exit 2; fi
overrides_text=$(run_overrides "$i")
mapfile -t overrides <<<"$overrides_text"
stem=$(basename "$sweep"); stem=${stem%.*}
ddpm_train "$config" "${DDPM_RUN_DIR:-runs/$stem-$SLURM_ARRAY_JOB_ID}_$i" "$@" "${overrides[@]}"
