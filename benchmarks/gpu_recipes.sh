#!/usr/bin/env bash
# Toward a GPU recipe at airbench94's level, after benchmarks/gpu_check.sh: variants of fastnet's
# recipes on the CIFAR-10 JPEG copy, 2 seeds each (SEEDS), printing bench's summaries:
#
#   bash benchmarks/gpu_recipes.sh [OUT_DIR]      # default OUT_DIR: ./gpu-recipes
#
# On the first H200 run (docs/benchmarks.md, *On a GPU*), `fast` stopped at 86.3 % in ~6 s and
# fast_cpu_10min reached 90.1 % in ~21 s, at a quarter of fast's images/s. These variants carry
# the CPU ablations' winners over to the GPU's batch sizes, and check that train.compile with
# progressive resizing now compiles one static graph per width (it recompiled with symbolic sizes
# and had not finished in 3.5 minutes before). Data as gpu_check.sh finds it (CIFAR10_COPY,
# CIFAR10_TAR, .data/cifar10-jpeg.tar.gz, ../shared/data/cifar10-jpeg.tar.gz). About 5 minutes on
# one H200 by estimate (not yet run on a GPU; the plumbing dry-run on a CPU, 1 seed and 1 epoch
# each on 300 images, in 55 s):
#   DEVICE=cpu SEEDS=1 EPOCHS=1 CIFAR10_COPY=SMALL_COPY bash benchmarks/gpu_recipes.sh /tmp/gpu-recipes
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-recipes}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SEEDS=${SEEDS:-2}
EPOCHS=${EPOCHS:+--epochs $EPOCHS}  # empty: each variant's own
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
source benchmarks/cifar10_copy.sh  # sets DATA
status=0
variant() {  # NAME EPOCHS_FLAG BENCH_FLAGS...: one bench, its summary (the lines after the runs) printed
  local name=$1 epochs=$2; shift 2
  echo; echo "=== $name ($(date -u +%T))"
  "$PY" -c 'import sys; from cifarlens.cli import main; sys.exit(main(["bench", *sys.argv[1:]]))' \
    --dataset cifar10 --data-dir "$DATA" --no-download --model fastnet --device "$DEVICE" ${EPOCHS:-$epochs} \
    --json "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1 || status=1
  sed -n '/^device: /,$p' "$OUT/$name.log"
}
variant muon_compiled "" --recipe fast_cpu_10min --seeds 1 --targets 0.88,0.90 --set train.compile=true
variant fast_muon_airbench_aug "" --recipe fast --seeds "$SEEDS" --targets 0.88,0.90,0.93 --set train.optimizer=muon \
  --set train.muon_lr=0.2 --set train.tta_translate=1 --set data.crop_padding=2 --set data.flip=alternating
variant muon_batch512 "" --recipe fast_cpu_10min --seeds "$SEEDS" --targets 0.88,0.90 --set train.batch_size=512 \
  --set train.lr=0.4
variant muon_10_epochs "--epochs 10" --recipe fast_cpu_10min --seeds "$SEEDS" --targets 0.88,0.90,0.91
echo; echo "=== done (exit $status) ($(date -u +%T))"
exit "$status"
