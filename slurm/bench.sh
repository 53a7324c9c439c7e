#!/bin/bash
# The benchmarks of bench/ on one GPU: training throughput, sampling speed and the MNIST end-to-end run,
# each against its baseline measured in the same job. The tables land in the log, ready to paste into
# docs/PERFORMANCE.md; the job fails if any row failed.
#   mkdir -p logs && sbatch slurm/bench.sh                         # full sizes: about 30 min on an H100 (estimate)
#   sbatch slurm/bench.sh --quick                                  # smoke sizes: checks that everything runs
#   DDPM_BENCH="sampling" sbatch slurm/bench.sh                     # a subset: train_throughput sampling mnist_end_to_end
# Needs MNIST in $DDPM_DATA_ROOT/MNIST/raw (default: data; python -m jobs.prepare_data --dataset mnist --root data).
# The end-to-end run also needs the MNIST classifier of jobs.train_classifier: trained first if missing.
# The diffusers rows run only when `import diffusers` works (pip install diffusers; benchmark-only).
#SBATCH --job-name=bench
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1            # a typed GPU: --gpus-per-node=h100:1 (see `sinfo -o "%P %G"`)
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=01:30:00
#SBATCH --output=logs/%x-%j.out      # the directory must exist: mkdir -p logs
##SBATCH --exclusive                 # no neighbours on the node: steadier timings (billed as a whole node)
##SBATCH --partition=<gpu partition>
##SBATCH --account=<project account>
set -euo pipefail
# sbatch runs a spooled copy of this file; the job record says where the checkout is (or set DDPM_ROOT).
: "${SLURM_JOB_ID:?submit this script with sbatch}"
: "${DDPM_ROOT:=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's|^ *Command=\(.*\)/slurm/[^/ ]*\.sh\( .*\)\{0,1\}$|\1|p;T;q')}"
# shellcheck source=slurm/common.sh
. "${DDPM_ROOT:?cannot locate the ddpm-hpc checkout: export DDPM_ROOT=/path/to/ddpm-hpc}/slurm/common.sh"

data=${DDPM_DATA_ROOT:-data}
benches=${DDPM_BENCH:-train_throughput sampling mnist_end_to_end}
quick=""
for arg in "$@"; do
  case "$arg" in
    --quick) quick=--quick ;;
    *) echo "error: unknown argument '$arg'; slurm/bench.sh takes only --quick (choose scripts with DDPM_BENCH)" >&2
       exit 2 ;;
  esac
done
for b in $benches; do
  case "$b" in
    train_throughput | sampling | mnist_end_to_end) ;;
    *) echo "error: unknown benchmark '$b' in DDPM_BENCH; choose from: train_throughput sampling mnist_end_to_end" >&2
       exit 2 ;;
  esac
done
if [ ! -f "$data/MNIST/raw/train-images-idx3-ubyte" ]; then
  echo "error: MNIST not found in $data/MNIST/raw (relative paths start at $PWD): run 'python -m jobs.prepare_data" \
       "--dataset mnist --root $data' or set DDPM_DATA_ROOT" >&2
  exit 2
fi
device=$("$PYTHON" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
if [ "$device" = cpu ] && [ -z "$quick" ]; then
  echo "error: no CUDA device in this job (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}): full-size" \
       "benchmarks need a GPU; add --quick for a CPU smoke run, or ask for a GPU partition" >&2
  exit 2
fi
ddpm_log "job $SLURM_JOB_ID on $(hostname -s): ${benches} on $device${quick:+ (quick)}; python $(command -v "$PYTHON")"
if [ "$device" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; fi
"$PYTHON" -m pip list 2>/dev/null | grep -iE '^(torch|torchvision|diffusers|triton) ' || true

status=0
for b in $benches; do
  args=(--device "$device" $quick)
  case "$b" in
    train_throughput)
      args+=(--data-root "$data")
      if [ -z "$quick" ]; then args+=(--ablations); fi ;;
    mnist_end_to_end)
      args+=(--data-root "$data")
      if [ ! -f "$data/classifiers/mnist_cnn.pt" ]; then
        ddpm_log "no MNIST classifier in $data/classifiers: training one (python -m jobs.train_classifier)"
        srun "$PYTHON" -m jobs.train_classifier --dataset mnist --root "$data" --device "$device" || status=$?
      fi ;;
  esac
  ddpm_log "python -m bench.$b ${args[*]}"
  srun "$PYTHON" -m "bench.$b" "${args[@]}" || status=$?
done
exit "$status"
