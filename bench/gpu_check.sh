#!/bin/bash
# One prepared check of the CUDA path on a GPU machine lent for minutes, within a time budget:
#   bash bench/gpu_check.sh OUT_DIR [--device cuda|cpu] [--quick] [--budget-s 540] [--data-root DIR]
#                           [--classifier PATH] [--work DIR] [--steps LIST]
#
# Steps, most needed first (--steps LIST runs only the named ones, comma-separated; env always runs):
#   env              nvidia-smi; python, torch, torchvision, CUDA, driver and GPU; which packages import
#   data             unpack MNIST from DATA_ROOT/MNIST/raw/*.gz if needed (jobs.prepare_data --offline)
#   cuda_tests       the CUDA-only tests (compiled sampling == eager, GPU batches == CPU batches, Inception)
#   train_1epoch     python -m jobs.train --config configs/mnist.yaml train.epochs=1
#   eval_1epoch      python -m jobs.evaluate on it: label accuracy and feature-FID at gamma 1 and 5
#   train_throughput python -m bench.train_throughput --check: MNIST course recipe vs ours, CIFAR diffusers
#                    bf16 vs ours at batch 128
#   sampling         python -m bench.sampling --check: course loop / diffusers vs ours, eager and CUDA graphs
#   sample_job       python -m bench.sample_job: jobs.sample's samples/s (one process; P on P >= 2 GPUs)
#   end_to_end       python -m bench.mnist_end_to_end (the 20-epoch rows), only if the time left allows
# Budget: a step starts only if its estimate fits in what is left of --budget-s (default 540 s), and runs
# under `timeout` for at most twice its estimate and what is left, so the script ends within the budget
# whatever hangs. The benchmarks add each row to the results the moment it is measured (bench/tables.py):
# a step stopped at its cap keeps the rows it measured.
#
# OUT_DIR (new or empty) gets three files and nothing else, rewritten after every step (a lent machine
# returns at most 8 files and no folders): summary.md (versions, what ran, failed or was skipped, every
# table), results.json (the same, machine-readable) and logs.tar.gz (the step logs; the 1-epoch run's
# metrics, evaluation and grids). Step logs, run dirs and the compile cache stay in the work dir (--work,
# new or empty; default a new folder under ${TMPDIR:-/tmp}), which is kept. Paths are relative to the
# repository root. Exit status: 0 when every step that ran passed, 1 otherwise, 2 bad arguments (nothing
# written).
#
# A bare machine: Python packages it lacks travel as wheels in .whl/ (git-ignored; installed into WORK/site
# with --device cuda), MNIST's four .gz files and the classifier of jobs.train_classifier in DATA_ROOT (e.g.
# .device/data, git-ignored): bash bench/device_bundle.sh prepares both, docs/PERFORMANCE.md has the device
# command. --device cpu --quick is the CPU dry run of the same steps at smoke sizes
# (tests/integration/test_gpu_check.py); for that test only, DDPM_GPU_CHECK_STUB='STEP=COMMAND' runs COMMAND
# (with bash -c) in place of STEP's own, to stop a step that has measured a row.
set -uo pipefail
cd "$(dirname "$0")/.."

STEPS=(data cuda_tests train_1epoch eval_1epoch train_throughput sampling sample_job end_to_end)
# Seconds a step is expected to take: on one H100/H200 (guesses from the FLOP counts and typical cold-compile
# times, until a GPU run replaces them; through sampling they fill the default budget), and in the CPU dry run
# (--quick on 2 cores: 3x what was measured). A step may run twice its estimate.
declare -A GPU_EST=([data]=15 [cuda_tests]=100 [train_1epoch]=75 [eval_1epoch]=30 [train_throughput]=150
                    [sampling]=120 [sample_job]=75 [end_to_end]=400)
declare -A CPU_EST=([data]=10 [cuda_tests]=30 [train_1epoch]=30 [eval_1epoch]=30 [train_throughput]=60
                    [sampling]=60 [sample_job]=60 [end_to_end]=90)
KILL_AFTER=5                    # seconds between timeout's TERM and its KILL
RESERVE=$(( KILL_AFTER + 5 ))   # kept back from every step: a kill, and the report after it

