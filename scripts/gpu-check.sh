#!/usr/bin/env bash
# The GPU check: runs prebuilt mmpg binaries (scripts/build-gpu-bins.sh) on a machine with an
# NVIDIA GPU and no Rust toolchain, from the repository root.
#
#   scripts/gpu-check.sh [bin-dir] [out-dir]   # defaults: gpu-bin/ and gpu-out/
#
# It prints the device, runs the backend conformance suite on `cuda` (and on `wgpu` when a Vulkan
# loader is installed, over the NVIDIA Vulkan driver), runs the quickstart three
# ways (everything on the CPU; the cloud on CUDA with devices on the CPU; everything on CUDA),
# runs `mmpg bench` on it with the cloud on CUDA (baselines and the per-backend table), and
# writes one JSON of results, gpu-check.json, with the logs and bench/ beside it.
set -uo pipefail
bin=$(realpath "${1:-gpu-bin}")
out=${2:-gpu-out}
mkdir -p "$out"
out=$(realpath "$out")
limit=${MMPG_GPU_CHECK_TIMEOUT:-180}   # seconds per step, so one hung step cannot eat the lease

# The CUDA runtime loads libcuda and libnvrtc at run time.
for dir in /usr/local/cuda/lib64 /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu; do
    [ -d "$dir" ] && export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done

seconds_since() { awk -v s="$1" -v e="$(date +%s%N)" 'BEGIN { printf "%.2f", (e - s) / 1e9 }'; }

device=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 1)
echo "device: $device"

echo "== conformance suite on cuda"
start=$(date +%s%N)
MMPG_CONFORMANCE_BACKEND=cuda timeout "$limit" "$bin/backend_conformance" --test-threads=1 --nocapture >"$out/conformance.log" 2>&1
conformance_rc=$?
conformance_s=$(seconds_since "$start")
grep -E '^\[cuda\]|test result|FAILED|panicked' "$out/conformance.log"

echo "== conformance suite on wgpu"
if ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1'; then
    start=$(date +%s%N)
    XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp} MMPG_CONFORMANCE_BACKEND=wgpu timeout "$limit" \
        "$bin/backend_conformance" --test-threads=1 --nocapture >"$out/conformance-wgpu.log" 2>&1
    wgpu_rc=$?
    wgpu_s=$(seconds_since "$start")
    grep -E '^\[wgpu\]|test result|FAILED|panicked' "$out/conformance-wgpu.log"
else
    echo "no Vulkan loader (libvulkan.so.1) on this machine: skipped" | tee "$out/conformance-wgpu.log"
    wgpu_rc=-1
    wgpu_s=0
fi

run_quickstart() { # name, backend lines
    local name=$1 backend=$2 config="$out/quickstart-$1.toml"
    awk -v b="$backend" '/^\[backend\]/{print; print b; skip=1; next} skip&&/^kind =/{skip=0; next} {print}' \
        examples/quickstart.toml >"$config"
    echo "== quickstart: $name"
    local start rc
    start=$(date +%s%N)
    timeout "$limit" "$bin/mmpg" run "$config" --report "$out/quickstart-$name.json" >"$out/quickstart-$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc wall_s=$(seconds_since "$start")" | tee -a "$out/runs.txt"
    tail -n 4 "$out/quickstart-$name.log"
}
run_quickstart cloud-cuda $'kind = "cpu"\ncloud = "cuda"'
run_quickstart cuda 'kind = "cuda"'
run_quickstart cpu 'kind = "cpu"'

# The bench on the quickstart with the cloud on CUDA: every baseline, and the backend table
# (cpu and cuda timed on this machine).
echo "== mmpg bench: quickstart, cloud on cuda"
start=$(date +%s%N)
timeout "$limit" "$bin/mmpg" bench "$out/quickstart-cloud-cuda.toml" --out "$out/bench" >"$out/bench.log" 2>&1
echo "bench rc=$? wall_s=$(seconds_since "$start")" | tee -a "$out/runs.txt"
grep -A6 '^## Backends' "$out/bench/report.md" 2>/dev/null

python3 - "$out" "$device" "$conformance_rc" "$conformance_s" "$wgpu_rc" "$wgpu_s" <<'PY'
import json, os, re, sys
out, device, rc, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
wgpu_rc, wgpu_secs = int(sys.argv[5]), float(sys.argv[6])
def suite(log_name, tag, exit_code, seconds):
    log = open(os.path.join(out, log_name)).read()
    lines = [l for l in log.splitlines() if l.startswith(f"[{tag}]") or "test result" in l or "skipped" in l]
    return {"exit_code": exit_code, "seconds": seconds, "lines": lines}
result = {"device": device, "conformance": suite("conformance.log", "cuda", rc, secs),
          "conformance_wgpu": suite("conformance-wgpu.log", "wgpu", wgpu_rc, wgpu_secs), "quickstart": {}}
walls = dict(re.findall(r"^(\S+) rc=\d+ wall_s=([\d.]+)", open(os.path.join(out, "runs.txt")).read(), re.M))
for name in ("cpu", "cloud-cuda", "cuda"):
    path = os.path.join(out, f"quickstart-{name}.json")
    if not os.path.exists(path):
        result["quickstart"][name] = {"error": open(os.path.join(out, f"quickstart-{name}.log")).read()[-2000:]}
        continue
    r = json.load(open(path))
    c = r["cloud"]
    result["quickstart"][name] = {
        "backend": r["backend"], "wall_s": float(walls.get(name, "nan")), "run_s": r["seconds"],
        "pretrain_s": c["pretrain"]["seconds"], "generator_train_s": c["generator"]["seconds"],
        "generation_ms": c["generation_ms"],
        "shifted_static": r["fleet"]["shifted_static_accuracy"], "shifted_adapted": r["fleet"]["shifted_adapted_accuracy"],
    }
bench = os.path.join(out, "bench", "report.json")
if os.path.exists(bench):
    b = json.load(open(bench))
    result["bench"] = {
        "wall_s": float(walls.get("bench", "nan")),
        "methods": {m["method"]: m["accuracy"]["mean"] for m in b["methods"]},
        "backends": b.get("backends", []),
    }
else:
    result["bench"] = {"error": open(os.path.join(out, "bench.log")).read()[-2000:]}
json.dump(result, open(os.path.join(out, "gpu-check.json"), "w"), indent=2)
print(json.dumps(result, indent=2))
PY
