"""Where a stage-2 step's time goes: timings, host dispatch and a device-kernel profile, per variant, in one process.

    python benchmarks/profile_step.py                    # GPU: ViT-B/16 batch 64, default (cuDNN attention) + xla
    python benchmarks/profile_step.py --variants default,b128,autotune0 --trace_dir /tmp/prof
    python benchmarks/profile_step.py --batch 8 --steps 2 --variants default   # CPU smoke run (slow, full size)

Each variant builds our stage-2 step as step_benchmark.py does (full-size ViT-B/16 with random weights, the
trainer's optimizer, on-device augmentation, donated state) and reports:
- compile s; "synced" ms (median of steps each waited for); "pipelined" ms (mean of steps dispatched back to back
  over the state's leaves, as the trainer's loop calls it: steps.loop_step); "dispatch" ms (host time for one call
  to return);
- from a jax.profiler trace of `--profile_steps` pipelined steps: device busy ms per step (the union of kernel
  intervals on the device's streams), kernels per step, and the top kernels / XLA ops by time, grouped into
  matmul, attention, fusion (XLA's elementwise / reduction kernels), copy and other.
Busy well below pipelined means the device waits for the host; busy near pipelined means kernels decide.

Variants: default (cuDNN flash attention on GPU, as the trainer); xla (XLA's attention); cudnn; fp32 (float32
compute); b128 / b32 (batch); autotune0 (`xla_gpu_autotune_level=0` for this executable only); notriton (XLA's
Triton GEMM fusions off: cuBLAS takes every product); nographs / allgraphs / graphs1 (XLA's CUDA graphs off, every
kind of thunk recorded, graphs of one kernel allowed: what the host's launch cost per step, `dispatch`, is made
of); barriers / nobarriers (gradient barriers between the transformer blocks on or off, see
clip.GRADIENT_BARRIERS; on by default on the CPU only); wgrad / nowgrad (dense layers' weight gradients written
out or derived by JAX, clip.EXPLICIT_WEIGHT_GRADIENTS; written out on the CPU only); agrad / noagrad (attention's
backward pass written out or derived by XLA, clip.EXPLICIT_ATTENTION_GRADIENTS; written out on the CPU only). Each
variant also reports its largest fusion's parameter count: one that grows with depth is XLA re-computing the
residual-gradient chain.
The last line per variant is machine-readable: `PROFILE {json}`.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # pylint: disable=g-import-not-at-top,wrong-import-position
import step_benchmark as SB  # pylint: disable=g-import-not-at-top,wrong-import-position

CATEGORIES = (  # (category, substrings of a lower-cased kernel / op name), first match wins
    ("attention", ("fmha", "flash", "cudnn", "attention", "softmax")),
    ("matmul", ("gemm", "ynn", "cutlass", "xmma", "cublas", "nvjet", "dot", "matmul", "conv", "wgmma", "sm90_",
                "sm80_")),
    ("copy", ("memcpy", "memset", "copy", "transpose")),
    ("fusion", ("fusion", "triton", "loop_", "input_", "reduce", "scatter", "gather", "slice", "concatenate")),
)


def category(name: str) -> str:
  low = name.lower()
  for cat, keys in CATEGORIES:
    if any(k in low for k in keys):
      return cat
  return "other"


def load_trace(trace_dir: str):
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
  if not paths:
    raise FileNotFoundError(f"{trace_dir}: no perfetto_trace.json.gz written by jax.profiler")
  with gzip.open(paths[-1]) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  pname, tname = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      pname[e["pid"]] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      tname[(e["pid"], e["tid"])] = e["args"]["name"]
  return [Span(pname.get(e["pid"], str(e["pid"])), tname.get((e["pid"], e["tid"]), str(e["tid"])), e["name"],
               float(e["ts"]), float(e.get("dur", 0.0)), (e.get("args") or {}).get("hlo_op"))
          for e in events if e.get("ph") == "X"]


Span = collections.namedtuple("Span", "proc thread name ts dur hlo_op")

# Model parts, by the JAX name stack XLA keeps in each instruction's op_name (most specific first).
COMPONENTS = ("attn/in_proj", "attn/out_proj", "attn", "mlp/c_fc", "mlp/c_proj", "mlp", "ln_1", "ln_2", "ln_pre",
              "ln_post", "conv1", "classifier", "bottleneck", "augment", "random_erasing", "flip_pad_crop",
              "transformer")  # the last: the residual stream and the barriers' conditionals


def instructions(hlo: str) -> dict:
  """HLO instruction name -> its line, from a compiled module's text (names are unique in a module)."""
  return {m.group(1): m.group(0).strip() for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*$", hlo, re.M)}


def op_path(line: str) -> Optional[str]:
  """The op_name metadata of an HLO instruction line: the JAX op path it was lowered from."""
  m = re.search(r'op_name="([^"]*)"', line)
  return m.group(1) if m else None


def component(op_name: str) -> str:
  """'backward attn/in_proj', 'forward mlp', 'other optimizer / loss', ... from a JAX op path."""
  phase = "backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name else "other"
  for c in COMPONENTS:
    if f"/{c}/" in op_name + "/" or op_name.endswith(f"/{c}"):
      return f"{phase} {c}"
  return f"{phase} rest" if phase != "other" else "other (optimizer, loss bookkeeping)"


def _instruction_name(kernel: str) -> str:
  """The HLO instruction an XLA kernel is named after (its fusion's name with '.' written '_': fusion_2106)."""
  return re.sub(r"_(\d+)$", r".\1", kernel)


def by_component(spans, hlo: str, steps: int) -> dict:
  """Milliseconds per step by model part, for spans that carry their HLO op (GPU kernels and CPU thunks do). A
  kernel run inside a CUDA graph carries the graph's thunk instead (the H200 trace: 98% of the step 'unmapped');
  XLA's own kernels are named after their fusion, so the kernel's name is looked up then. What is left is named
  in 'unmapped ops' by its HLO op, the largest first."""
  paths = {name: op_path(line) for name, line in instructions(hlo).items()}
  out, unmapped = collections.defaultdict(float), collections.defaultdict(float)
  for sp in spans:
    path = paths.get(sp.hlo_op) or paths.get(_instruction_name(sp.name)) or paths.get(sp.name)
    key = component(path) if path else "unmapped"
    out[key] += sp.dur / 1e3 / steps
    if not path:
      unmapped[sp.hlo_op or "(none)"] += sp.dur / 1e3 / steps
  out = dict(sorted(out.items(), key=lambda kv: -kv[1]))
  if unmapped:
    out["unmapped ops"] = {k: v for k, v in sorted(unmapped.items(), key=lambda kv: -kv[1])[:5]}
  return out


def summarize(spans, steps: int, top: int = 25) -> dict:
  """Device-side summary of a trace of `steps` steps (microsecond durations in, milliseconds out)."""
  threads = collections.defaultdict(lambda: [0.0, 0])
  for sp in spans:
    threads[(sp.proc, sp.thread)][0] += sp.dur
    threads[(sp.proc, sp.thread)][1] += 1
  device = [s for s in spans if "/device:" in s.proc]
  kernels = [s for s in device if "stream" in s.thread.lower()]
  ops = [s for s in device if s.thread in ("XLA Ops", "TensorFlow Ops")]
  if not device:  # the CPU backend: XLA's thunks run on the host's XLA threads
    ops = [s for s in spans if s.thread != "python"]
  ivals = sorted((s.ts, s.ts + s.dur) for s in kernels)
  busy, end = 0.0, -1e30
  for a, b in ivals:  # union of kernel intervals over every stream
    if b > end:
      busy += b - max(a, end)
      end = b

  def table(items):
    by_name = collections.defaultdict(lambda: [0.0, 0])
    by_cat = collections.defaultdict(float)
    for _, _, name, _, dur, _ in items:
      by_name[name][0] += dur
      by_name[name][1] += 1
      by_cat[category(name)] += dur
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return ([dict(name=n[:110], ms_per_step=t / 1e3 / steps, calls_per_step=c / steps, category=category(n))
             for n, (t, c) in rows], {k: v / 1e3 / steps for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])})

  kernel_rows, kernel_cats = table(kernels)
  op_rows, op_cats = table(ops)
  return dict(busy_ms_per_step=busy / 1e3 / steps, kernels_per_step=len(kernels) / steps,
              kernel_ms_per_step=sum(s.dur for s in kernels) / 1e3 / steps, kernel_categories=kernel_cats,
              top_kernels=kernel_rows, op_categories=op_cats, top_ops=op_rows,
              threads={f"{p} | {t}": dict(ms=v[0] / 1e3, events=v[1])
                       for (p, t), v in sorted(threads.items(), key=lambda kv: -kv[1][0])[:12]})