usage() { echo "error: $1 (usage: bash bench/gpu_check.sh OUT_DIR [--device cuda|cpu] [--quick] [--budget-s S]" \
               "[--data-root DIR] [--classifier PATH] [--work DIR] [--steps LIST])" >&2; exit 2; }
[ $# -ge 1 ] && [ "${1#--}" = "$1" ] || usage "the first argument is the output folder"
command_line="bash bench/gpu_check.sh $*"
out=$1; shift
device=cuda quick="" budget=540 data=data classifier="" work="" selected=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=${2:-}; shift 2 ;;
    --quick) quick=--quick; shift ;;
    --budget-s) budget=${2:-}; shift 2 ;;
    --data-root) data=${2:-}; shift 2 ;;
    --classifier) classifier=${2:-}; shift 2 ;;
    --work) work=${2:-}; shift 2 ;;
    --steps) selected=${2:-}; shift 2 ;;
    *) usage "unknown argument '$1'" ;;
  esac
done
case "$device" in cuda | cpu) ;; *) usage "--device must be cuda or cpu, got '$device'" ;; esac
[[ "$budget" =~ ^[0-9]+$ ]] && [ "$budget" -ge 30 ] || usage "--budget-s must be a whole number of seconds >= 30"
[ "$device" = cpu ] && [ -z "$quick" ] && usage "full sizes need a GPU; the CPU dry run is --device cpu --quick"
for s in ${selected//,/ }; do
  [[ " env ${STEPS[*]} " == *" $s "* ]] || usage "unknown step '$s' in --steps; choose from: ${STEPS[*]}"
done
for dir in "$out" "$work"; do
  [ -n "$dir" ] && [ -e "$dir" ] && [ -n "$(ls -A "$dir" 2>/dev/null)" ] && usage "$dir exists and is not empty; name a new folder"
done
classifier=${classifier:-$data/classifiers/mnist_cnn.pt}
PYTHON=${DDPM_PYTHON:-python3}
if [ "$device" = cuda ] && ! "$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  usage "--device cuda but torch sees no CUDA device here; for the CPU dry run pass --device cpu --quick"
fi
mkdir -p "$out" || usage "cannot create $out"
if [ -n "$work" ]; then mkdir -p "$work" || usage "cannot create $work"; else work=$(mktemp -d "${TMPDIR:-/tmp}/ddpm-gpu-check.XXXXXX"); fi
out=$(cd "$out" && pwd) work=$(cd "$work" && pwd)
mkdir -p "$work/logs" "$work/runs"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR="$work/inductor-cache"   # cold compiles, measured as such; off the home dir
export DDPM_BENCH_RESULTS="$work/rows.jsonl"              # every benchmark row, as it is measured
run="$work/runs/mnist-1epoch"

start=$(date +%s)
status=0
left() { echo $(( start + budget - $(date +%s) )); }
say() { echo "[gpu_check $(date +%T)] $*"; }

# record NAME RESULT SECONDS NOTE: one line of steps.tsv, then OUT's three files again.
record() {
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(printf '%s' "$4" | tr '\t\r\n' '   ' | cut -c1-160)" >> "$work/steps.tsv"
  "$PYTHON" -m bench.gpu_check_report write "$work" "$out" --run "$run" --budget "$budget" --started "$start" \
    --command "$command_line" || { say "error: the report could not be written"; status=1; }
}

# The env step: the wheels (a bare GPU image lacks some packages), then the versions (bench.gpu_check_report).
env_step() {
  local wheels=()
  if [ "$device" = cuda ] && compgen -G ".whl/*.whl" > /dev/null; then
    export PYTHONPATH="$work/site:$PYTHONPATH"
    timeout 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$work/site" .whl/*.whl || return 1
    wheels=(.whl/*.whl)
  fi
  timeout 120 "$PYTHON" -m bench.gpu_check_report env "$work" "${wheels[@]##*/}"
}

# The command of each step, in the array cmd.
command_of() {
  local sizes tests=(tests/diffusion/test_compiled.py tests/data/test_datasets.py tests/evaluate/test_fidelity.py)
  case "$1" in
    data) cmd=("$PYTHON" -m jobs.prepare_data --dataset mnist --root "$data" --offline) ;;
    # Only the CUDA tests: the CI guard that wants SLURM tests to pass does not apply to this selection; in one
    # process (-o addopts= drops setup.cfg's two pytest-xdist workers: the GPU image has no xdist).
    cuda_tests) cmd=(env -u DDPM_REQUIRE_SLURM "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts= -m "not slow" -rs
                     -k cuda "${tests[@]}") ;;
    train_1epoch)
      sizes=(train.epochs=1)
      [ -n "$quick" ] && sizes=(train.steps=4 model.hidden=8 sample.per_class=1 sample.sampler=ddim sample.steps=5 log.every=2)
      cmd=("$PYTHON" -m jobs.train --config configs/mnist.yaml "data.root=$data" "train.device=$device" log.progress=lines
           "${sizes[@]}" --run-dir "$run") ;;
    eval_1epoch)
      cmd=("$PYTHON" -m jobs.evaluate "$run" --only metrics --guidance 1,5 --sampler ddim --device "$device"
           --classifier "$classifier" --seed 0)
      if [ -n "$quick" ]; then cmd+=(--metric-samples 20 --steps 5); else cmd+=(--metric-samples 1000 --steps 50); fi ;;
    train_throughput) cmd=("$PYTHON" -m bench.train_throughput --device "$device" $quick --check --data-root "$data") ;;
    sampling) cmd=("$PYTHON" -m bench.sampling --device "$device" $quick --check) ;;
    sample_job) cmd=("$PYTHON" -m bench.sample_job --device "$device" $quick --data-root "$data") ;;
    end_to_end) cmd=("$PYTHON" -m bench.mnist_end_to_end --device "$device" $quick --data-root "$data"
                     --classifier "$classifier" --keep "$work/end_to_end") ;;
  esac
  local stub=${DDPM_GPU_CHECK_STUB:-}
  if [ "${stub%%=*}" = "$1" ]; then cmd=(bash -c "${stub#*=}"); fi
}

