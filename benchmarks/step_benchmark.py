"""Training-step speed: our jitted steps against a PyTorch reference of the same math, in one run.

    python benchmarks/step_benchmark.py                      # CPU: stage-2 batch 8; GPU: batch 64 + variants
    python benchmarks/step_benchmark.py --list               # the rows it would run, in order
    python benchmarks/step_benchmark.py --batch 64 --iters 20 --olp --variants default,xla --budget_s 240

Rows (full-size models with random weights, MSMT17's 1,041 identities, 256x128 images):
- stage 1: one prompt-learning step, batch 64 (text side only; the image features come from a fixed bank).
  Ours: `steps.make_stage1_step` (the text transformer runs over the 12 tokens up to the end token, which is exact
  under causal attention). Reference: the official TextEncoder over all 77 tokens.
- stage 2: one image-side step on a PK batch (4 images per identity), ViT-B/16 (stride 16; `--olp` adds stride 12,
  211 tokens) and RN50. Ours: `steps.make_stage2_step` on uint8 images, with the on-device augmentation (flip,
  pad-crop, normalisation, random erasing) inside the step. Reference: float images already normalised on the device
  (the official augments on host workers), no augmentation cost.
Ours is built as the trainer builds it: `clipreid.from_clip` from a random CLIP, the optax optimizers of
clipreid_jax.optim with the MSMT17 recipe's settings, `jax.jit(..., donate_argnums=0)`, bfloat16 compute on GPU and
float32 on CPU (model.dtype 'auto'). The reference runs fp16 autocast + GradScaler on GPU, as the official trains,
and float32 on CPU (see benchmarks/_torch_reference.py).

Every row runs in its own process (so peak memory is that row's, and one failure does not stop the rest). Times
are the median of --iters steps after --warmup steps, each step waited for (block_until_ready / cuda.synchronize);
"pipelined" is the mean over the same number of steps dispatched back to back, as the trainer runs them. Compile is
jit lowering + XLA compilation of the step. Peak memory: JAX's device.memory_stats() peak, torch's
max_memory_allocated (GPU only); "XLA GiB" is the compiled step's own buffers (memory_analysis). The table names the
device; the last lines are one per goal.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common as C  # pylint: disable=g-import-not-at-top,wrong-import-position

GOALS = dict(cpu_stage1_ratio=0.2, cpu_stage2_vit_ratio=1.0, gpu_stage2_images_per_s=4000.0, gpu_stage2_speedup=3.0)


# --------------------------------------------------------------------------------------------------
# Workers: one job each, printing "RESULT {json}".


def _inputs(job):
  """The same numpy inputs for both frameworks: PK labels, uint8 images, bank features, text features."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  b, c = job["batch"], C.NUM_CLASSES
  if job["stage"] == 1:
    # Both sides start from the same prompt tokens, so their first losses can be compared.
    return dict(feature=rng.standard_normal((b, 512)).astype(np.float32),
                label=rng.integers(0, c, b).astype(np.int32),
                cls_ctx=(0.02 * rng.standard_normal((c, 4, 512))).astype(np.float32))
  p = b // 4  # P identities x K = 4 instances
  pids = np.repeat(rng.choice(c, p, replace=False), 4).astype(np.int32)
  h, w = job["input_size"]
  embed = 512 if job["backbone"] == "vit" else 1024
  return dict(image=rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8), pid=pids,
              text=(0.1 * rng.standard_normal((c, embed))).astype(np.float32))


def _pipelined(fn, n: int, sync):
  """Mean seconds per call over `n` calls dispatched back to back (None when n is 0)."""
  if not n:
    return None
  t = time.perf_counter()
  for _ in range(n):
    out = fn()
  sync(out)
  return (time.perf_counter() - t) / n