def computation_ops(hlo: str) -> dict:
  """Computation name -> Counter of the op names in its body, from optimised HLO text."""
  bodies, current = {}, None
  for line in hlo.splitlines():
    m = re.match(r"^(?:%)?([\w.\-]+) .*\{$", line.strip()) if not line.startswith(" ") else None
    if m:
      current = m.group(1)
      bodies[current] = collections.Counter()
    elif current and "=" in line:
      op = re.search(r"= [^ ]+ ([a-z\-]+)\(", line)
      if op:
        bodies[current][op.group(1)] += 1
  return bodies


def largest_fusion(hlo: str) -> int:
  """The most array parameters of any fused computation in optimised HLO text. Scalars are not counted: the
  gradient norm's final sum takes one scalar per parameter (156 for ViT-B/16) and re-computes nothing."""
  headers = re.findall(r"^%?fused[\w.\-]* \((.*)\) -> .*\{$", hlo, flags=re.M)
  return max((len(re.findall(r": \w+\[[^\]]+\]", params)) for params in headers), default=0)


def explain(hlo: str, kernels: list[str], width: int = 150) -> dict:
  """The optimised-HLO instruction behind each kernel name (XLA names kernels after their fusion, '.' -> '_'),
  with the ops its fused computation contains: what an unnamed `fusion_2106` actually computes."""
  bodies = computation_ops(hlo)
  index = instructions(hlo)
  out = {}
  for k in kernels:
    t = index.get(_instruction_name(k)) or index.get(k)
    if t is None:
      continue
    called = re.search(r"calls=%?([\w.\-]+)", t)
    ops = bodies.get(called.group(1), {}) if called else {}
    shape = t.split(" = ", 1)[1].split("(", 1)[0]
    kind = re.search(r"kind=(\w+)", t)
    out[k] = (f"{shape[:90]} {kind.group(1) if kind else ''} op_name={(op_path(t) or '?')[-width:]}"
              + ("  || ops: " + ", ".join(f"{o}x{n}" for o, n in ops.most_common(8)) if ops else ""))
  return out


