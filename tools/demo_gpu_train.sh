#!/usr/bin/env bash
# The GPU run that makes the shipped demo model: trains (tools/demo_train.py, ~5 min on one H200), scores it
# against models/demo, and leaves in $OUT/demo the safetensors shards plus demo_files.tar (every other file of
# the checkpoint folder), because a run may bring back only a few files of < 16 MiB each. Install with
#   rm -f models/demo/* && cp $FILES/demo/*.safetensors models/demo/ && tar -xf $FILES/demo/demo_files.tar -C models/demo
# Needs tools/demo_data (python -m tools.demo_data). Extra arguments go to the trainer, e.g. for a CPU dry run:
#   OUT=/tmp/out bash tools/demo_gpu_train.sh --device cpu --max-minutes 0.5 --batch-size 4 --seq-len 128
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder that receives the checkpoint}
PY=$(command -v python || command -v python3)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT/demo"
PYTHONPATH=$PWD "$PY" -u -m tools.demo_train --out "$WORK/demo" --compare-with models/demo "$@" 2>&1 | tee "$OUT/train.log"
cp "$WORK/demo"/*.safetensors "$OUT/demo/"
tar -C "$WORK/demo" --exclude='*.safetensors' -cf "$OUT/demo/demo_files.tar" .
for f in "$OUT"/demo/* "$OUT/train.log"; do
    size=$(stat -c %s "$f")
    [ "$size" -lt $((16 << 20)) ] || echo "WARNING: $f is $size bytes, over the 16 MiB a run brings back"
done
ls -l "$OUT/demo"