# run_step NAME: run it if its estimate fits in the budget, under timeout for its cap or what is left.
run_step() {
  local name=$1 estimate remaining limit why t0 rc took last
  if [ "$device" = cuda ]; then estimate=${GPU_EST[$name]}; else estimate=${CPU_EST[$name]}; fi
  remaining=$(( $(left) - RESERVE ))
  if [ "$remaining" -lt "$estimate" ]; then
    say "$name: skipped (needs ~${estimate} s, ${remaining} s left)"
    record "$name" "skipped: no time left" 0 "needs ~${estimate} s, ${remaining} s left"
    return
  fi
  limit=$(( 2 * estimate )) why="its cap (twice its estimate)"
  if [ "$remaining" -lt "$limit" ]; then limit=$remaining why="the budget"; fi
  command_of "$name"
  say "$name: up to ${limit} s"
  t0=$(date +%s)
  timeout --signal=TERM --kill-after="$KILL_AFTER" "$limit" "${cmd[@]}" > "$work/logs/$name.log" 2>&1
  rc=$? took=$(( $(date +%s) - t0 ))
  # The note: the log's last line that is not part of a table (a test summary, an error).
  last=$(grep -v -e '^\s*$' -e '^|' "$work/logs/$name.log" | tail -n 1)
  if [ "$rc" = 0 ]; then
    record "$name" ok "$took" "$last"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ] || [ "$took" -ge "$limit" ]; then  # a job may exit 75 on the TERM
    record "$name" "stopped at $why" "$took" "$last"; status=1
  else
    record "$name" "FAILED (exit $rc)" "$took" "$last"; status=1
  fi
  say "$name: exit $rc after ${took} s"
}

say "env (work dir $work)"
t0=$(date +%s)
if env_step > "$work/logs/env.log" 2>&1; then record env ok $(( $(date +%s) - t0 )) "$(tail -n 1 "$work/logs/env.log")"
else record env FAILED $(( $(date +%s) - t0 )) "$(tail -n 1 "$work/logs/env.log")"; status=1; fi
for name in "${STEPS[@]}"; do
  if [ -n "$selected" ] && [[ ",$selected," != *",$name,"* ]]; then record "$name" "not selected (--steps)" 0 ""
  else run_step "$name"; fi
done

cat "$out/summary.md"
say "done in $(( $(date +%s) - start )) s: $out (summary.md, results.json, logs.tar.gz); work files kept in $work"
exit "$status"
