#!/usr/bin/env bash
# gpu_check.sh -- the one device check for a GPU machine, in a single call of < 8 minutes.
#
# Prints the device and library versions, runs the GPU tests (pytest -m gpu), the kernel
# bandwidth benchmark (float32), the fair benchmark against PyTorch (`cnn-gpu bench --backend
# cupy`: FP32 and TF32 tables, eager and CUDA-graph captured steps on both sides, the loss check;
# bench.json) and the epoch-time check of the seed network (cnn_gpu.bench.epoch: captured epochs
# with validation against the 0.5 s target; epoch.json). Needs only what the machine has: python3
# with numpy, cupy, pytest (torch optional); installs nothing. Logs go to $OUT when set (else a
# temporary folder); a summary table ends it. One failing stage does not stop the others; the
# exit status is 0 only if none failed.
#
#   bash scripts/gpu_check.sh            # from anywhere; it works in the repository root
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
LOGS="${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$LOGS"
echo "gpu_check: logs in $LOGS"

# Per-stage limits (seconds), 455 s in all, inside the call's 8 minutes.
T_INFO=20 T_TESTS=220 T_CLI=140 T_EPOCH=35 T_BENCH=40

# With ACCURACY_DATA=<dir holding fashion-mnist/>, the accuracy runs (scripts/gpu_accuracy.sh,
# with the settings file ACCURACY_SETTINGS if given) train on the GPU while the tests run, and
# finish before the timing stages start. SKIP_TIMING=1 leaves out the three timing stages.
ACC_PID=""
if [ -n "${ACCURACY_DATA:-}" ]; then
    echo "gpu_check: accuracy runs started in the background (data in $ACCURACY_DATA)"
    bash scripts/gpu_accuracy.sh "$ACCURACY_DATA" "$LOGS/accuracy" ${ACCURACY_SETTINGS:+"$ACCURACY_SETTINGS"} \
        > "$LOGS/accuracy.log" 2>&1 &
    ACC_PID=$!
fi

STAGES=() CODES=() SECONDS_TAKEN=()
run_stage() {  # run_stage NAME LIMIT LOGFILE COMMAND...
    local name=$1 limit=$2 log=$3
    shift 3
    echo
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$LOGS/$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "gpu_check: $name timed out after ${limit}s" | tee -a "$LOGS/$log"
    STAGES+=("$name") CODES+=("$rc") SECONDS_TAKEN+=($((SECONDS - start)))
}

device_info() {
    nvidia-smi -L || echo "nvidia-smi not available"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
        --format=csv 2>/dev/null
    python3 - <<'PY'
import platform
import numpy, cupy
print(f"python {platform.python_version()}, numpy {numpy.__version__}, cupy {cupy.__version__}")
dev = cupy.cuda.Device()
props = cupy.cuda.runtime.getDeviceProperties(dev.id)
name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
print(f"device {dev.id}: {name}, compute capability {dev.compute_capability}, "
      f"{props.get('multiProcessorCount', '?')} SMs, "
      f"{props.get('totalGlobalMem', 0) / 2**30:.1f} GiB, "
      f"L2 {props.get('l2CacheSize', 0) / 2**20:.0f} MiB")
print(f"CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, "
      f"driver {cupy.cuda.runtime.driverGetVersion()}, NVRTC {cupy.cuda.nvrtc.getVersion()}")
for mod in ("pytest", "torch"):
    try:
        print(f"{mod} {__import__(mod).__version__}")
    except ImportError:
        print(f"{mod} not installed")
from cnn_gpu.backend import cupy_unavailable_reason
print("cnn_gpu backend:", cupy_unavailable_reason() or "cupy usable")
PY
}

export -f device_info
run_stage "device" "$T_INFO" device.log bash -c device_info
run_stage "pytest -m gpu" "$T_TESTS" pytest.log \
    python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests
if [ -n "$ACC_PID" ]; then
    echo; echo "=== waiting for the accuracy runs before timing anything"
    wait "$ACC_PID"; echo "accuracy runs ended with status $?"
    sed -n '/=== chosen/,$p' "$LOGS/accuracy.log"
fi
if [ -n "${SKIP_TIMING:-}" ]; then
    echo; echo "=== timing stages skipped (SKIP_TIMING)"
else
# The fair benchmark prints a line per row as it goes and rewrites bench.json after each, so a
# stage cut short by its limit still leaves the rows it measured (FP32 first, then TF32).
run_stage "fair bench" "$T_CLI" cli.log \
    python3 -m cnn_gpu.cli bench --backend cupy --repeats 3 --inner 10 --warmup 2 --json "$LOGS/bench.json"
run_stage "epoch time" "$T_EPOCH" epoch.log \
    python3 -m cnn_gpu.bench.epoch --epochs 3 --json "$LOGS/epoch.json" ${ACCURACY_DATA:+--data-dir "$ACCURACY_DATA"}
run_stage "kernel bandwidth" "$T_BENCH" bench.log \
    python3 -m cnn_gpu.bench.kernel_bandwidth --dtype float32
fi

failed=0
for code in "${CODES[@]}"; do
    case $code in 0|skipped) ;; *) failed=1 ;; esac
done
{
    echo
    echo "=== summary ($(date -u +%FT%TZ)), logs in $LOGS"
    printf '%-18s %-10s %s\n' stage result seconds
    for i in "${!STAGES[@]}"; do
        case ${CODES[$i]} in
            0) result=ok ;;
            skipped) result=skipped ;;
            124) result=TIMEOUT ;;
            *) result="FAIL(${CODES[$i]})" ;;
        esac
        printf '%-18s %-10s %s\n' "${STAGES[$i]}" "$result" "${SECONDS_TAKEN[$i]}"
    done
    echo "pytest: $(grep -E '(passed|failed|skipped|error)' "$LOGS/pytest.log" 2>/dev/null | tail -1)"
} | tee "$LOGS/summary.txt"
exit "$failed"
