#!/usr/bin/env bash
# The GPU check of docs/benchmarks.md: clusterformer-tiny against timm's Swin-T on one CUDA
# device, batch 128 at 224 px, bf16 autocast, eager and torch.compile, inference and the AdamW
# training step, in one `cf benchmark` process (interleaved rounds, medians). Prints img/s,
# peak GiB and the speed ratio to Swin-T; writes the rows to $OUT/gpu_check.json ($OUT
# defaults to the current folder). Needs torch with CUDA and timm; installs this checkout
# without dependencies (everything `cf benchmark` imports is already there on the lent
# machines). Budget: under 8 minutes on an H100/H200, most of it compiling four graphs.
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
