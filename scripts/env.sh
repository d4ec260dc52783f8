# Sourced by the other scripts: repository root, build directory, CUDA on PATH.
KVC_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KVC_BUILD=${KVC_BUILD:-$KVC_ROOT/build}
# The CUDA toolkit is optional: when installed, `-Dcuda=auto` builds the CUDA
# kernels (they compile and link without a GPU; their tests then skip).
if [ -x /usr/local/cuda/bin/nvcc ] && ! command -v nvcc >/dev/null 2>&1; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
export KVC_ROOT KVC_BUILD
