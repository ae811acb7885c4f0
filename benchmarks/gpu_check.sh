#!/usr/bin/env bash
# One command for a CUDA machine with a fresh checkout: set up what is needed (README's set-up,
# scripts/setup.sh, once) and print, in about 5 minutes:
#   - fp32 and fp16 frames per second at 640x480 for every method (ViT-B-16, random weights;
#     pnp_ovss with a tiny random BLIP), with each method's end-to-end / bare-forward ratio
#     (ovss-bench: one run per group of methods and precision);
#   - the vocabulary-change gap (benchmarks/vocabulary_change_gap.py on the GPU, 1 round);
#   - the GPU's name and memory (nvidia-smi, and torch's peak per ovss-bench run).
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#
# Refuses with exit status 2 and one line on stderr where no CUDA device is usable.
# Environment: OVSS_VENV (default .venv), GPU_CHECK_ITERATIONS (timed rounds per row, default 5),
# GPU_CHECK_BUDGET_S (the whole run's time limit, default 290).
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${OVSS_VENV:-.venv}"
ITERATIONS="${GPU_CHECK_ITERATIONS:-5}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-290}"
START_S=$SECONDS

fail() { echo "gpu_check: $*" >&2; exit 2; }
left() { echo $((BUDGET_S - (SECONDS - START_S))); }

command -v nvidia-smi >/dev/null 2>&1 || fail "no nvidia-smi: this check needs a CUDA machine"
nvidia-smi -L >/dev/null 2>&1 || fail "nvidia-smi finds no GPU: this check needs a CUDA machine"

if [ ! -x "$VENV/bin/python" ]; then
    echo "== set-up: scripts/setup.sh (a venv in $VENV; once)"
    bash scripts/setup.sh
fi
PY="$VENV/bin/python"
"$PY" - <<'EOF' || fail "torch in the venv sees no CUDA device (a CPU-only torch wheel?)"
import sys
import torch
sys.exit(0 if torch.cuda.is_available() else 1)
EOF

echo "== GPU"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

OUT="$(mktemp -d)"
SAMPLER=""
trap '[ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null; rm -rf "$OUT"' EXIT
# GPU memory in use, sampled every 0.5 s while the benchmarks run (its peak is printed).
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >"$OUT/memory" &
SAMPLER=$!

# pnp_ovss's VLM: no random-weights option at full size; a tiny random BLIP (the CLIP stays
# ViT-B-16, so its row times the CLIP side at full size and the BLIP side tiny).
"$PY" scripts/make_tiny_models.py "$OUT/tiny" >/dev/null \
    || echo "make_tiny_models.py failed: the pnp_ovss rows will fail"

# Groups of methods, one ovss-bench run each (a group that cannot run costs only its rows).
GROUPS=("naclip sclip clearclip maskclip maskclip_reduced vanilla sclip_freecp maskclip_freecp vanilla_freecp"
        "deop twostream superpixel_clip"
        "pnp_ovss")
runs_left=$(( ${#GROUPS[@]} * 2 + 1 ))  # + the vocabulary-change gap
for precision in fp32 fp16; do
    for index in "${!GROUPS[@]}"; do
        read -r -a methods <<<"${GROUPS[$index]}"
        budget=$(( $(left) / runs_left ))
        runs_left=$(( runs_left - 1 ))
        if [ "$budget" -le 10 ]; then
            echo "ovss-bench $precision ${methods[*]}: skipped, out of time"
            continue
        fi
        echo "== ovss-bench $precision, 640x480, ViT-B-16 random weights: ${methods[*]}"
        json="$OUT/$precision-$index.json"
        timeout "$budget" "$VENV/bin/ovss-bench" --device cuda --pretrained none \
            --pnp-vlm-pretrained "$OUT/tiny/blip" --precision "$precision" \
            --width 640 --height 480 \
            --iterations "$ITERATIONS" --warmup 2 --combos "${methods[@]}" --json "$json" \
            || echo "ovss-bench $precision ${methods[*]}: exit status $?"
        [ -f "$json" ] && "$PY" - "$json" "$precision" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
bare = report["bare_forward"]["median_ms"]
for combo, result in report["combos"].items():
    e2e = result["end_to_end"]["median_ms"]
    print(f"FPS {sys.argv[2]} {combo}: {1000 / e2e:.1f} (end-to-end {e2e:.1f} ms, "
          f"bare forward {bare:.1f} ms, ratio {e2e / bare:.2f})")
EOF
    done
done

echo "== vocabulary-change gap (GPU, 2 rounds, 20 classes x 80 templates added at 10 Hz)"
budget=$(( $(left) - 5 ))
if [ "$budget" -gt 30 ]; then
    timeout "$budget" "$PY" benchmarks/vocabulary_change_gap.py --device cuda --rounds 2 \
        --timeout "$budget" \
        || echo "vocabulary_change_gap: exit status $?"
else
    echo "vocabulary_change_gap: skipped, out of time"
fi
kill "$SAMPLER" 2>/dev/null || true
SAMPLER=""
echo "== GPU memory: peak $(sort -n "$OUT/memory" | tail -1) MiB in use while the benchmarks ran"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
echo "gpu_check: done in $((SECONDS - START_S)) s"