def _full_context_stage1(model, tx):
  """`steps.make_stage1_step` without its prefix truncation: the text transformer over all 77 tokens (the official
  cost), to measure what the truncation saves."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from clipreid_jax import losses  # pylint: disable=g-import-not-at-top
  from clipreid_jax.models.clipreid import CLIPReID  # pylint: disable=g-import-not-at-top

  def loss_fn(params, batch):
    text = model.apply({"params": params}, batch["label"], full_context=True, method=CLIPReID.text_features)
    return losses.stage1_loss(batch["feature"], text, batch["label"])

  def step(state, batch, rng=None):
    del rng
    (loss, comps), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return (state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state),
            {"loss": loss, **comps})

  return step


def build_jax_job(job):
  """(step, state, batch, dtype, weight source) of our row, built as the trainer builds it (also used by
  profile_step.py and dispatch_benchmark.py)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from clipreid_jax import losses, optim, steps  # pylint: disable=g-import-not-at-top
  from clipreid_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top

  variant = job["variant"]
  dtype = {"fp32": jnp.float32}.get(variant, C.default_dtype())
  # The trainer's default (model.attention 'auto'): cuDNN's attention where it runs; 'xla': XLA's everywhere.
  clip_lib.ATTENTION_IMPLEMENTATION = clip_lib.ATTENTION_SETTINGS["xla" if variant == "xla" else "auto"]
  backbone = job["backbone"]
  model, variables, source = C.reid_model(backbone, stride=job["stride"], dtype=dtype,
                                          input_size=tuple(job["input_size"]))
  x = _inputs(job)
  if job["stage"] == 1:
    tx = optim.stage1_optimizer(optim.Stage1Solver(), -(-C.MSMT17["num_train"] // 64))
    step = steps.make_stage1_step(model, tx) if variant != "full_context" else _full_context_stage1(model, tx)
    variables["params"]["prompt_learner"]["cls_ctx"] = x["cls_ctx"]
    state = steps.create_state(variables["params"], variables["batch_stats"], tx)
    batch = {"feature": x["feature"], "label": x["label"]}
  else:
    vit = backbone == "vit"
    solver = (optim.Stage2Solver(base_lr=5e-6, weight_decay=1e-4, steps=(30, 50), warmup_factor=0.1) if vit else
              optim.Stage2Solver(base_lr=3.5e-4, weight_decay=5e-4, steps=(40, 70), warmup_factor=0.01))
    tx = optim.stage2_optimizer(solver, 476)  # MSMT17's PK epoch length (the recipe benchmark uses every epoch's)
    weights = losses.LossWeights.for_config("ViT-B-16" if vit else "RN50")
    step = steps.make_stage2_step(model, tx, weights)
    state = steps.create_state(variables["params"], variables["batch_stats"], tx, jnp.asarray(x["text"]))
    n = job["batch"]
    batch = {"image": x["image"], "pid": x["pid"], "camid": np.zeros(n, np.int32), "viewid": np.zeros(n, np.int32)}
  state, batch = jax.device_put((state, batch))
  return step, state, batch, dtype, source


def run_jax_job(job) -> dict:
  from clipreid_jax import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.keep_step_buffers_mapped()  # as the trainer does, before JAX starts its backend
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from clipreid_jax import steps  # pylint: disable=g-import-not-at-top
  step, state, batch, dtype, source = build_jax_job(job)
  # As the trainer's loop calls it: over the state's leaves, each step's draws folded from its counter.
  fn = steps.loop_step(step, jax.tree.structure(state), donate=job["variant"] != "nodonate")
  key = jax.random.PRNGKey(0)
  box = {"leaves": jax.tree.leaves(state)}
  t = time.perf_counter()
  compiled = fn.lower(box["leaves"], batch, key).compile()
  compile_s = time.perf_counter() - t

  def one():
    box["leaves"], metrics = compiled(box["leaves"], batch, key)
    return metrics["loss"]

  first_loss = float(one())
  sync = lambda loss: loss.block_until_ready()
  med, times = C.median_time(one, job["iters"], max(job["warmup"] - 1, 0), sync)
  pipelined = _pipelined(one, job["pipelined"], sync)
  return dict(median_s=med, times=times, pipelined_s=pipelined, compile_s=compile_s, peak_bytes=C.peak_bytes(),
              xla_bytes=C.buffer_bytes(compiled), first_loss=first_loss, device=C.device_name(),
              weights=source, dtype=jnp.dtype(dtype).name, jax=jax.__version__)


def run_torch_job(job) -> dict:
  if job["variant"] == "mallopt":  # our trainer's malloc settings (host_memory) given to the reference too
    import ctypes  # pylint: disable=g-import-not-at-top
    from clipreid_jax import host_memory  # pylint: disable=g-import-not-at-top
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    for param, value in ((host_memory._M_ARENA_MAX, 1), (host_memory._M_MMAP_MAX, 0),  # pylint: disable=protected-access
                         (host_memory._M_TRIM_THRESHOLD, 2**31 - 1)):  # pylint: disable=protected-access
      mallopt(param, value)
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import _torch_reference as R  # pylint: disable=g-import-not-at-top

  gpu = torch.cuda.is_available()
  device = torch.device("cuda" if gpu else "cpu")
  torch.backends.cudnn.benchmark = True  # as the official set_seed does
  clip = C.torch_clip(job["backbone"], seed=0)
  x = _inputs(job)
  amp = gpu
  if job["stage"] == 1:
    step = R.stage1_step_fn(clip, C.NUM_CLASSES, device, amp, torch.from_numpy(x["cls_ctx"]))
    feats = torch.from_numpy(x["feature"]).to(device)
    feats = feats.half() if amp else feats  # the official bank is stacked autocast (fp16) output
    args = (feats, torch.from_numpy(x["label"]).long().to(device))
  else:
    text = torch.from_numpy(x["text"])
    text = text.half() if amp else text
    step = R.stage2_step_fn(clip, job["backbone"], C.NUM_CLASSES, tuple(job["input_size"]), job["stride"], text,
                            device, amp, groups=job["groups"])
    # The official loader hands over normalised float32 NCHW tensors (the constants do not matter for timing).
    imgs = torch.from_numpy(x["image"]).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
    args = (imgs.contiguous().to(device), torch.from_numpy(x["pid"]).long().to(device))
  if gpu:
    torch.cuda.reset_peak_memory_stats()
  sync = (lambda _: torch.cuda.synchronize()) if gpu else (lambda _: None)
  t = time.perf_counter()
  first_loss = float(step(*args))
  first_s = time.perf_counter() - t
  med, times = C.median_time(lambda: step(*args), job["iters"], max(job["warmup"] - 1, 0), sync)
  pipelined = _pipelined(lambda: step(*args), job["pipelined"], sync)
  name = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores, {C._cpu_model()})"  # pylint: disable=protected-access
  return dict(median_s=med, times=times, pipelined_s=pipelined, compile_s=None, first_s=first_s,
              peak_bytes=torch.cuda.max_memory_allocated() if gpu else None, xla_bytes=None, first_loss=first_loss,
              device=name, weights="openai-init", dtype="fp16 autocast" if amp else "float32",
              torch=torch.__version__, threads=torch.get_num_threads(), _np=np.__version__)


def worker(job_json: str) -> None:
  job = json.loads(job_json)
  load = os.getloadavg()[0]
  try:
    res = run_jax_job(job) if job["framework"] == "jax" else run_torch_job(job)
    res["load"] = [load, os.getloadavg()[0]]  # 1-minute load average at start and end: CPU timings need a quiet host
  except Exception as e:  # pylint: disable=broad-except
    import traceback  # pylint: disable=g-import-not-at-top
    traceback.print_exc()
    res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
  print("RESULT " + json.dumps(res), flush=True)


# --------------------------------------------------------------------------------------------------
# Orchestration.


def make_jobs(args, gpu: bool) -> list[dict]:
  """Rows in priority order (a --budget_s run drops the tail): the goal rows first."""
  common = dict(iters=args.iters, warmup=args.warmup, pipelined=args.pipelined, input_size=[256, 128], groups="two")
  jobs = []

  def add(framework, stage, backbone, batch, stride=16, variant="default", **kw):
    if framework not in args.frameworks:
      return
    jobs.append(dict(common, framework=framework, stage=stage, backbone=backbone, batch=batch, stride=stride,
                     variant=variant, **kw))

  torch_too = not args.no_torch
  vit, rn50 = "vit" in args.backbones, "rn50" in args.backbones
  late = ("fp32", "nodonate")  # informative variants, run last
  if vit:  # the goal rows
    add("jax", 2, "vit", args.batch)
    if torch_too:
      add("torch", 2, "vit", args.batch)
    if torch_too and not gpu:  # the reference with our malloc settings too (CPU: they cut page faults for both)
      add("torch", 2, "vit", args.batch, 16, "mallopt")
  if rn50:  # the other backbone's ratio (never reached on a GPU while it came after OLP and stage 1)
    add("jax", 2, "rn50", args.batch)
    if torch_too:
      add("torch", 2, "rn50", args.batch)
  if vit and args.olp:  # OLP's memory
    add("jax", 2, "vit", args.batch, 12)
  if not args.no_stage1:
    add("jax", 1, "vit", args.stage1_batch)
    if torch_too:
      add("torch", 1, "vit", args.stage1_batch)
  if vit:
    for v in args.variants:
      if v != "default" and v not in late:
        add("jax", 2, "vit", args.batch, 16, v)
    if args.olp and torch_too:
      add("torch", 2, "vit", args.batch, 12)
    if torch_too and args.torch_per_tensor:
      add("torch", 2, "vit", args.batch, 16, "per_tensor", groups="per_tensor")
  for v in args.stage1_variants:
    if v != "default" and not args.no_stage1:
      add("jax", 1, "vit", args.stage1_batch, 16, v)
  for v in args.variants:
    if v in late and vit:
      add("jax", 2, "vit", args.batch, 16, v)
  return jobs


def run_job(job, timeout: float, log) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--job", json.dumps(job)]
  t = time.perf_counter()
  try:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f}s"}
  wall = time.perf_counter() - t
  if log:
    log.write(f"=== {json.dumps(job)}\n{p.stdout}\n{p.stderr}\n")
  for line in p.stdout.splitlines()[::-1]:
    if line.startswith("RESULT "):
      res = json.loads(line[len("RESULT "):])
      res["wall_s"] = wall
      return res
  tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
  return {"error": f"exit {p.returncode}: {tail[0][:200]}"}