VARIANTS = {  # name -> (job overrides, compiler options, model-module settings)
    "default": ({}, {}, {}),
    # The attention comes from the job's variant (build_jax_job sets it; a module setting here would be overwritten
    # by it): cuDNN's where it runs (the default since the twelfth session), or XLA's.
    "cudnn": ({}, {}, {}),
    "xla": ({"variant": "xla"}, {}, {}),
    "fp32": ({"variant": "fp32"}, {}, {}),
    "b128": ({"batch": 128}, {}, {}),
    "b32": ({"batch": 32}, {}, {}),
    "autotune0": ({}, {"xla_gpu_autotune_level": 0}, {}),
    "notriton": ({}, {"xla_gpu_enable_triton_gemm": False}, {}),
    # CUDA graphs (XLA's command buffers): off; every thunk kind XLA can record; small graphs too.
    "nographs": ({}, {"xla_gpu_enable_command_buffer": ""}, {}),
    "allgraphs": ({}, {"xla_gpu_enable_command_buffer":
                       "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL"}, {}),
    "graphs1": ({}, {"xla_gpu_graph_min_graph_size": 1}, {}),
    "barriers": ({}, {}, {"GRADIENT_BARRIERS": True}),
    "nobarriers": ({}, {}, {"GRADIENT_BARRIERS": False}),
    "wgrad": ({}, {}, {"EXPLICIT_WEIGHT_GRADIENTS": True}),
    "nowgrad": ({}, {}, {"EXPLICIT_WEIGHT_GRADIENTS": False}),
    "agrad": ({}, {}, {"EXPLICIT_ATTENTION_GRADIENTS": True}),
    "noagrad": ({}, {}, {"EXPLICIT_ATTENTION_GRADIENTS": False}),
}


