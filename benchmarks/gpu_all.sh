#!/usr/bin/env bash
# Every performance benchmark on one H100/H200 machine in one go, in under 8 minutes (TOTAL_BUDGET_S, default
# 480 s), printing all tables.
#
# The GPU machines have no network: this script fetches nothing. The repository is used in place (PYTHONPATH=.,
# no `pip install -e .`). Their Python lacks openai-clip (the PyTorch reference's CLIP), ftfy (our tokenizer) and
# the trainer's grain, ml_collections and tensorboardX. One command on a machine that has network fills .devdeps/
# (the pure-Python packages, copied) and .whl/ (wheels for the machines' Python 3.12, installed into /tmp there);
# both are git-ignored through .git/info/exclude and never committed:
#
#   bash benchmarks/gpu_all.sh --prepare          # here, with /work/venv (or PYTHON=...) holding the packages
#
# then, through the device tool:  run(command="bash benchmarks/gpu_all.sh", carry=[".devdeps", ".whl"],
# timeout_s=600) (the tool's limit above the script's own budget: a part cut by its `timeout` still prints what it
# measured). PARTS picks the parts (default steps,eval,recipe; also rss, profile, cbupdate, dispatch, demo), in this
# order: rss (JAX's start-up host memory), profile (PROFILE_VARIANTS, ~1 min each), cbupdate (the profile's default
# with XLA's command-buffer update mode SKIP_TEMP), dispatch (DISPATCH_ARGS), steps (STEP_ARGS
# picks rows), eval (EVAL_ARGS), demo (the Quickstart's main job), recipe. A call of the kind the twelfth session
# made first (~4 min on an H200):
#   PARTS=rss,profile,steps,eval,demo PROFILE_VARIANTS=default,xla,nographs PROFILE_STEPS=3 \
#   STEP_ARGS="--frameworks torch --backbones vit --no_stage1 --no-olp --no-torch_per_tensor" STEP_BUDGET_S=60 \
#   EVAL_ARGS="--skip-reference --device-features-too --preallocate-too --skip-rerank --warm" bash ...
# Without .devdeps the PyTorch rows report an error, our rows use numpy-drawn weights and a stand-in ftfy.
#
# Tables go to stdout and, with the workers' logs and JSON, to $OUT (the device tool's folder) or /tmp/gpu_all. The
# tool brings back 8 files at most: the default parts write 7 (gpu, step .txt/.json/.log, eval .txt/.json, recipe);
# with more parts, what does not come back is still in the call's printed output (profile traces stay in /tmp).
# Smoke run on a CPU: STEP_BUDGET_S=60 EVAL_SCALE=0.02 RECIPE_EXTRA="--tiny" TOTAL_BUDGET_S=240 PYTHON=... bash ...
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [[ "${1:-}" == "--prepare" ]]; then
  PY=${PYTHON:-/work/venv/bin/python}
  mkdir -p .devdeps .whl .git/info
  for d in /.devdeps/ /.whl/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
  for pkg in clip ftfy wcwidth; do
    src=$("$PY" -c "import importlib.util as u; print(u.find_spec('$pkg').submodule_search_locations[0])") || exit 1
    rm -rf ".devdeps/$pkg" && cp -r "$src" ".devdeps/$pkg"
  done
  find .devdeps -name __pycache__ -type d -prune -exec rm -rf {} +
  # The trainer's packages that the machines' image lacks (grain for the trainer; ml_collections and tensorboardX
  # for main), as wheels for its Python 3.12.
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0 tensorboardX==2.6.5 || exit 1
  du -sh .devdeps .whl
  exit 0
fi

