"""Wall time of the full MSMT17 ViT-B/16 recipe, compute side, on synthetic data of the real size.

    python benchmarks/recipe_benchmark.py                      # GPU: measure a slice of every phase, extrapolate
    python benchmarks/recipe_benchmark.py --scale 1            # run every phase in full (about the estimate)
    python benchmarks/recipe_benchmark.py --scale 0.0002 --batch 8 --eval_scale 0.01   # CPU, a few minutes
    python benchmarks/recipe_benchmark.py --tiny               # CPU smoke test with a tiny CLIP, about a minute

MSMT17 (train = list_train + list_val): 32,621 training images of 1,041 identities, 11,659 query and 82,161
gallery images. The recipe (configs/msmt17_vit.py): stage-1 feature bank (one pass over the training images),
stage 1 (120 epochs of 510 batches of 64 over the cached bank, as one compiled loop per epoch), text features of every
identity, stage 2 (60 epochs of 16x4 PK batches with on-device augmentation, each batch sent to the device two steps
ahead, as the trainer does), evaluation (features of query +
gallery, then mAP / CMC). No JPEG is written: random uint8 batches of the real shape go from host memory to the
device every step, as the trainer's loader hands them over, and random features feed the metric. Each phase runs
`--scale` of its steps (at least a few); the full-recipe figure is the measured per-step time times the full step
count, plus compilation (measured once per function). With --scale 1 nothing is extrapolated.

The host input side is not run here: decoding and resizing JPEGs is measured per core below (in-memory JPEGs of
MSMT17-like sizes through clipreid_jax.data.images) and in benchmarks/data_benchmark.py (docs/data.md), and the
report states how many host cores keep the measured device rates fed. Checkpoints (the trainer saves the state every
epoch by default, writing in the background while it trains on) are timed once with the trainer's orbax manager,
also reported apart.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # pylint: disable=g-import-not-at-top,wrong-import-position

GOAL_MINUTES = 20.0
STAGE1_EPOCHS, STAGE2_EPOCHS, STAGE1_BATCH, EVAL_BATCH, P, K = 120, 60, 64, 64, 16, 4
LOG_EVERY = 50  # the trainer fetches stage-2 metrics to the host every 50 steps
STAGE1_CHECKPOINT_EVERY, STAGE2_CHECKPOINT_EVERY = 10, 1  # epochs, the trainer's defaults
# Per-core decode + resize to 256x128 measured by benchmarks/data_benchmark.py on the H100 machine (docs/data.md).
H100_HOST_PER_CORE = dict(bicubic=1507.0, bilinear=2034.0)


def timed(fn):
  t = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t


class Report:
  def __init__(self):
    self.rows = []

  def add(self, phase, full_units, unit, run_units, run_s, compile_s, note="", full_s=None):
    per = run_s / max(run_units, 1)
    full_s = per * full_units if full_s is None else full_s
    self.rows.append(dict(phase=phase, full_units=full_units, unit=unit, run_units=run_units, run_s=run_s, per=per,
                          full_s=full_s, compile_s=compile_s, note=note))
    print(f"  {phase}: ran {run_units:,} {unit} in {run_s:.2f}s ({1e3 * per:.2f} ms/{unit}); full {full_units:,} "
          f"{unit}: {full_s:.1f}s; compile {compile_s:.1f}s", flush=True)

  def table(self) -> list[str]:
    head = f"{'phase':<22}{'full size':>22}{'ran':>10}{'per unit':>13}{'full s':>10}{'compile s':>11}  note"
    lines = [head, "-" * len(head)]
    for r in self.rows:
      lines.append(f"{r['phase']:<22}{r['full_units']:>14,} {r['unit']:<7}{r['run_units']:>10,}"
                   f"{1e3 * r['per']:>10.2f} ms{r['full_s']:>10.1f}{r['compile_s']:>11.1f}  {r['note']}")
    total = sum(r["full_s"] for r in self.rows)
    compile_total = sum(r["compile_s"] for r in self.rows)
    lines.append(f"{'total':<22}{'':>42}{total:>13.1f}{compile_total:>11.1f}  "
                 f"= {(total + compile_total) / 60:.1f} min with compilation")
    return lines


def host_decode_rates(seconds: float = 2.0) -> dict:
  """Per-core decode + resize rates on in-memory JPEGs of MSMT17-like sizes (smooth content, as photos are)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from clipreid_jax.data import images  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  blobs = []
  for _ in range(32):
    h = int(rng.integers(120, 360))
    w = max(40, int(h * rng.uniform(0.35, 0.5)))
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    blobs.append(buf.getvalue())
  rates = {}
  for name, resample in (("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)):
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
      for b in blobs:
        images.resize(images.decode_image(b, "x.jpg"), (256, 128), resample)
      n += len(blobs)
    rates[name] = n / (time.perf_counter() - t)
  return rates


def checkpoint_seconds(state) -> tuple[float, float] | None:
  """One save of `state` with the trainer's orbax manager: (seconds until `save` returns, the training loop's wait;
  seconds until the files are written, which happens in the background); None where it cannot be imported (a GPU
  machine without one of its packages): the recipe is then reported without checkpoints."""
  try:
    from clipreid_jax import workdir  # pylint: disable=g-import-not-at-top
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except  # ImportError, or a carried package that fails to load
    print(f"checkpoints not measured: {type(e).__name__}: {e}", flush=True)
    return None
  with tempfile.TemporaryDirectory() as d:
    mgr = workdir.checkpoint_manager(d)
    t = time.perf_counter()
    mgr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"epoch": 1})))
    blocking = time.perf_counter() - t
    mgr.wait_until_finished()
    written = time.perf_counter() - t
    mgr.close()
    return blocking, written