def merge_rounds(rounds: list[dict]) -> dict:
  """One row's result over its rounds: the median of every timed step of every round (a slow stretch of a shared
  host then weighs on each contender as often as the rows alternate), the mean pipelined time, the first round's
  other fields, and each round's own median in `round_medians`."""
  ok = [r for r in rounds if "error" not in r]
  if len(rounds) == 1 or not ok:
    return rounds[0]
  out = dict(ok[0])
  out["times"] = [t for r in ok for t in r["times"]]
  out["median_s"] = statistics.median(out["times"])
  out["round_medians"] = [r["median_s"] for r in ok]
  if all(r.get("pipelined_s") for r in ok):
    out["pipelined_s"] = statistics.mean(r["pipelined_s"] for r in ok)
  if all(r.get("load") for r in ok):
    out["load"] = [ok[0]["load"][0], ok[-1]["load"][-1]]
  return out


def _rate(x: float) -> str:
  return f"{x:,.0f}" if x >= 100 else f"{x:.2f}"


def label(job) -> str:
  name = {"vit": "ViT-B/16", "rn50": "RN50"}[job["backbone"]]
  if job["stage"] == 1:
    return "text encoder"
  if job["backbone"] == "vit":
    name += f" s{job['stride']}"
  return name


def step_time(r: dict) -> float:
  """Seconds per step for throughput: pipelined (steps dispatched back to back, as the trainer runs them) where
  measured, else the median of synced steps (CPU rows)."""
  return r.get("pipelined_s") or r["median_s"]