OUT=${OUT:-/tmp/gpu_all}
mkdir -p "$OUT"
# Which parts run (PARTS=profile alone, say, for a second call on a warm machine); PROFILE=1 adds the profile.
PARTS=",${PARTS:-steps,eval,recipe}$([[ "${PROFILE:-0}" == "1" ]] && echo ,profile),"
part() { [[ "$PARTS" == *",$1,"* ]]; }
if compgen -G ".whl/*.whl" > /dev/null; then  # see --prepare; nothing is fetched
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_all_site \
    .whl/*.whl && export PYTHONPATH="/tmp/gpu_all_site${PYTHONPATH:+:$PYTHONPATH}" \
    || echo "wheels in .whl/ not installed"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[[ -d .devdeps ]] && export PYTHONPATH="$PYTHONPATH:$PWD/.devdeps"  # ftfy for main (the benchmarks add it themselves)
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
try:  # every "default" row is cuDNN's attention only if this says so (else XLA's, ~18 ms a step on an H200)
  from clipreid_jax.models import clip
  print("  cuDNN flash attention runs here (model.attention=auto picks it):", clip._cudnn_flash_attention_available())
except Exception as e:
  print(f"  cuDNN flash attention check failed: {type(e).__name__}: {e}")
EOF

# Always (~15 s): the test feature's program compiles here. It runs in float32 with full-precision products since
# the sixteenth session and has not run on a GPU since; compiled without a device (benchmarks/aot_report.py), XLA's
# default tiling of one of its Triton GEMMs was invalid, which the autotuner on the machine should avoid.
timeout 120 "$PY" - <<'EOF' 2>&1 | tee -a "$OUT/gpu.txt"
import sys, time
sys.path.insert(0, "benchmarks")
import jax, jax.numpy as jnp
import _common as C
from clipreid_jax import steps
from clipreid_jax.models import clipreid
cfg = clipreid.reid_config(C.clip_config("vit"), num_classes=C.NUM_CLASSES, input_size=(256, 128), dataset="msmt17")
n = 64  # eval.batch_size
batch = {"image": jax.ShapeDtypeStruct((n, 256, 128, 3), jnp.uint8), "camid": jax.ShapeDtypeStruct((n,), jnp.int32),
         "viewid": jax.ShapeDtypeStruct((n,), jnp.int32)}
t = time.perf_counter()
try:
  fn = jax.jit(steps.make_feature_fn(clipreid.CLIPReID(cfg, jnp.bfloat16), "eval"))
  fn.lower(clipreid.expected_variables(cfg), batch).compile()
  print(f"test feature (ViT-B/16, float32, full-precision products, batch {n}) compiles here in "
        f"{time.perf_counter() - t:.1f} s")
except Exception as e:  # the evaluation of every GPU run would fail the same way
  print(f"test feature does NOT compile here: {type(e).__name__}: {str(e)[:400]}")
EOF

# 0. Optional (part rss, ~1 min): the host memory JAX's backend holds before any work, under the environment
#    settings that might lower it (the floor under the evaluation's 3 GB peak-RSS goal, docs/evaluation.md).
part rss && timeout 150 "$PY" benchmarks/runtime_memory.py \
  --settings "${RSS_SETTINGS:-default,lazy,eager,noprealloc,lazy+noprealloc,cpu}" --json "$OUT/rss.json" 2>&1 \
  | tee "$OUT/rss.txt"

# 1. Optional (PROFILE=1 or part profile, ~1 min per variant): our stage-2 step per variant in one process, where
#    its time goes kernel by kernel, with the HLO behind each (e.g. PROFILE_VARIANTS=default,xla,barriers).
if part profile; then
  timeout "${PROFILE_BUDGET_S:-200}" "$PY" benchmarks/profile_step.py --variants "${PROFILE_VARIANTS:-default}" \
    --profile_steps "${PROFILE_STEPS:-5}" ${PROFILE_ARGS:-} --explain 16 --json "$OUT/profile.json" 2>&1 \
    | grep --line-buffered -v "^PROFILE" | tee "$OUT/profile.txt"
fi

# 1a. Optional (part cbupdate, ~1 min): the default variant again in a process of its own in which XLA keeps the
#     executables' temporary buffers at fixed virtual addresses (XLA_FLAGS --xla_gpu_command_buffer_update_mode=
#     SKIP_TEMP, which takes XLA's VMM allocator; a value of jax 0.11's XLA, where 0.10's has other modes), so that
#     its CUDA graphs need no update for them at each call. The step runs as 25 graphs and 24 thunks outside them
#     (benchmarks/aot_report.py), 49 launches; the H200's host took 12.6 ms per call (twelfth session): this
#     "dispatch" against the profile's says how much of the host's time per call is graph updates of temporaries.
if part cbupdate; then
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_command_buffer_update_mode=SKIP_TEMP" timeout "${CBUPDATE_BUDGET_S:-120}" \
    "$PY" benchmarks/profile_step.py --variants default --profile_steps 0 --json "$OUT/profile_skiptemp.json" 2>&1 \
    | grep --line-buffered -v "^PROFILE"
fi

# 1b. Optional (part dispatch, ~1.5 min): the host time of one step call in the trainer's loop, the state as a pytree
#     against its leaves (steps.loop_step), and the real step's dispatch in both forms.
part dispatch && timeout "${DISPATCH_BUDGET_S:-150}" "$PY" benchmarks/dispatch_benchmark.py ${DISPATCH_ARGS:-} \
  --json "$OUT/dispatch.json" 2>&1 | tee "$OUT/dispatch.txt"

# 2. Steps: ours vs PyTorch fp16 (ViT-B/16, then RN50), then OLP, stage 1 and variants while the budget lasts.
#    Rows run by priority; one that would not finish in what is left is skipped; the table and goals print anyway.
#    STEP_ARGS replaces the row selection (e.g. "--frameworks torch --backbones vit --no_stage1 --no-olp").
part steps && "$PY" benchmarks/step_benchmark.py --budget_s "${STEP_BUDGET_S:-170}" ${STEP_ARGS:-} \
  --json "$OUT/step.json" --log "$OUT/step.log" 2>&1 | tee "$OUT/step.txt"

# 3. Evaluation at MSMT17 size: ours against the NumPy reference (identical metrics on its own matrix), then ours
#    with device-resident features and the host-memory variants (~2.5 min; a cut keeps what finished).
EVAL_ARGS=${EVAL_ARGS:---warm --same-dist-check --device-features-too --preallocate-too --one-arena-too --skip-rerank}
part eval && timeout "${EVAL_BUDGET_S:-160}" "$PY" benchmarks/eval_benchmark.py --scale "${EVAL_SCALE:-1}" $EVAL_ARGS \
  --json "$OUT/eval.json" 2>&1 | tee "$OUT/eval.txt"
# Optional (EVAL_GAUSSIAN=1, ~2.5 min): the many-matches case where the compare-and-count ranking was slow.
if [[ "${EVAL_GAUSSIAN:-0}" == "1" ]]; then
  timeout 200 "$PY" benchmarks/eval_benchmark.py --scale 1 --case gaussian --skip-reference --skip-rerank \
    --rankings-too sort,host --json "$OUT/eval_gaussian.json" 2>&1 | tee "$OUT/eval_gaussian.txt"
fi

# 4. Optional (part demo): the Quickstart's main job (configs/demo.py: both stages and evaluation of a small random
#    CLIP on synthetic images) on the GPU, end to end, within DEMO_BUDGET_S (needs the trainer's wheels, .whl/);
#    without the compilation cache, so that every call times the cold start a new user sees.
part demo && timeout "${DEMO_BUDGET_S:-120}" $([[ -x /usr/bin/time ]] && echo /usr/bin/time -v) \
  "$PY" -m clipreid_jax.main --config configs/demo.py --config.workdir=/tmp/gpu_demo --config.compilation_cache= 2>&1 \
  | tee "$OUT/demo.txt"

# 5. The MSMT17 recipe: 1% of every phase measured, the rest extrapolated; the metric on half of the queries and
#    half of the gallery, scaled up x4 (at full size it took 61 s of the budget). Phases print as they finish. It
#    needs ~130-145 s to reach its goal line (compilations, model, metric), so it gets at least RECIPE_MIN_S even
#    past TOTAL_BUDGET_S (480 + 150 s stays inside the device tool's 600 s only when the earlier parts end by ~450 s).
left=$(( ${TOTAL_BUDGET_S:-480} - ($(date +%s) - start) ))
part recipe && echo "recipe benchmark: ${left}s left" && \
timeout "$(( left > ${RECIPE_MIN_S:-150} ? left : ${RECIPE_MIN_S:-150} ))" "$PY" benchmarks/recipe_benchmark.py --scale "${RECIPE_SCALE:-0.01}" \
  --eval_scale "${RECIPE_EVAL_SCALE:-0.5}" ${RECIPE_EXTRA:-} 2>&1 | tee "$OUT/recipe.txt"

echo "gpu_all: $(( $(date +%s) - start ))s"
