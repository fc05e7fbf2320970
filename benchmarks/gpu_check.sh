#!/usr/bin/env bash
# The GPU checks of fast training, as one script for a machine with a CUDA GPU:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # default OUT_DIR: ./gpu-check
#
# 1. the CUDA tests (`pytest -m gpu`: they skip everywhere else);
# 2. Fashion-MNIST time-to-accuracy, real data and real learning: fastnet + fast, 3 seeds;
# 3. throughput on data of CIFAR-10's shape: 50,000 + 10,000 synthetic 32x32 RGB images
#    written in the official cifar-10-batches-py/ layout (their accuracy means nothing, their
#    images per second and memory do), fastnet + fast, 10 epochs, eager and with torch.compile
#    (bench compiles in an untimed warm-up run first).
# Every step prints the device; logs and JSON summaries go to OUT_DIR. It runs this checkout's
# cifarlens (src/ first on PYTHONPATH) and needs its core dependencies, pytest, and the Fashion-MNIST
# IDX files in FASHION_MNIST (default /usr/share/datasets/fashion-mnist). About 5-8 minutes
# on one H100/H200 by our estimate; not yet run on one (no GPU was lent where it was written).
# With real CIFAR-10/100 in ./data, the README's `cifarlens bench --dataset cifar10 ...`
# commands are the ones to run for CIFAR figures. For a dry run of the plumbing on a CPU:
#   DEVICE=cpu SEEDS=1 EPOCHS=1 N_PER_BATCH=100 N_TEST=100 FASHION_MNIST=DIR bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
PY=${PYTHON:-python3}
FM=${FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
DEVICE=${DEVICE:-cuda}
SEEDS=${SEEDS:-3}
EPOCHS=${EPOCHS:+--epochs $EPOCHS}  # empty: the recipe's
N_PER_BATCH=${N_PER_BATCH:-10000}  # synthetic CIFAR-10: 5 training batches of this many images
N_TEST=${N_TEST:-10000}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's cifarlens
mkdir -p "$OUT"
status=0
step() { echo; echo "=== $* ($(date -u +%T))"; }
bench() { "$PY" -c 'import sys; from cifarlens.cli import main; sys.exit(main(["bench", *sys.argv[1:]]))' "$@"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "available:", torch.cuda.is_available())' \
  | tee -a "$OUT/device.txt"

step "CUDA tests"
# the modules that hold them (collecting all of tests/ would import the web, tune and browser test deps)
"$PY" -m pytest -q -m gpu -rs tests/test_gpu.py tests/test_engine.py tests/test_distributed.py 2>&1 | tee "$OUT/tests.txt" || status=1

step "Fashion-MNIST, fastnet + fast, $SEEDS seeds"
bench --dataset fashion-mnist --data-dir "$FM" --no-download --model fastnet --recipe fast --device "$DEVICE" $EPOCHS \
  --seeds "$SEEDS" --targets 0.90,0.92,0.93,0.94 --json "$OUT/fashion_mnist.json" 2>&1 | tee "$OUT/fashion_mnist.txt" || status=1

step "CIFAR-10-shaped synthetic data, fastnet + fast, eager and compiled"
SYN=$(mktemp -d)
"$PY" -c 'import sys; sys.path.insert(0, "tests"); from conftest import make_cifar10; make_cifar10(sys.argv[1], n_train_per_batch=int(sys.argv[2]), n_test=int(sys.argv[3]))' \
  "$SYN" "$N_PER_BATCH" "$N_TEST" \
  || status=1
for compile in false true; do
  bench --dataset cifar10 --data-dir "$SYN" --no-download --model fastnet --recipe fast --device "$DEVICE" $EPOCHS \
    --seeds 1 --targets 0.5 --set "train.compile=$compile" --json "$OUT/cifar_shaped_compile_$compile.json" 2>&1 \
    | tee "$OUT/cifar_shaped_compile_$compile.txt" || status=1
done
rm -rf "$SYN"

step "done (exit $status)"
exit "$status"
