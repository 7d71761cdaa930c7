#!/usr/bin/env bash
# Builds the x86-64 binaries that scripts/gpu-check.sh runs on a GPU machine with no Rust
# toolchain (CUDA and wgpu compiled in), and gathers them (stripped) into one folder to copy there.
#
#   scripts/build-gpu-bins.sh [out-dir]        # default: gpu-bin/
#
# Needs no CUDA toolkit: Burn 0.21's CUDA backend loads the driver and NVRTC at run time.
# Without nvcc, cudarc targets the newest CUDA API (13.x, driver >= 580); for CUDA 12.8
# drivers build with CUDARC_CUDA_VERSION=12080.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-bin}
target=target/cuda
# wgpu too: on the GPU machine the suite also runs over the NVIDIA Vulkan driver when present.
cargo build --features cuda,wgpu --target-dir "$target" --bin mmpg --test backend_conformance
mkdir -p "$out"
cp "$target/debug/mmpg" "$out/mmpg"
# The newest test executable of the conformance suite.
suite=$(ls -t "$target"/debug/deps/backend_conformance-* | grep -v '\.d$' | head -n 1)
cp "$suite" "$out/backend_conformance"
strip "$out/mmpg" "$out/backend_conformance"
ls -la "$out"
