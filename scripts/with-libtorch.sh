#!/usr/bin/env bash
# Runs a command with LibTorch available for mmpg's `tch` backend (burn-tch 0.21 → tch 0.22 →
# PyTorch 2.9.0), taken from a Python venv's `torch` package: torch-sys never downloads LibTorch.
#
#   scripts/with-libtorch.sh cargo build --features tch
#   MMPG_CONFORMANCE_BACKEND=tch scripts/with-libtorch.sh \
#       cargo test --features tch --test backend_conformance -- --test-threads=1
#
# The first call creates the venv (`pip install torch==2.9.0` from PyPI: ~4.5 GB download, ~6.7 GB
# on disk). MMPG_LIBTORCH_VENV picks its folder (default .venv-libtorch in the repository).
# Builds go to target/tch unless CARGO_TARGET_DIR says otherwise, so the default build's target
# is not rebuilt with other Burn features.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${MMPG_LIBTORCH_VENV:-$repo/.venv-libtorch}"
want="2.9.0"

have_torch() {
  [ -x "$venv/bin/python" ] &&
    "$venv/bin/python" -W ignore -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$want')" 2>/dev/null
}

if ! have_torch; then
  echo "with-libtorch: installing torch==$want into $venv (once; ~4.5 GB from PyPI)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --no-cache-dir "torch==$want"
  have_torch || { echo "with-libtorch: torch $want did not install into $venv" >&2; exit 2; }
fi

torch_lib="$("$venv/bin/python" -W ignore -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export VIRTUAL_ENV="$venv"
export PATH="$venv/bin:$PATH"
# torch-sys: link against the venv's torch instead of downloading LibTorch.
export LIBTORCH_USE_PYTORCH=1
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target/tch}"
exec "$@"
