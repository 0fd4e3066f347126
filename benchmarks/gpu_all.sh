#!/usr/bin/env bash
# Every performance benchmark on one H100/H200 machine in one go, in about 8 minutes, printing all tables.
#
# The GPU machines have no network: this script installs nothing. The repository is used in place
# (PYTHONPATH=., no `pip install -e .`). Their Python lacks openai-clip (the PyTorch reference's CLIP) and ftfy
# (our tokenizer); both are pure Python and travel in .devdeps/, which one command on a machine that has them
# fills (it is git-ignored through .git/info/exclude, never committed):
#
#   bash benchmarks/gpu_all.sh --prepare          # here, with /work/venv (or PYTHON=...) holding the packages
#
# then, through the device tool:  run(command="bash benchmarks/gpu_all.sh", carry=[".devdeps"], timeout_s=540)
# Without .devdeps the PyTorch rows report an error, our rows use numpy-drawn weights and a stand-in ftfy.
#
# Tables go to stdout and, with the workers' logs and JSON, to $OUT (the device tool's folder) or /tmp/gpu_all.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [[ "${1:-}" == "--prepare" ]]; then
  PY=${PYTHON:-/work/venv/bin/python}
  mkdir -p .devdeps .git/info
  grep -qxF '/.devdeps/' .git/info/exclude 2>/dev/null || echo '/.devdeps/' >> .git/info/exclude
  for pkg in clip ftfy wcwidth; do
    src=$("$PY" -c "import importlib.util as u; print(u.find_spec('$pkg').submodule_search_locations[0])") || exit 1
    rm -rf ".devdeps/$pkg" && cp -r "$src" ".devdeps/$pkg" && rm -rf ".devdeps/$pkg/__pycache__"
  done
  du -sh .devdeps
  exit 0
fi

OUT=${OUT:-/tmp/gpu_all}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
start=$(date +%s)

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/gpu.txt"
import importlib, sys
print("python", sys.version.split()[0])
for name in ("jax", "jaxlib", "flax", "optax", "chex", "orbax.checkpoint", "torch", "PIL", "regex", "ftfy", "clip",
             "ml_collections", "grain"):
  try:
    m = importlib.import_module(name) if name != "clip" else importlib.util.find_spec("clip")
    print(f"  {name}: {getattr(m, '__version__', 'present') if m else 'missing'}")
  except Exception as e:  # what the benchmarks must do without
    print(f"  {name}: missing ({type(e).__name__})")
import jax
print("  jax devices:", jax.devices())
EOF

# 1. Steps: ours vs PyTorch fp16 (ViT-B/16 + OLP), then RN50, stage 1 and variants while the budget lasts. Rows
#    are run by priority and skipped once the budget is spent; the table and goals are printed either way.
"$PY" benchmarks/step_benchmark.py --budget_s "${STEP_BUDGET_S:-170}" --json "$OUT/step.json" --log "$OUT/step.log" \
  2>&1 | tee "$OUT/step.txt"

# 2. Optional (PROFILE=1, ~1 min per variant): where our stage-2 step's time goes, kernel by kernel, with the HLO
#    behind each (e.g. PROFILE_VARIANTS=default,cudnn,barriers).
if [[ "${PROFILE:-0}" == "1" ]]; then
  timeout "${PROFILE_BUDGET_S:-200}" "$PY" benchmarks/profile_step.py --variants "${PROFILE_VARIANTS:-default}" \
    --explain 16 --json "$OUT/profile.json" 2>&1 | grep -v "^PROFILE" | tee "$OUT/profile.txt"
fi

# 3. Evaluation at MSMT17 size: ours (host and device-resident features) against the NumPy reference (~2 min).
timeout "${EVAL_BUDGET_S:-190}" "$PY" benchmarks/eval_benchmark.py --scale 1 --warm --device-features-too \
  --lazy-cuda-too --one-arena-too --rankings-too sort --skip-rerank --json "$OUT/eval.json" 2>&1 | tee "$OUT/eval.txt"
# Optional (EVAL_GAUSSIAN=1, ~2.5 min): the many-matches case where the compare-and-count ranking was slow.
if [[ "${EVAL_GAUSSIAN:-0}" == "1" ]]; then
  timeout 200 "$PY" benchmarks/eval_benchmark.py --scale 1 --case gaussian --skip-reference --skip-rerank \
    --rankings-too sort,host --json "$OUT/eval_gaussian.json" 2>&1 | tee "$OUT/eval_gaussian.txt"
fi

# 4. The MSMT17 recipe: 1% of every phase measured, the rest extrapolated; the metric at full size.
left=$(( ${TOTAL_BUDGET_S:-540} - ($(date +%s) - start) ))
echo "recipe benchmark: ${left}s left"
timeout "$(( left > 60 ? left : 60 ))" "$PY" benchmarks/recipe_benchmark.py --scale "${RECIPE_SCALE:-0.01}" \
  2>&1 | tee "$OUT/recipe.txt"
echo "gpu_all: $(( $(date +%s) - start ))s"
