#!/bin/bash
# One prepared check of the CUDA path on a fresh GPU machine, within a time budget:
#   bash bench/gpu_check.sh OUT_DIR [--device cuda|cpu] [--quick] [--budget-s 480] [--data-root DIR] [--classifier PATH]
#
# Steps, in this order, each logged to OUT_DIR/<step>.log, its table (if any) to OUT_DIR/<step>.md:
#   env              nvidia-smi, python, torch, CUDA, and the wheels installed from .whl/ (if that folder exists)
#   data             unpack MNIST from DATA_ROOT/MNIST/raw/*.gz if needed (jobs.prepare_data --offline)
#   cuda_tests       the CUDA-only tests (compiled sampling == eager; GPU batches == CPU batches)
#   train_1epoch     python -m jobs.train --config configs/mnist.yaml train.epochs=1
#   eval_1epoch      python -m jobs.evaluate on it: label accuracy and feature-FID at gamma 1 and 5
#   train_throughput python -m bench.train_throughput (reduced repeats)
#   sampling         python -m bench.sampling (reduced repeats)
#   sample_job       python -m bench.sample_job: jobs.sample's samples/s, 1 process vs all GPUs (torchrun)
#   end_to_end       python -m bench.mnist_end_to_end (the 20-epoch row), only if the time left allows
# A step runs only if its estimated time fits in what is left of the budget, and under `timeout` for
# the rest of it, so the script ends within --budget-s (default 480 s) whatever hangs; OUT_DIR/summary.md
# says what ran, what failed and what was skipped for lack of time. Exit status: 0 when every step that
# ran passed, 1 otherwise, 2 bad arguments.
#
# A bare machine: Python packages the project needs and the machine lacks (submitit, say) travel as wheels
# in .whl/ (git-ignored) and are installed into /tmp/site; MNIST's four .gz files and the classifier of
# jobs.train_classifier travel in DATA_ROOT (e.g. .device/data, git-ignored). --device cpu --quick is the
# CPU dry run of the same steps at smoke sizes (tests/integration/test_gpu_check.py).
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { echo "error: $1 (usage: bash bench/gpu_check.sh OUT_DIR [--device cuda|cpu] [--quick] [--budget-s S]" \
               "[--data-root DIR] [--classifier PATH])" >&2; exit 2; }
[ $# -ge 1 ] && [ "${1#--}" = "$1" ] || usage "the first argument is the output folder"
out=$1; shift
device=cuda quick="" budget=480 data=data classifier=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=${2:-}; shift 2 ;;
    --quick) quick=--quick; shift ;;
    --budget-s) budget=${2:-}; shift 2 ;;
    --data-root) data=${2:-}; shift 2 ;;
    --classifier) classifier=${2:-}; shift 2 ;;
    *) usage "unknown argument '$1'" ;;
  esac
done
case "$device" in cuda | cpu) ;; *) usage "--device must be cuda or cpu, got '$device'" ;; esac
[[ "$budget" =~ ^[0-9]+$ ]] && [ "$budget" -ge 60 ] || usage "--budget-s must be a whole number of seconds >= 60"
[ "$device" = cpu ] && [ -z "$quick" ] && usage "full sizes need a GPU; the CPU dry run is --device cpu --quick"
[ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ] && usage "$out exists and is not empty; name a new folder"
classifier=${classifier:-$data/classifiers/mnist_cnn.pt}
PYTHON=${DDPM_PYTHON:-python3}
if [ -d .whl ]; then export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"; fi
if [ "$device" = cuda ] && ! "$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  usage "--device cuda but torch sees no CUDA device here; for the CPU dry run pass --device cpu --quick"
fi
mkdir -p "$out" || usage "cannot create $out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR="$out/inductor-cache"   # cold compiles, measured as such; kept off the home dir

start=$(date +%s)
left() { echo $(( start + budget - $(date +%s) )); }
: > "$out/summary.md"
status=0
record() { printf '| %s | %s | %s s | %s |\n' "$1" "$2" "$3" "$4" >> "$out/steps.tmp"; }