def report(jobs, results, gpu: bool) -> list[str]:
  lines = []
  devices = sorted({r["device"] for r in results if "device" in r})
  lines.append(f"device: {', '.join(devices) or 'unknown'}")
  versions = {k: r[k] for r in results for k in ("jax", "torch") if k in r}
  lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
  head = (f"{'stage':<6}{'model':<14}{'batch':>6}  {'contender':<26}{'median ms':>11}{'pipel. ms':>11}{'img/s':>9}"
          f"{'ref/ours':>10}{'compile s':>11}{'peak GiB':>10}{'XLA GiB':>9}{'loss':>10}{'load':>10}")
  lines += [head, "-" * len(head)]
  refs = {}
  for job, r in zip(jobs, results):
    if job["framework"] == "torch" and job["variant"] == "default" and "median_s" in r:
      refs[(job["stage"], job["backbone"], job["stride"])] = step_time(r)
  for job, r in zip(jobs, results):
    who = ("ours" if job["framework"] == "jax" else "torch") + f" {r.get('dtype', '')}"
    if job["variant"] != "default":
      who += f" [{job['variant']}]"
    if "error" in r:
      lines.append(f"{job['stage']:<6}{label(job):<14}{job['batch']:>6}  {who:<26}  ERROR {r['error']}")
      continue
    ref = refs.get((job["stage"], job["backbone"], job["stride"]))
    ratio = f"{ref / step_time(r):.2f}x" if ref else "-"
    compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
    lines.append(f"{job['stage']:<6}{label(job):<14}{job['batch']:>6}  {who:<26}{C.fmt_ms(r['median_s']):>11}"
                 f"{C.fmt_ms(r['pipelined_s']):>11}{_rate(job['batch'] / step_time(r)):>9}{ratio:>10}{compile_s:>11}"
                 f"{C.fmt_gib(r['peak_bytes']):>10}{C.fmt_gib(r['xla_bytes']):>9}{r['first_loss']:>10.4f}"
                 f"{'/'.join(f'{x:.1f}' for x in r.get('load', [])):>10}")
  lines.append("img/s and ref/ours use the pipelined time where it was measured (GPU: how the trainer runs), "
               "else the median; ref/ours: the PyTorch reference's time over ours (above 1: ours is faster). loss: "
               "the first step's; stage-1 losses match when both run float32 (same weights and inputs). load: the "
               "host's 1-minute load average at the row's start/end.")
  for job, r in zip(jobs, results):
    if r.get("round_medians"):
      who = ("ours" if job["framework"] == "jax" else "torch") + f" stage {job['stage']} {label(job)} {job['variant']}"
      lines.append(f"rounds, {who}: medians " + " / ".join(C.fmt_ms(m) for m in r["round_medians"])
                   + f" ms; all {len(r['times'])} steps: {C.fmt_ms(r['median_s'])} ms")

  def find(framework, stage, backbone, stride=16, variant="default"):
    for job, r in zip(jobs, results):
      if (job["framework"], job["stage"], job["backbone"], job["stride"], job["variant"]) == (
          framework, stage, backbone, stride, variant) and "median_s" in r:
        return job, r
    return None, None

  goals = []
  _, ours1 = find("jax", 1, "vit")
  _, ref1 = find("torch", 1, "vit")
  j2, ours2 = find("jax", 2, "vit")
  _, ref2 = find("torch", 2, "vit")
  if not gpu:
    goals.append(C.goal_line("cpu_stage1_time_ratio", ours1["median_s"] / ref1["median_s"], GOALS["cpu_stage1_ratio"],
                             at_most=True) if ours1 and ref1 else "goal cpu_stage1_time_ratio: not measured")
    goals.append(C.goal_line("cpu_stage2_vit_time_ratio", ours2["median_s"] / ref2["median_s"],
                             GOALS["cpu_stage2_vit_ratio"], at_most=True) if ours2 and ref2
                 else "goal cpu_stage2_vit_time_ratio: not measured")
    _, ref2m = find("torch", 2, "vit", 16, "mallopt")
    if ours2 and ref2m:
      goals.append(f"report cpu_stage2_vit_time_ratio_vs_torch_with_our_malloc_settings: "
                   f"{ours2['median_s'] / ref2m['median_s']:.3g} (the goal is against the reference as it runs)")
    for g in ("gpu_stage2_images_per_s", "gpu_stage2_speedup"):
      goals.append(f"goal {g}: not measured (needs a GPU; this run is on the CPU)")
  elif ours2 and ours2["device"].startswith("CPU"):  # a GPU machine whose JAX has no CUDA backend
    goals += [f"goal {g}: not measured (JAX ran on the CPU of this GPU machine)" for g in GOALS]
  else:
    for g in ("cpu_stage1_time_ratio", "cpu_stage2_vit_time_ratio"):
      goals.append(f"goal {g}: not measured (a CPU goal; this run is on a GPU)")
    goals.append(C.goal_line("gpu_stage2_images_per_s", j2["batch"] / step_time(ours2),
                             GOALS["gpu_stage2_images_per_s"], at_most=False) if ours2
                 else "goal gpu_stage2_images_per_s: not measured")
    goals.append(C.goal_line("gpu_stage2_speedup", step_time(ref2) / step_time(ours2), GOALS["gpu_stage2_speedup"],
                             at_most=False, unit="x") if ours2 and ref2 else "goal gpu_stage2_speedup: not measured")
    peak = ours2.get("peak_bytes") if ours2 else None
    goals.append(f"report gpu_stage2_peak_memory: ViT-B/16 batch {j2['batch'] if j2 else '?'}: "
                 f"{C.fmt_gib(peak)} GiB" + _olp_peak(jobs, results))
  return lines + goals