def checkpoint_cost_s(saves: int, blocking: float, written: float, between_s: float) -> float:
  """What `saves` saves of one stage add to it: each returns after `blocking`, and the next save (or the stage's end,
  where the trainer waits for the last one) also waits for whatever of the write the training between them did not
  cover."""
  return (saves - 1) * (blocking + max(0.0, written - blocking - between_s)) + written


_GOAL_PRINTED = []


def main(argv=None) -> int:
  C.cut_on_sigterm()
  try:
    return _main(argv)
  except C.Cut:  # gpu_all.sh's time limit: the phases measured so far were printed as they finished
    if not _GOAL_PRINTED:
      print("goal gpu_recipe_minutes: not measured (stopped by SIGTERM before every phase was measured; the phases "
            "measured are printed above)", flush=True)
    return 143


def _main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--scale", type=float, default=0.02, help="fraction of each phase's steps to run")
  parser.add_argument("--eval_scale", type=float, default=1.0,
                      help="fraction of query and gallery for the metric (its cost grows as the product)")
  parser.add_argument("--batch", type=int, default=P * K, help="stage-2 batch (64 in the recipe; CPU: 8)")
  parser.add_argument("--min_steps", type=int, default=3)
  parser.add_argument("--tiny", action="store_true", help="a tiny CLIP (smoke test of this script)")
  parser.add_argument("--no_checkpoint", action="store_true")
  parser.add_argument("--attention", choices=["auto", "xla"], default="auto",
                      help="as model.attention: auto (the trainer's default: cuDNN's where it runs), xla (XLA's)")
  args = parser.parse_args(argv)

  from clipreid_jax import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.keep_step_buffers_mapped()  # as the trainer does, before JAX starts its backend
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from clipreid_jax import evaluation, losses, optim, steps  # pylint: disable=g-import-not-at-top
  from clipreid_jax.data import sampler  # pylint: disable=g-import-not-at-top
  from clipreid_jax.data.prefetch import prefetch  # pylint: disable=g-import-not-at-top
  from clipreid_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  from clipreid_jax.models import clipreid  # pylint: disable=g-import-not-at-top

  clip_lib.ATTENTION_IMPLEMENTATION = clip_lib.ATTENTION_SETTINGS[args.attention]  # as train.use_attention
  m = C.MSMT17
  n_train, n_ids = m["num_train"], m["num_ids"]
  n_eval = m["num_query"] + m["num_gallery"]
  dtype = C.default_dtype()
  print(f"device: {C.device_name()}, jax {jax.__version__}, compute dtype {jnp.dtype(dtype).name}, scale {args.scale}",
        flush=True)
  t0 = time.perf_counter()
  if args.tiny:
    from clipreid_jax.models.clip import CLIP, CLIPConfig  # pylint: disable=g-import-not-at-top
    cfg = CLIPConfig(embed_dim=32, vision_layers=2, vision_width=64, text_width=64, text_heads=1, text_layers=2,
                     vision_grid=(4, 4))
    h, w = cfg.input_size()
    cv = CLIP(cfg).init(jax.random.PRNGKey(1), jnp.zeros((1, h, w, 3)), jnp.zeros((1, 4), jnp.int32))
    model, variables = clipreid.from_clip(cfg, jax.tree.map(np.asarray, cv), num_classes=n_ids,
                                          input_size=(256, 128), dataset="msmt17", dtype=dtype)
  else:
    model, variables, _ = C.reid_model("vit", dtype=dtype)
  embed = model.config.clip.embed_dim
  print(f"model built in {time.perf_counter() - t0:.1f}s", flush=True)
  rng = np.random.default_rng(0)
  report = Report()
  sync = jax.block_until_ready

  # ---- Stage-1 feature bank: one pass over the training images (test transform, batch 64).
  bank_fn = jax.jit(steps.make_feature_fn(model, "stage1"))
  host = [{"image": rng.integers(0, 256, (EVAL_BATCH, 256, 128, 3), dtype=np.uint8),
           "camid": np.zeros(EVAL_BATCH, np.int32), "viewid": np.zeros(EVAL_BATCH, np.int32)} for _ in range(4)]
  vars_dev = jax.device_put(variables)
  compiled, c_s = timed(lambda: bank_fn.lower(vars_dev, jax.device_put(host[0])).compile())
  full = math.ceil(n_train / EVAL_BATCH)
  run = max(args.min_steps, round(args.scale * full))
  sync(compiled(vars_dev, jax.device_put(host[0])))

  def extract(fn, n):
    outs = [fn(vars_dev, jax.device_put(host[i % len(host)])) for i in range(n)]
    return np.concatenate([np.asarray(o) for o in outs])

  _, run_s = timed(lambda: extract(compiled, run))
  report.add("stage-1 bank", full, "batch", run, run_s, c_s, f"{EVAL_BATCH} images, test transform")

  # ---- Stage 1: 120 epochs over the cached bank, one compiled scan per epoch, metrics fetched per epoch.
  steps_per_epoch = math.ceil(n_train / STAGE1_BATCH)
  tx1 = optim.stage1_optimizer(optim.Stage1Solver(), steps_per_epoch)
  full = STAGE1_EPOCHS * steps_per_epoch
  want = max(args.min_steps, round(args.scale * full))
  if want >= steps_per_epoch:  # whole epochs over the full bank
    epochs_run, n_bank = max(1, round(want / steps_per_epoch)), n_train
  else:  # one epoch over a smaller bank with the same batch
    epochs_run, n_bank = 1, max(want - 1, 1) * STAGE1_BATCH + STAGE1_BATCH // 2
  run = epochs_run * math.ceil(n_bank / STAGE1_BATCH)
  epoch_fn = jax.jit(steps.make_stage1_epoch(model, tx1, STAGE1_BATCH), donate_argnums=0)
  state = jax.device_put(steps.create_state(variables["params"], variables["batch_stats"], tx1))
  feats = jax.device_put(rng.standard_normal((n_bank, embed)).astype(np.float32))
  labels = jax.device_put(C.msmt17_pids(n_train, n_ids)[rng.permutation(n_train)[:n_bank]].astype(np.int32))
  key = jax.random.PRNGKey(0)
  perm0 = jax.random.permutation(key, n_bank)
  compiled, c_s = timed(lambda: epoch_fn.lower(state, feats, labels, perm0).compile())

  def stage1():
    nonlocal state
    for epoch in range(1, epochs_run + 1):
      perm = jax.random.permutation(jax.random.fold_in(key, epoch), n_bank)
      state, metrics = compiled(state, feats, labels, perm)
      jax.device_get(metrics)  # the trainer logs every epoch

  _, run_s = timed(stage1)
  report.add("stage 1", full, "step", run, run_s, c_s, f"{epochs_run} epoch(s) over {n_bank:,} bank rows")
  ckpt1 = None if args.no_checkpoint else checkpoint_seconds(state)
  params = state.params
  del state, feats

  # ---- Text features of every identity (once, before stage 2).
  (text, t_s) = timed(lambda: sync(steps.text_features_all(model, params)))
  report.add("text features", 1, "pass", 1, t_s, 0.0, "compile included in the time")

  # ---- Stage 2: 60 epochs of PK batches, uint8 images host -> device each step, augmentation on device.
  pids = C.msmt17_pids(n_train, n_ids)
  # PK epochs differ in length; the trainer's lr schedule takes every epoch's length, so does this one.
  epoch_lengths = [sampler.pk_epoch_plan(pids, num_ids=P, num_instances=K, seed=1234, epoch=e).shape[0]
                   for e in range(1, STAGE2_EPOCHS + 1)]
  steps_per_epoch2 = round(np.mean(epoch_lengths))
  full = sum(epoch_lengths) * (P * K) // args.batch
  run = max(args.min_steps, round(args.scale * full))
  solver = optim.Stage2Solver(base_lr=5e-6, weight_decay=1e-4, steps=(30, 50), warmup_factor=0.1)
  tx2 = optim.stage2_optimizer(solver, epoch_lengths)
  state = jax.device_put(steps.create_state(params, variables["batch_stats"], tx2, text))
  treedef = jax.tree.structure(state)  # the trainer's loop holds the state's leaves (steps.loop_step)
  step_fn = steps.loop_step(steps.make_stage2_step(model, tx2, losses.LossWeights.for_config("ViT-B-16")), treedef)
  leaves = jax.tree.leaves(state)
  del state
  b = args.batch
  host2 = [{"image": rng.integers(0, 256, (b, 256, 128, 3), dtype=np.uint8),
            "pid": np.repeat(rng.choice(n_ids, b // K, replace=False), K).astype(np.int32),
            "camid": rng.integers(0, m["num_cams"], b).astype(np.int32), "viewid": np.zeros(b, np.int32)}
           for _ in range(4)]
  key2 = jax.random.PRNGKey(2)
  compiled, c_s = timed(lambda: step_fn.lower(leaves, jax.device_put(host2[0]), key2).compile())
  leaves, metrics = compiled(leaves, jax.device_put(host2[0]), key2)
  sync(metrics)

  def stage2():
    nonlocal leaves
    sums = None
    # As the trainer feeds stage 2: each batch sent to the device two steps ahead of its step.
    batches = prefetch(iter(host2[i % len(host2)] for i in range(run)), jax.device_put, depth=2)
    for i, batch in enumerate(batches):
      leaves, metrics = compiled(leaves, batch, key2)
      sums = metrics if sums is None else steps.add_metrics(sums, metrics)
      if (i + 1) % LOG_EVERY == 0:
        float(sums["loss"])
    return float(sums["loss"])

  loss, run_s = timed(stage2)
  if not np.isfinite(loss):
    raise FloatingPointError(f"stage 2: non-finite loss {loss}")
  report.add("stage 2", full, "step", run, run_s, c_s,
             f"~{steps_per_epoch2} PK batches/epoch (batch {b}): {b * run / run_s:,.1f} img/s")
  stage2_rate = b * run / run_s
  state = jax.tree.unflatten(treedef, leaves)
  ckpt2 = None if args.no_checkpoint else checkpoint_seconds(state)
  final = {"params": state.params, "batch_stats": state.batch_stats}
  del state, leaves

  # ---- Evaluation: features of query + gallery (batch 64), then the metric.
  eval_fn = jax.jit(steps.make_feature_fn(model, "eval"))
  vars_dev = jax.device_put(final)
  compiled, c_s = timed(lambda: eval_fn.lower(vars_dev, jax.device_put(host[0])).compile())
  full = math.ceil(n_eval / EVAL_BATCH)
  run = max(args.min_steps, round(args.scale * full))
  sync(compiled(vars_dev, jax.device_put(host[0])))
  _, run_s = timed(lambda: extract(compiled, run))
  eval_rate = EVAL_BATCH * run / run_s
  report.add("eval features", full, "batch", run, run_s, c_s, f"{eval_rate:,.1f} img/s")
  case = C.gaussian_eval_case(args.eval_scale, model.config.feature_dim + embed)
  nq, ng = len(case["q_pids"]), len(case["g_pids"])
  res, e_s = timed(lambda: evaluation.evaluate(case["qf"], case["gf"], case["q_pids"], case["g_pids"],
                                               case["q_camids"], case["g_camids"]))
  factor = (m["num_query"] * m["num_gallery"]) / (nq * ng)
  # Its cost grows with query x gallery; scaled down, the estimate also multiplies fixed costs (an upper bound).
  report.add("eval metric", 1, "pass", 1, e_s, 0.0,
             f"{nq:,} x {ng:,}" + ("" if factor == 1 else f", x{factor:.0f} (query x gallery) to full size")
             + f"; mAP {res.mAP:.3f} on random features", full_s=e_s * factor)

  print(f"\ncompute-side wall time of the MSMT17 ViT-B/16 recipe on {C.device_name()} "
        f"(measured over --scale {args.scale} of each phase, extrapolated; setup {time.perf_counter() - t0:.0f}s):")
  lines = report.table()
  total_min = (sum(r["full_s"] + r["compile_s"] for r in report.rows)) / 60
  print("\n".join(lines))

  ckpt_min = 0.0
  ckpts = ckpt1 is not None and ckpt2 is not None
  if ckpts:
    # The trainer's defaults (config_defaults.recipe): stage 1 every 10 epochs, stage 2 every epoch.
    n1, n2 = STAGE1_EPOCHS // STAGE1_CHECKPOINT_EVERY, STAGE2_EPOCHS // STAGE2_CHECKPOINT_EVERY
    rows = {r["phase"]: r for r in report.rows}
    between1 = rows["stage 1"]["full_s"] / STAGE1_EPOCHS * STAGE1_CHECKPOINT_EVERY
    between2 = rows["stage 2"]["full_s"] / STAGE2_EPOCHS * STAGE2_CHECKPOINT_EVERY
    ckpt_min = (checkpoint_cost_s(n1, *ckpt1, between1) + checkpoint_cost_s(n2, *ckpt2, between2)) / 60
    print(f"checkpoints (not in the total): a save returns after {ckpt1[0]:.2f}s (stage-1 state) / {ckpt2[0]:.2f}s "
          f"(stage-2 state) here and is written in the background in {ckpt1[1]:.1f}s / {ckpt2[1]:.1f}s "
          f"(training between saves: {between1:.1f}s / {between2:.1f}s); the trainer's defaults save {n1} + {n2} "
          f"times: about {ckpt_min:.1f} min, {total_min + ckpt_min:.1f} min in all")
  on_gpu = jax.default_backend() == "gpu"
  if on_gpu and not args.tiny:
    print(C.goal_line("gpu_recipe_minutes", total_min + ckpt_min, GOAL_MINUTES, at_most=True)
          + ("" if args.scale >= 1 else f" (extrapolated from --scale {args.scale})")
          + (" (checkpoints included)" if ckpts else " (checkpoints not measured)"))
  else:
    print(f"goal gpu_recipe_minutes: not measured (needs a GPU; this {'tiny-model ' if args.tiny else ''}run on "
          f"{jax.default_backend()} estimates {total_min:.1f} min)")
  _GOAL_PRINTED.append(True)  # what follows is informative: a cut there keeps the goal line above

  rates = host_decode_rates()
  print(f"host input side (not in the total): decode + resize to 256x128 here, one core: "
        f"bicubic {rates['bicubic']:,.0f} img/s (stage 2), bilinear {rates['bilinear']:,.0f} img/s (bank, eval); "
        f"H100 machine per core (docs/data.md): {H100_HOST_PER_CORE['bicubic']:,.0f} / "
        f"{H100_HOST_PER_CORE['bilinear']:,.0f} img/s")
  for name, rate, kind in (("stage 2", stage2_rate, "bicubic"), ("eval", eval_rate, "bilinear")):
    print(f"  {name} consumes {rate:,.0f} img/s: {math.ceil(rate / rates[kind])} host cores at this machine's rate, "
          f"{math.ceil(rate / H100_HOST_PER_CORE[kind])} at the H100 machine's")
  return 0


if __name__ == "__main__":
  sys.exit(main())