def run_variant(name: str, args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from clipreid_jax import steps  # pylint: disable=g-import-not-at-top
  from clipreid_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  overrides, options, settings = {}, {}, {}
  for part in name.split("+"):  # e.g. "cudnn+b128"
    o, c, s = VARIANTS[part]
    overrides.update(o)
    options.update(c)
    settings.update(s)
  saved = {k: getattr(clip_lib, k) for k in settings}
  for k, v in settings.items():
    setattr(clip_lib, k, v)
  try:
    job = dict(framework="jax", stage=2, backbone="vit", batch=args.batch, stride=args.stride, variant="default",
               input_size=[256, 128], iters=args.steps, warmup=2, pipelined=args.steps, groups="two")
    job.update(overrides)
    step, state, batch, dtype, _ = SB.build_jax_job(job)
    # As the trainer's loop calls it (steps.loop_step): over the state's leaves, each step's draws folded from its
    # counter. One compilation serves the timings, the profile and the HLO.
    key = jax.random.PRNGKey(0)
    leaves = jax.tree.leaves(state)
    t = time.perf_counter()
    compiled = steps.loop_step(step, jax.tree.structure(state), compiler_options=options or None).lower(
        leaves, batch, key).compile()
    compile_s = time.perf_counter() - t
    del state
    t = time.perf_counter()
    leaves, m = compiled(leaves, batch, key)
    m["loss"].block_until_ready()
    first_s = time.perf_counter() - t
    synced = []
    for _ in range(args.steps):
      t = time.perf_counter()
      leaves, m = compiled(leaves, batch, key)
      m["loss"].block_until_ready()
      synced.append(time.perf_counter() - t)
    dispatch = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
      t = time.perf_counter()
      leaves, m = compiled(leaves, batch, key)
      dispatch.append(time.perf_counter() - t)
    m["loss"].block_until_ready()
    pipelined = (time.perf_counter() - t0) / args.steps
    hlo = compiled.as_text()
    trace_dir = os.path.join(args.trace_dir, name)
    summary = {}
    if args.profile_steps:
      m["loss"].block_until_ready()
      try:  # a profiler failure (no CUPTI access, say) must not lose the timings
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
          for _ in range(args.profile_steps):
            leaves, m = compiled(leaves, batch, key)
          m["loss"].block_until_ready()
        spans = load_trace(trace_dir)
        summary = summarize(spans, args.profile_steps, args.top)
        names = [r["name"] for r in summary["top_kernels"] or summary["top_ops"]]  # CPU: no device kernels
        summary["explained"] = explain(hlo, names[:args.explain])
        timed = [sp for sp in spans if "stream" in sp.thread.lower()] or [  # GPU kernels, else CPU thunks
            sp for sp in spans if sp.thread != "python" and sp.hlo_op]
        summary["components"] = by_component(timed, hlo, args.profile_steps)
      except Exception as e:  # pylint: disable=broad-except
        summary = {"profile_error": f"{type(e).__name__}: {str(e)[:300]}"}
    synced.sort()
    return dict(variant=name, batch=job["batch"], dtype=str(jax.numpy.dtype(dtype)), device=C.device_name(),
                compile_s=compile_s, largest_fusion=largest_fusion(hlo), first_s=first_s,
                synced_ms=1e3 * synced[len(synced) // 2],
                pipelined_ms=1e3 * pipelined, dispatch_ms=1e3 * sorted(dispatch)[len(dispatch) // 2],
                images_per_s=job["batch"] / pipelined, loss=float(m["loss"]), peak_gib=(C.peak_bytes() or 0) / 2**30,
                **summary)
  finally:
    for k, v in saved.items():
      setattr(clip_lib, k, v)


def print_variant(r: dict) -> None:
  print(f"\n== {r['variant']}: batch {r['batch']} {r['dtype']} on {r['device']}: compile {r['compile_s']:.1f}s, "
        f"synced {r['synced_ms']:.2f} ms, pipelined {r['pipelined_ms']:.2f} ms ({r['images_per_s']:,.0f} img/s), "
        f"dispatch {r['dispatch_ms']:.2f} ms/call, loss {r['loss']:.4f}, process peak {r['peak_gib']:.2f} GiB, "
        f"largest fusion {r['largest_fusion']} parameters")
  if "busy_ms_per_step" not in r:
    print(f"   no profile: {r.get('profile_error', 'not asked for')}")
    return
  print(f"   device busy {r['busy_ms_per_step']:.2f} ms/step (kernel sum {r['kernel_ms_per_step']:.2f}), "
        f"{r['kernels_per_step']:.0f} kernels/step")
  print("   kernel time by category (ms/step): " + ", ".join(f"{k} {v:.2f}" for k, v in r["kernel_categories"].items()))
  if r["op_categories"]:
    print("   XLA op time by category (ms/step): " + ", ".join(f"{k} {v:.2f}" for k, v in r["op_categories"].items()))
  for title, rows in (("top kernels", r["top_kernels"]), ("top XLA ops", r["top_ops"])):
    if rows:
      print(f"   {title}:  ms/step  calls/step  category  name")
      for row in rows:
        print(f"   {row['ms_per_step']:>18.3f} {row['calls_per_step']:>10.1f}  {row['category']:<9} {row['name']}")
  if r.get("components"):
    parts = {k: v for k, v in r["components"].items() if k != "unmapped ops"}
    print("   time by model part (ms/step, from each kernel's HLO op path): "
          + ", ".join(f"{k} {v:.2f}" for k, v in parts.items() if v >= 0.005))
    if r["components"].get("unmapped ops"):
      print("   unmapped, by HLO op: " + ", ".join(f"{k} {v:.2f}" for k, v in r["components"]["unmapped ops"].items()))
  for k, v in r.get("explained", {}).items():
    print(f"   HLO {k}: {v}")
  print("   trace threads: " + "; ".join(f"{k}: {v['ms']:.1f} ms/{v['events']}" for k, v in r["threads"].items()))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variants", default="default,xla", help=f"comma list of {sorted(VARIANTS)}, '+' combines")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--stride", type=int, default=16)
  parser.add_argument("--steps", type=int, default=10, help="timed steps (synced, then pipelined)")
  parser.add_argument("--profile_steps", type=int, default=5, help="steps under the profiler (0: no trace)")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--explain", type=int, default=12, help="print the HLO behind the top N kernels")
  # Not under $OUT: the device tool brings back few files, and none this deep.
  parser.add_argument("--trace_dir", default="/tmp/profile_step")
  parser.add_argument("--json", help="write every variant's result here")
  args = parser.parse_args(argv)
  if args.batch < 8 or args.batch % 4:
    parser.error(f"--batch {args.batch}: expected a multiple of 4 (P identities x K = 4), at least 8")
  from clipreid_jax import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.keep_step_buffers_mapped()  # as the trainer does, before JAX starts its backend
  results = []
  for name in args.variants.split(","):
    try:
      r = run_variant(name, args)
    except Exception as e:  # pylint: disable=broad-except
      import traceback  # pylint: disable=g-import-not-at-top
      traceback.print_exc()
      r = dict(variant=name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
      print(f"\n== {name}: ERROR {r['error']}", flush=True)
    else:
      print_variant(r)
    print("PROFILE " + json.dumps({k: v for k, v in r.items()
                                   if k not in ("top_kernels", "top_ops", "threads", "explained", "components")}),
          flush=True)
    results.append(r)
    if args.json:  # after every variant: a part cut by its timeout keeps the variants that finished
      with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