def _olp_peak(jobs, results) -> str:
  for job, r in zip(jobs, results):
    if job["framework"] == "jax" and job["stride"] == 12 and "peak_bytes" in r:
      return f"; OLP (stride 12, 211 tokens): {C.fmt_gib(r['peak_bytes'])} GiB"
  return ""


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--job", help=argparse.SUPPRESS)
  parser.add_argument("--platform", choices=["auto", "cpu", "gpu"], default="auto")
  parser.add_argument("--batch", type=int, help="stage-2 batch (default: 64 on GPU, 8 on CPU)")
  parser.add_argument("--stage1_batch", type=int, default=64)
  parser.add_argument("--iters", type=int, help="timed steps (default: 20 on GPU, 3 on CPU)")
  parser.add_argument("--warmup", type=int, help="untimed steps after compilation (default: 3 on GPU, 1 on CPU)")
  parser.add_argument("--backbones", default="vit,rn50")
  parser.add_argument("--pipelined", type=int, help="steps dispatched back to back (default: 20 on GPU, 0 on CPU)")
  parser.add_argument("--olp", action=argparse.BooleanOptionalAction, help="also ViT stride 12 (default on GPU)")
  parser.add_argument("--variants", help="variants of our ViT stage-2 row: default (cuDNN attention on GPU), xla "
                      "(XLA's attention), fp32 (float32 compute), nodonate (no buffer donation) (default: "
                      "'default,xla,fp32' on GPU, 'default' on CPU)")
  parser.add_argument("--stage1_variants", default="default,full_context",
                      help="variants of our stage-1 row: default, full_context (all 77 tokens, the official cost), "
                           "xla (XLA's attention)")
  parser.add_argument("--torch_per_tensor", action=argparse.BooleanOptionalAction,
                      help="also the official one-group-per-tensor Adam (default on GPU)")
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument("--frameworks", default="jax,torch", help="whose rows to run (e.g. 'torch' for the reference "
                      "only, when profile_step.py times ours)")
  parser.add_argument("--no_stage1", action="store_true")
  parser.add_argument("--rounds", type=int, default=1, help="run every row this many times, the rows alternating; a "
                      "row's time is the median of all its rounds' steps (for a shared CPU host whose speed drifts)")
  parser.add_argument("--timeout", type=float, default=900, help="seconds per row")
  parser.add_argument("--list", action="store_true", help="print the rows and exit")
  parser.add_argument("--budget_s", type=float, help="stop starting rows after this many seconds")
  parser.add_argument("--json", help="write all results here")
  parser.add_argument("--log", help="append every worker's output here")
  args = parser.parse_args(argv)
  if args.job:
    worker(args.job)
    return 0
  gpu = C.on_gpu_machine() if args.platform == "auto" else args.platform == "gpu"
  args.batch = args.batch or (64 if gpu else 8)
  args.iters = args.iters or (20 if gpu else 3)
  args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
  args.pipelined = args.pipelined if args.pipelined is not None else (20 if gpu else 0)
  args.olp = gpu if args.olp is None else args.olp
  args.torch_per_tensor = gpu if args.torch_per_tensor is None else args.torch_per_tensor
  args.variants = (args.variants or ("default,xla,fp32" if gpu else "default")).split(",")
  args.stage1_variants = args.stage1_variants.split(",")
  args.backbones = args.backbones.split(",")
  args.frameworks = args.frameworks.split(",")
  if args.batch < 8 or args.batch % 4:
    parser.error(f"--batch {args.batch}: expected a multiple of 4 (P identities x K = 4), at least 8")
  jobs = make_jobs(args, gpu)
  if args.list:
    for job in jobs:
      print(f"{job['framework']} stage {job['stage']} {label(job)} batch {job['batch']} {job['variant']}")
    return 0
  log = open(args.log, "a") if args.log else None
  rounds = [[] for _ in jobs]
  start = time.perf_counter()
  walls = {}  # framework -> the shortest row so far: a row that cannot finish in what is left is not started
  for _ in range(args.rounds):  # rows alternate: ours, torch, ..., ours, torch, ...
    for job, row in zip(jobs, rounds):
      t = time.perf_counter()
      left = args.budget_s - (t - start) if args.budget_s else args.timeout
      if left < walls.get(job["framework"], 20):
        row.append({"error": f"skipped: {left:.0f}s of --budget_s left"})
        continue
      r = run_job(job, min(args.timeout, left), log)
      row.append(r)
      if "wall_s" in r:
        walls[job["framework"]] = min(walls.get(job["framework"], r["wall_s"]), r["wall_s"])
      status = r.get("error") or f"median {C.fmt_ms(r['median_s'])} ms"
      print(f"[{time.perf_counter() - t:5.0f}s] {job['framework']} stage {job['stage']} {label(job)} batch "
            f"{job['batch']} {job['variant']}: {status}", flush=True)
  results = [merge_rounds(row) for row in rounds]
  if args.json:
    with open(args.json, "w") as f:
      json.dump([{"job": j, "result": r} for j, r in zip(jobs, results)], f, indent=1)
  print("\n".join(report(jobs, results, gpu)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