# step NAME ESTIMATE_S CMD...: run CMD if ESTIMATE_S fits in the budget, under timeout for what is left.
step() {
  local name=$1 estimate=$2 t0 rc remaining
  shift 2
  remaining=$(( $(left) - 5 ))
  if [ "$remaining" -lt "$estimate" ]; then
    record "$name" "skipped: no time left" 0 "needs ~${estimate} s, ${remaining} s left"
    echo "[gpu_check] $name: skipped (needs ~${estimate} s, ${remaining} s left)"
    return 0
  fi
  echo "[gpu_check] $name ($(date +%T), ${remaining} s of budget left)"
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$remaining" "$@" > "$out/$name.log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  if [ "$rc" = 0 ]; then
    record "$name" ok "$took" "$out/$name.log"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    record "$name" "stopped at the budget" "$took" "$(tail -n 1 "$out/$name.log" | cut -c1-120)"; status=1
  else
    record "$name" "FAILED (exit $rc)" "$took" "$(tail -n 1 "$out/$name.log" | cut -c1-120)"; status=1
  fi
  # The benchmark scripts print one Markdown table: keep it beside the log.
  grep -E '^\|' "$out/$name.log" > "$out/$name.md" || rm -f "$out/$name.md"
  echo "[gpu_check] $name: exit $rc after ${took} s"
}

env_report() {  # not under timeout (a shell function): pip from local wheels, nvidia-smi and imports are quick
  if [ -d .whl ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && echo "installed from .whl/: $(ls .whl | tr '\n' ' ')"
  fi
  if command -v nvidia-smi > /dev/null; then nvidia-smi; fi
  "$PYTHON" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
      f"cuda available {torch.cuda.is_available()}" + (f" | {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
for name in ("submitit", "h5py", "tensorboard", "yaml", "matplotlib", "tqdm", "torchvision", "torch_fidelity"):
    try:
        module = __import__(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except ImportError as e:
        print(f"{name} MISSING ({e}): carry its wheel in .whl/")
EOF
}
t0=$(date +%s)
echo "[gpu_check] env"
if env_report > "$out/env.log" 2>&1; then record env ok $(( $(date +%s) - t0 )) "$out/env.log"
else record env "FAILED" $(( $(date +%s) - t0 )) "$(tail -n 1 "$out/env.log" | cut -c1-120)"; status=1; fi


step data 30 "$PYTHON" -m jobs.prepare_data --dataset mnist --root "$data" --offline
# Only the CUDA tests: the CI guard that wants SLURM tests to pass does not apply to this selection.
step cuda_tests 120 env -u DDPM_REQUIRE_SLURM "$PYTHON" -m pytest -q -p no:cacheprovider -rs -k "cuda" \
  tests/diffusion/test_compiled.py tests/data/test_datasets.py tests/evaluate/test_fidelity.py

run="$out/runs/mnist-1epoch"
length="train.epochs=1"
sizes=()
eval_sizes=(--metric-samples 1000 --steps 50)
if [ -n "$quick" ]; then
  length="train.steps=4"
  sizes=(model.hidden=8 sample.per_class=1 sample.sampler=ddim sample.steps=5 log.every=2)
  eval_sizes=(--metric-samples 20 --steps 5)
fi
step train_1epoch 90 "$PYTHON" -m jobs.train --config configs/mnist.yaml "$length" "data.root=$data" \
  "train.device=$device" log.progress=lines "${sizes[@]}" --run-dir "$run"
step eval_1epoch 60 "$PYTHON" -m jobs.evaluate "$run" --only metrics --guidance 1,5 --sampler ddim \
  "${eval_sizes[@]}" --device "$device" --classifier "$classifier" --seed 0

repeats=(--repeats 2)
step train_throughput 180 "$PYTHON" -m bench.train_throughput --device "$device" $quick "${repeats[@]}" --data-root "$data"
step sampling 150 "$PYTHON" -m bench.sampling --device "$device" $quick "${repeats[@]}"
step sample_job 120 "$PYTHON" -m bench.sample_job --device "$device" $quick --data-root "$data"
step end_to_end 150 "$PYTHON" -m bench.mnist_end_to_end --device "$device" $quick --data-root "$data" \
  --classifier "$classifier" --keep "$out/end_to_end"

{
  echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), device $device${quick:+ (quick: smoke sizes)}"
  echo
  echo "Budget ${budget} s, used $(( $(date +%s) - start )) s. Command: bash bench/gpu_check.sh $out --device $device $quick"
  echo
  echo "| step | result | time | log / last line |"
  echo "|---|---|---|---|"
  cat "$out/steps.tmp"
  for t in train_throughput sampling sample_job end_to_end; do
    if [ -f "$out/$t.md" ]; then echo; echo "## $t"; echo; cat "$out/$t.md"; fi
  done
  if [ -f "$out/eval_1epoch.log" ]; then echo; echo "## eval_1epoch"; echo; grep -E "gamma_|w_" "$out/eval_1epoch.log"; fi
} > "$out/summary.md"
rm -f "$out/steps.tmp"
cat "$out/summary.md"
exit "$status"
