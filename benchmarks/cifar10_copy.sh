# Sourced by gpu_check.sh and gpu_recipes.sh (from the repository root): sets DATA to an extracted
# CIFAR-10 JPEG copy, the first found of CIFAR10_COPY=DIR, CIFAR10_TAR=FILE,
# .data/cifar10-jpeg.tar.gz (a git-ignored copy to carry to a device machine) and
# ../shared/data/cifar10-jpeg.tar.gz; exits with 2 and one line when there is none.
DATA=${CIFAR10_COPY:-}
if [ -z "$DATA" ]; then
  TAR=${CIFAR10_TAR:-}
  for candidate in .data/cifar10-jpeg.tar.gz ../shared/data/cifar10-jpeg.tar.gz; do
    [ -z "$TAR" ] && [ -f "$candidate" ] && TAR=$candidate
  done
  [ -n "$TAR" ] || { echo "no CIFAR-10 copy: set CIFAR10_COPY=DIR or CIFAR10_TAR=FILE"; exit 2; }
  DATA=$(mktemp -d)
  tar -xzf "$TAR" -C "$DATA" || { echo "could not extract $TAR"; exit 2; }
fi
