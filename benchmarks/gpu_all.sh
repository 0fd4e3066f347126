#!/usr/bin/env bash
# Every performance benchmark on one H100/H200 machine in one go, in under 8 minutes (TOTAL_BUDGET_S, default
# 480 s), printing all tables.
#
# The GPU machines have no network: this script installs nothing. The repository is used in place
# (PYTHONPATH=., no `pip install -e .`). Their Python lacks openai-clip (the PyTorch reference's CLIP) and ftfy
# (our tokenizer); both are pure Python and travel in .devdeps/, which one command on a machine that has them
# fills (it is git-ignored through .git/info/exclude, never committed):
#
#   bash benchmarks/gpu_all.sh --prepare          # here, with /work/venv (or PYTHON=...) holding the packages
#
# then, through the device tool:  run(command="bash benchmarks/gpu_all.sh", carry=[".devdeps"], timeout_s=600)
# (the tool's limit above the script's own budget: a part cut by its `timeout` still prints what it measured), and,
# if the session's device time allows, at once on the warm machine (the profile, ~1 min per variant):
#   run(command="PARTS=profile PROFILE_VARIANTS=default,barriers bash benchmarks/gpu_all.sh", carry=[".devdeps"])
# Without .devdeps the PyTorch rows report an error, our rows use numpy-drawn weights and a stand-in ftfy.
#
# Tables go to stdout and, with the workers' logs and JSON, to $OUT (the device tool's folder) or /tmp/gpu_all.
# Smoke run on a CPU: STEP_BUDGET_S=60 EVAL_SCALE=0.02 RECIPE_EXTRA="--tiny" TOTAL_BUDGET_S=240 PYTHON=... bash ...
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [[ "${1:-}" == "--prepare" ]]; then
  PY=${PYTHON:-/work/venv/bin/python}
  mkdir -p .devdeps .git/info
  grep -qxF '/.devdeps/' .git/info/exclude 2>/dev/null || echo '/.devdeps/' >> .git/info/exclude
  for pkg in clip ftfy wcwidth; do
    src=$("$PY" -c "import importlib.util as u; print(u.find_spec('$pkg').submodule_search_locations[0])") || exit 1
    rm -rf ".devdeps/$pkg" && cp -r "$src" ".devdeps/$pkg"
  done
  find .devdeps -name __pycache__ -type d -prune -exec rm -rf {} +
  du -sh .devdeps
  exit 0
fi

OUT=${OUT:-/tmp/gpu_all}
mkdir -p "$OUT"
# Which parts run (PARTS=profile alone, say, for a second call on a warm machine); PROFILE=1 adds the profile.
PARTS=",${PARTS:-steps,eval,recipe}$([[ "${PROFILE:-0}" == "1" ]] && echo ,profile),"
part() { [[ "$PARTS" == *",$1,"* ]]; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
start=$(date +%s)

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/gpu.txt"
import importlib, os, sys
sys.path.append(os.path.join(os.getcwd(), ".devdeps"))  # as benchmarks/_common.py does
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

# 1. Steps: ours vs PyTorch fp16 (ViT-B/16, then RN50), then OLP, stage 1 and variants while the budget lasts.
#    Rows run by priority; one that would not finish in what is left is skipped; the table and goals print anyway.
part steps && "$PY" benchmarks/step_benchmark.py --budget_s "${STEP_BUDGET_S:-170}" --json "$OUT/step.json" \
  --log "$OUT/step.log" 2>&1 | tee "$OUT/step.txt"

# 2. Optional (PROFILE=1, ~1 min per variant): where our stage-2 step's time goes, kernel by kernel, with the HLO
#    behind each (e.g. PROFILE_VARIANTS=default,cudnn,barriers).
if part profile; then
  timeout "${PROFILE_BUDGET_S:-200}" "$PY" benchmarks/profile_step.py --variants "${PROFILE_VARIANTS:-default}" \
    --explain 16 --json "$OUT/profile.json" 2>&1 | grep -v "^PROFILE" | tee "$OUT/profile.txt"
fi

# 3. Evaluation at MSMT17 size: ours against the NumPy reference (identical metrics on its own matrix), then ours
#    with device-resident features and the host-memory variants (~2.5 min; a cut keeps what finished).
part eval && timeout "${EVAL_BUDGET_S:-160}" "$PY" benchmarks/eval_benchmark.py --scale "${EVAL_SCALE:-1}" --warm --same-dist-check \
  --device-features-too --lazy-cuda-too --one-arena-too --skip-rerank --json "$OUT/eval.json" 2>&1 \
  | tee "$OUT/eval.txt"
# Optional (EVAL_GAUSSIAN=1, ~2.5 min): the many-matches case where the compare-and-count ranking was slow.
if [[ "${EVAL_GAUSSIAN:-0}" == "1" ]]; then
  timeout 200 "$PY" benchmarks/eval_benchmark.py --scale 1 --case gaussian --skip-reference --skip-rerank \
    --rankings-too sort,host --json "$OUT/eval_gaussian.json" 2>&1 | tee "$OUT/eval_gaussian.txt"
fi

# 4. The MSMT17 recipe: 1% of every phase measured, the rest extrapolated; the metric on half of the queries and
#    half of the gallery, scaled up x4 (at full size it took 61 s of the budget). Phases print as they finish.
left=$(( ${TOTAL_BUDGET_S:-480} - ($(date +%s) - start) ))
part recipe && echo "recipe benchmark: ${left}s left" && \
timeout "$(( left > 60 ? left : 60 ))" "$PY" benchmarks/recipe_benchmark.py --scale "${RECIPE_SCALE:-0.01}" \
  --eval_scale "${RECIPE_EVAL_SCALE:-0.5}" ${RECIPE_EXTRA:-} 2>&1 | tee "$OUT/recipe.txt"
echo "gpu_all: $(( $(date +%s) - start ))s"
