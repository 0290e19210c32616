#!/usr/bin/env bash
# gpu_accuracy.sh DATA_DIR [OUT_DIR [SETTINGS_FILE]] -- the accuracy benchmark on a GPU, several
# settings at once. SETTINGS_FILE holds lines `name: cnn-gpu train options` (default: the list below).
#
# Trains the seed network for 15 epochs on Fashion-MNIST, plain and with batch norm, under a
# few optimizer settings, all in parallel on the one GPU (each run is bound by Python and
# kernel launches, so they share it well). Which setting counts is chosen per network by the
# best VALIDATION accuracy (5000 training images held out); the test accuracy is only reported.
# Prints one block per run and, last, the choice per network.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
DATA=${1:?usage: gpu_accuracy.sh DATA_DIR [OUT_DIR [SETTINGS_FILE]]}
RUNS=${2:-$(mktemp -d -t accuracy.XXXXXX)}
mkdir -p "$RUNS"
LIMIT=${ACCURACY_TIMEOUT:-420}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

declare -A SETTINGS=(
  [plain-adam-dropout-0.5]="--optimizer adam --dropout 0.5"
  [plain-sgd-0.05-dropout-0.5]="--lr 0.05 --dropout 0.5"
  [plain-adam-flips]="--optimizer adam --augment --max-shift 0"
  [bn-sgd-0.05-flips]="--batch-norm --lr 0.05 --augment --max-shift 0"
  [bn-sgd-0.05-shift1]="--batch-norm --lr 0.05 --augment --max-shift 1"
  [bn-sgd-0.05-dropout-0.3]="--batch-norm --lr 0.05 --dropout 0.3"
)
if [ -n "${3:-}" ]; then
  SETTINGS=()
  while IFS=: read -r name options; do
    [ -n "$name" ] && [ "${name:0:1}" != "#" ] && SETTINGS[$name]="$options"
  done < "$3"
fi
start=$SECONDS
for name in "${!SETTINGS[@]}"; do
  # shellcheck disable=SC2086
  timeout -k 10 "$LIMIT" python3 -m cnn_gpu.cli train --backend cupy --dataset fashion-mnist \
      --data-dir "$DATA" --epochs 15 --no-progress --out "$RUNS/$name" ${SETTINGS[$name]} \
      > "$RUNS/$name.log" 2>&1 &
done
wait
echo "accuracy runs: $((SECONDS - start)) s wall for ${#SETTINGS[@]} runs in parallel"

for name in $(printf '%s\n' "${!SETTINGS[@]}" | sort); do
  echo; echo "=== $name: cnn-gpu train --backend cupy --epochs 15 ${SETTINGS[$name]}"
  grep -E "^(settings|epoch|done|final|best|cnn-gpu: error)|Error" "$RUNS/$name.log" | tail -20
done

python3 - "$RUNS" <<'PY'
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
# A run's group is the first of these its name starts with; the choice is made within a group.
# full-* runs train on all 60000 training images (--val-size 0): no validation, the last epoch counts.
GROUPS = ("mnist-plain", "mnist-bn", "full-plain", "full-bn", "seeds-plain", "seeds-bn", "plain", "bn")
def group_of(name):
    return next((g for g in GROUPS if name.startswith(g + "-")), "other")
print("\n=== chosen by validation accuracy (the test column is reported, not used)")
for net in GROUPS + ("other",):
    best = None
    for hist in sorted(runs.glob("*/history.json")):
        if group_of(hist.parent.name) != net:
            continue
        records = json.loads(hist.read_text())
        seconds = sum(r["seconds"] for r in records)
        if "val_accuracy" not in records[-1]:
            print(f"{net:11s} {hist.parent.name:34s} no validation: last epoch {records[-1]['epoch']:2d} "
                  f"test {records[-1]['test_accuracy']:.4f} ({seconds:.0f} s)")
            continue
        top = max(records, key=lambda r: r["val_accuracy"])
        row = (top["val_accuracy"], hist.parent.name, top["epoch"], top["test_accuracy"], records[-1]["test_accuracy"],
               seconds)
        print(f"{net:11s} {row[1]:34s} best val {row[0]:.4f} at epoch {row[2]:2d}: test {row[3]:.4f}"
              f" (last epoch test {row[4]:.4f}, {len(records)} epochs, {row[5]:.0f} s)")
        best = max(best, row) if best else row
    if best and not net.startswith("seeds"):  # other seeds of a chosen recipe: reported, not chosen
        print(f"{net:11s} CHOSEN {best[1]}: test accuracy {best[3]:.4f} (val {best[0]:.4f}, epoch {best[2]})")
PY
