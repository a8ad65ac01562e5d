#!/usr/bin/env bash
# The GPU check of docs/benchmarks.md: clusterformer-tiny against timm's Swin-T on one CUDA
# device, batch 128 at 224 px, bf16 autocast, eager and torch.compile, inference and the AdamW
# training step, in one `cf benchmark` process (interleaved rounds, medians). Prints img/s,
# peak GiB and the speed ratio to Swin-T; writes the rows to $OUT/gpu_check.json ($OUT
# defaults to the current folder). Needs torch with CUDA and timm; installs this checkout
# without dependencies (everything `cf benchmark` imports is already there on the lent
# machines). Budget: under 8 minutes on an H100/H200, most of it compiling four graphs.
#
# With more than one GPU it then measures data-parallel scaling: `cf train` end to end under
# torchrun on 1 GPU and on all of them (benchmarks/bench_scaling.py, interleaved rounds, the
# same per-GPU batch), printing img/s and the ratio to one GPU; rows in $OUT/gpu_scaling.json.
# SCALING=0 skips it.
#
#   bash benchmarks/gpu_check.sh            # MODE=infer or MODE=train to halve the time
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-.}
MODE=${MODE:-both}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')"
"$PY" -c "import timm" 2>/dev/null || { echo "gpu_check: needs timm (pip install timm)" >&2; exit 1; }
"$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
"$PY" -m clusterformer.cli benchmark --device cuda --amp bf16 --compile --mode "$MODE" \
    --batch-size 128 --image-size 224 --rounds 10 --warmup 3 --no-memory \
    --model clusterformer-tiny --model timm/swin_tiny_patch4_window7_224 \
    --baseline timm/swin_tiny_patch4_window7_224 --out "$OUT/gpu_check.json"
"$PY" - "$OUT/gpu_check.json" <<'PYEOF'
import json, sys
doc = json.load(open(sys.argv[1]))
print(f"{doc['machine'].get('gpu')}, torch {doc['machine']['torch']}, timm {doc['machine'].get('timm')}")
for r in doc["rows"]:
    kind = "compiled" if r["compiled"] else "eager"
    print(f"{r['mode']:5} {kind:8} {r['model']:35} {r['img_per_s']:8.1f} img/s "
          f"{r['peak_mem_mib'] / 1024:6.2f} GiB  x{r['speed_vs_baseline']:.2f} Swin-T eager "
          f"(warm-up {r['warmup_s']:.0f} s)")
PYEOF
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "${SCALING:-1}" != 0 ] && [ "$GPUS" -gt 1 ]; then
    "$PY" benchmarks/bench_scaling.py --device cuda --procs 1 "$GPUS" --rounds 2 --steps 60 \
        --skip 20 --model clusterformer-tiny --image-size 224 --batch-size 64 --amp bf16 \
        --workers 4 --threads 4 --num-images 8192 --json "$OUT/gpu_scaling.json"
else
    echo "gpu_check: $GPUS GPU(s): no multi-GPU scaling to measure"
fi
