#!/bin/bash
# Prepares here what bench/gpu_check.sh needs on a bare lent GPU machine (its own Python 3.12 and torch, no
# internet), in the two git-ignored folders that the device call carries:
#   .whl/          wheels of the packages the image lacks, pinned, pure Python: submitit, torch-fidelity,
#                  diffusers (its benchmark rows) and diffusers' declared needs importlib-metadata and zipp
#   .device/data/  MNIST's four .gz files in MNIST/raw/ (unpacked there by the check's data step) and the
#                  MNIST classifier of jobs.train_classifier in classifiers/ (with its test-set statistics)
#     bash bench/device_bundle.sh            # then the device call of docs/PERFORMANCE.md
# MNIST comes from ${DDPM_SHARED:-../shared}/data/mnist; the classifier is copied from data/classifiers/ when
# it is there, else trained on a temporary unpacked copy (about 2 minutes on 2 CPU cores). It ends by
# checking that everything a call carries (the tree that travels, .whl, .device) stays well under 64 MiB.
# Exit status: 0 ready, 1 a step failed (the line above says which).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(submitit==1.5.4 torch-fidelity==0.4.0 diffusers==0.42.1 importlib-metadata==8.7.0 zipp==3.23.0)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)   # the machine's: x86-64, glibc
LIMIT_MIB=48              # of the 64 MiB a call carries: room for the code to grow
MNIST_GZ=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
PYTHON=${DDPM_PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
shared=${DDPM_SHARED:-../shared}
fail() { echo "error: $1" >&2; exit 1; }

# One version of each package: two would stop the whole install there.
rm -rf .whl && mkdir .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]/#/--platform=}" -d .whl "${WHEELS[@]}" || fail "pip could not download ${WHEELS[*]}"

mkdir -p .device/data/MNIST/raw .device/data/classifiers
for f in "${MNIST_GZ[@]}"; do
  [ -f "$shared/data/mnist/$f" ] || fail "$shared/data/mnist/$f not found (set DDPM_SHARED)"
  install -m 644 "$shared/data/mnist/$f" .device/data/MNIST/raw/   # writable: the data step unpacks beside it
done

clf=.device/data/classifiers/mnist_cnn.pt
if [ -f data/classifiers/mnist_cnn.pt ]; then
  cp data/classifiers/mnist_cnn.pt data/classifiers/mnist_cnn.test_stats.npz .device/data/classifiers/ 2>/dev/null \
    || cp data/classifiers/mnist_cnn.pt "$clf"
elif [ ! -f "$clf" ]; then
  # Trained on an unpacked copy outside the bundle: the unpacked files (55 MB) must not travel.
  tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp/MNIST/raw" && cp .device/data/MNIST/raw/*.gz "$tmp/MNIST/raw/"
  "$PYTHON" -m jobs.prepare_data --dataset mnist --root "$tmp" --offline > /dev/null || fail "could not unpack MNIST"
  "$PYTHON" -m jobs.train_classifier --dataset mnist --root "$tmp" --out "$clf" || fail "could not train the classifier"
fi

# What a call carries: the files git would send (tracked, and untracked but not ignored) plus .whl and .device.
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
bundle=$(du -cb .whl .device | tail -n 1 | cut -f1)
mib() { echo "$(( ($1 + 1048575) / 1048576 )) MiB"; }
echo "wheels: $(ls .whl | tr '\n' ' ')($(mib "$(du -cb .whl | tail -n 1 | cut -f1)"))"
echo "data: $(find .device -type f | sort | tr '\n' ' ')($(mib "$(du -cb .device | tail -n 1 | cut -f1)"))"
echo "a device call carries $(mib $(( tree + bundle ))): the tree $(mib "$tree"), the bundle $(mib "$bundle")"
[ $(( tree + bundle )) -le $(( LIMIT_MIB * 1048576 )) ] || fail "that is over ${LIMIT_MIB} MiB of the 64 a call may carry"
{ git check-ignore -q .whl && git check-ignore -q .device; } || fail ".whl and .device must be git-ignored (.gitignore), or they travel twice"
echo "ready: carry [\".whl\", \".device\"] (docs/PERFORMANCE.md, 'The one prepared GPU check')"
