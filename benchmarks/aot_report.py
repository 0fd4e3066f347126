"""The trainer's programs compiled for a GPU or TPU that is not here (ahead of time, no device needed): what each
would hold in device memory and, on a GPU, what the host launches per call.

    pip install "jax-cuda12-plugin[with-cuda]==$(python -c 'import jax; print(jax.__version__)')"  # GPU targets, ~6 GB
    pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"                   # TPU targets
    python benchmarks/aot_report.py --targets h100,tpu:v5e:2x4
    python benchmarks/aot_report.py --targets h100 --variants default,nogradnorm,nographs
    python benchmarks/aot_report.py --targets cpu --tiny     # smoke run: this CPU, a small model, no plugin

Targets: `h100`, `h200` (one NVIDIA GPU, described to XLA by GPU_SPECS below), `tpu:<topology>` (a TPU slice,
e.g. tpu:v5e:2x4 or tpu:v6e:4x4: one device per chip, as the trainer's mesh), `cpu` (this host).
Programs, built from a recipe config (default configs/msmt17_vit.py, MSMT17's sizes) as the trainer builds them:
stage2 (one stage-2 step over the state's leaves, steps.loop_step), stage1 (one stage-1 epoch over the feature
bank, one compiled loop), eval (the test feature of an evaluation batch). The state is replicated and the batch
split over one 'data' axis of all the target's devices, as on a real run (train.make_mesh).

Per target and program: compile s; per-device memory from XLA's buffer assignment (arguments, outputs, donated
arguments reused as outputs, temporaries; peak = arguments + outputs - donated + temporaries); on a GPU target,
from XLA's thunk dump: the thunks in the program (kernels, cuDNN and cuBLAS calls, copies; a loop's body counted
once), the CUDA graphs (command buffers) XLA records them into, and the thunks the host launches one by one per
call and per loop iteration (graphs, and the kinds left outside them: cuDNN's attention, convolutions); the
collectives (all-reduce etc.) in the optimised HLO.

Not measured here: time. XLA picks its kernels' tiling without a device (no autotuning), so the executable may
differ in tiling, not in structure, from one compiled on the machine.
Variants (GPU structure): default; nogradnorm (the step without its grad_norm metric); nographs (XLA's CUDA graphs
off); allgraphs (every thunk kind XLA can record into a graph).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import re
import runpy
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # pylint: disable=g-import-not-at-top,wrong-import-position
import profile_step  # pylint: disable=g-import-not-at-top,wrong-import-position

# XLA's description of each GPU (stream_executor's DeviceDescription fields, as its gpu_specs/*.txtpb give them).
_GPU_COMMON = """
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 shared_memory_per_block_optin: 232448 cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  memory_bandwidth: {bandwidth} device_memory_size: {memory}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{name}"
"""
GPU_SPECS = {
    "h100": "gpu_device_info {" + _GPU_COMMON.format(bandwidth=3352320000000, memory=84929347584,
                                                     name="NVIDIA H100 80GB HBM3"),
    "h200": "gpu_device_info {" + _GPU_COMMON.format(bandwidth=4800000000000, memory=150754820096,
                                                     name="NVIDIA H200"),
}
VARIANTS = {  # name -> (compiler options, step without grad_norm); the graph options are profile_step's
    "default": ({}, False),
    "nogradnorm": ({}, True),
    "nographs": (profile_step.VARIANTS["nographs"][1], False),
    "allgraphs": (profile_step.VARIANTS["allgraphs"][1], False),
}
PROGRAMS = ("stage2", "stage1", "eval")  # stage1 only where the model has a text side (not a baseline)
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def _prepare_environment(targets: list[str]) -> None:
  """Before JAX starts: a GPU target on a host without a GPU needs the CUDA plugin to skip its device checks."""
  if any(t in GPU_SPECS for t in targets) and not C.on_gpu_machine():
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")


class TargetError(Exception):
  """A target this host cannot compile for."""


def target_mesh(target: str):
  """(mesh over the target's devices with one 'data' axis, platform name)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  if target == "cpu":
    return Mesh(np.asarray(jax.devices("cpu")), ("data",)), "cpu"
  if target in GPU_SPECS:
    try:
      topo = topologies.get_topology_desc(platform="cuda", target_config=GPU_SPECS[target], topology="1x1x1")
    except Exception as e:  # pylint: disable=broad-except
      raise TargetError(f"no CUDA compiler here ({type(e).__name__}: {str(e)[:200]}); expected "
                        "jax-cuda12-plugin[with-cuda] of this jax's version (see the docstring)") from None
    return Mesh(np.asarray(topo.devices), ("data",)), "gpu"
  if target.startswith("tpu:"):
    try:
      topo = topologies.get_topology_desc(topology_name=target[4:], platform="tpu")
    except Exception as e:  # pylint: disable=broad-except
      raise TargetError(f"no TPU topology {target[4:]!r} here ({type(e).__name__}: {str(e)[:200]}); expected libtpu "
                        "(pip install jax[tpu]) and a name such as v5e:2x4") from None
    return Mesh(np.asarray(topo.devices), ("data",)), "tpu"
  raise TargetError("unknown target; expected h100, h200, tpu:<topology> or cpu")


# --------------------------------------------------------------------------------------------------
# The programs, abstract: shapes and shardings only, nothing is computed.


@dataclasses.dataclass
class Recipe:
  config: object
  model: object
  variables: dict  # jax.ShapeDtypeStruct leaves
  num_train: int


def recipe(config_path: str, platform: str, tiny: bool, attention: str = "auto") -> Recipe:
  """The recipe's model for `platform` ('gpu', 'tpu', 'cpu'), abstract, with MSMT17's identities and cameras."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from clipreid_jax import train  # pylint: disable=g-import-not-at-top
  from clipreid_jax.models import clipreid  # pylint: disable=g-import-not-at-top
  from clipreid_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  path, _, arg = config_path.partition(":")
  config = runpy.run_path(path)["get_config"](*([arg] if arg else []))
  config.model.attention = attention
  m = config.model
  backbone = "vit" if m.backbone.startswith("ViT") else "rn50"
  clip_cfg = C.clip_config(backbone)
  if tiny:  # the smoke run's small model
    clip_cfg = dataclasses.replace(clip_cfg, vision_layers=2 if backbone == "vit" else (1, 1, 1, 1),
                                   vision_width=64, embed_dim=64, text_width=64, text_heads=1, text_layers=1)
  clip_lib.TARGET_PLATFORM = platform  # cuDNN's attention on a GPU target, the CPU-only settings on the CPU
  train.use_attention(config)
  cfg = clipreid.reid_config(clip_cfg, num_classes=C.MSMT17["num_ids"], input_size=tuple(m.input_size),
                             stride=m.stride, sie_camera=m.sie_camera, sie_view=m.sie_view,
                             camera_num=C.MSMT17["num_cams"], view_num=1, sie_coe=m.sie_coe,
                             dataset=config.dataset.name, with_text=not m.baseline, prompt_tokens=m.prompt_tokens,
                             prompt_noun=train.prompt_noun(config))
  dtype = {"auto": jnp.float32 if platform == "cpu" else jnp.bfloat16, "float32": jnp.float32,
           "bfloat16": jnp.bfloat16}[m.dtype]
  model = clipreid.CLIPReID(cfg, dtype)
  return Recipe(config, model, clipreid.expected_variables(cfg), C.MSMT17["num_train"])


def _abstract(tree, sharding):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def programs(r: Recipe, mesh, without_grad_norm: bool) -> dict:
  """{name: (compiler options -> jitted function, abstract arguments)} of the trainer's programs for `mesh`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from clipreid_jax import optim, steps, train  # pylint: disable=g-import-not-at-top
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  config, model, variables = r.config, r.model, r.variables
  cfg = model.config
  h, w = cfg.input_size
  sds = jax.ShapeDtypeStruct
  out = {}

  s2 = config.stage2
  batch = s2.num_ids * s2.num_instances
  tx = train.stage2_optimizer(config, model, -(-r.num_train // batch))
  text = sds((cfg.num_classes, cfg.clip.embed_dim), jnp.float32) if cfg.with_text else None
  state = jax.eval_shape(lambda v, t: steps.create_state(v["params"], v["batch_stats"], tx, t), variables, text)
  step = train.stage2_step(config, model, tx)
  if without_grad_norm:
    with_norm = step

    def step(state, batch, rng):  # pylint: disable=function-redefined
      saved = steps.trainable_grad_norm  # read by the step when it is traced
      steps.trainable_grad_norm = lambda grads, stage: jnp.zeros((), jnp.float32)
      try:
        return with_norm(state, batch, rng)
      finally:
        steps.trainable_grad_norm = saved
  images = {"image": sds((batch, h, w, 3), jnp.uint8), "pid": sds((batch,), jnp.int32),
            "camid": sds((batch,), jnp.int32), "viewid": sds((batch,), jnp.int32)}
  treedef = jax.tree.structure(state)
  out["stage2"] = (lambda opts: steps.loop_step(step, treedef, compiler_options=opts),
                   (_abstract(jax.tree.leaves(state), replicated), _abstract(images, split),
                    sds((2,), jnp.uint32, sharding=replicated)))

  if cfg.with_text:
    s1 = config.stage1
    tx1 = optim.stage1_optimizer(train.stage1_solver(config), -(-r.num_train // s1.batch_size))
    state1 = jax.eval_shape(lambda v: steps.create_state(v["params"], v["batch_stats"], tx1), variables)
    n = r.num_train
    epoch = steps.make_stage1_epoch(model, tx1, s1.batch_size)
    out["stage1"] = (lambda opts: jax.jit(epoch, donate_argnums=0, compiler_options=opts),
                     (_abstract(state1, replicated), sds((n, cfg.clip.embed_dim), jnp.float32, sharding=replicated),
                      sds((n,), jnp.int32, sharding=replicated), sds((n,), jnp.int32, sharding=replicated)))

  e = config.eval.batch_size
  features = steps.make_feature_fn(model, "eval", flip=config.eval.flip)
  out["eval"] = (lambda opts: jax.jit(features, compiler_options=opts),
                 (_abstract(variables, replicated),
                  _abstract({"image": sds((e, h, w, 3), jnp.uint8), "camid": sds((e,), jnp.int32),
                             "viewid": sds((e,), jnp.int32)}, split)))
  return out


# --------------------------------------------------------------------------------------------------
# What the compiled program holds and launches.


_CONTAINERS = ("kCommandBuffer", "kWhile", "kConditional", "kSequential")


def thunk_structure(text: str) -> dict:
  """Counts from XLA:GPU's thunk-sequence dump, where a thunk's nested thunks follow it, indented further:
  - host_launches: the top-level thunks, which the host launches one by one at each call (a CUDA graph, a cuDNN
    call, a loop, ...); per_iteration: those the host launches at each iteration of a loop (a while thunk's body);
  - graphs: the command buffers (CUDA graphs) among both; kernels: every thunk that is not a container;
    in_graphs: the kernels recorded into the graphs; outside_graphs: the kinds launched one by one."""
  stack = []  # (indent, kind) of the thunks enclosing the current line
  top, per_iteration, outside = collections.Counter(), collections.Counter(), collections.Counter()
  kernels = in_graphs = 0
  for line in text.splitlines():
    m = re.match(r"^( *)\d+: (k\w+)", line)
    if not m:
      continue  # "condition:", "body:" and other labels
    indent, kind = len(m.group(1)), m.group(2)
    while stack and stack[-1][0] >= indent:
      stack.pop()
    enclosing = {k for _, k in stack}
    leaf = kind not in _CONTAINERS
    kernels += leaf
    if "kCommandBuffer" in enclosing:
      in_graphs += leaf
    else:
      (per_iteration if enclosing & {"kWhile", "kConditional"} else top)[kind] += 1
      if leaf:
        outside[kind] += 1
    stack.append((indent, kind))
  return {"host_launches": sum(top.values()), "per_iteration": sum(per_iteration.values()),
          "graphs": top["kCommandBuffer"] + per_iteration["kCommandBuffer"], "kernels": kernels,
          "in_graphs": in_graphs, "outside_graphs": dict(sorted(outside.items()))}


def collectives(hlo: str) -> dict:
  """{collective op: count} in an optimised HLO module's text (an async pair counted once, by its start)."""
  found = {op: len(re.findall(rf"\s{op}(?:-start)?\(", hlo)) for op in COLLECTIVES}
  return {k: v for k, v in found.items() if v}


def report(fn, args, platform: str, dump_dir: str | None) -> dict:
  t = time.perf_counter()
  compiled = fn.lower(*args).compile()
  row = {"compile_s": time.perf_counter() - t}
  mem = compiled.memory_analysis()
  if mem is not None:
    gib = lambda b: b / 2**30
    row.update(arguments_gib=gib(mem.argument_size_in_bytes), outputs_gib=gib(mem.output_size_in_bytes),
               donated_gib=gib(mem.alias_size_in_bytes), temp_gib=gib(mem.temp_size_in_bytes),
               peak_gib=gib(C.buffer_bytes(compiled)))
  row["collectives"] = collectives(compiled.as_text())
  if platform == "gpu" and dump_dir:
    files = (sorted(glob.glob(os.path.join(dump_dir, "*thunk_sequence_after_thunk_passes.txt")))
             or sorted(glob.glob(os.path.join(dump_dir, "*thunk_sequence.txt"))))
    if files:
      with open(files[-1]) as f:
        row.update(thunk_structure(f.read()))
  return row


def _fmt(x, digits=2) -> str:
  return "-" if x is None else f"{x:.{digits}f}"


def print_table(rows: list[dict]) -> None:
  print("| target | devices | program | variant | compile s | arguments GiB | temporaries GiB | peak GiB per device "
        "| kernels in the program | CUDA graphs | host launches per call (per loop iteration) | outside the graphs "
        "| collectives |")
  print("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
  for r in rows:
    if "error" in r:
      print(f"| {r['target']} | {r.get('devices', '-')} | {r['program']} | {r['variant']} | error: {r['error']} "
            "| | | | | | | | |")
      continue
    outside = ", ".join(f"{k[1:]} {v}" for k, v in r.get("outside_graphs", {}).items()) or "-"
    launches = r.get("host_launches", "-")
    if r.get("per_iteration"):
      launches = f"{launches} ({r['per_iteration']})"
    coll = ", ".join(f"{k} {v}" for k, v in r["collectives"].items()) or "-"
    variant = (r["variant"] + (", XLA's attention" if r.get("attention") == "xla" else "")
               + (f" ({r['note']})" if r.get("note") else ""))
    print(f"| {r['target']} | {r['devices']} | {r['program']} | {variant} | {r['compile_s']:.1f} "
          f"| {_fmt(r.get('arguments_gib'))} | {_fmt(r.get('temp_gib'))} | {_fmt(r.get('peak_gib'))} "
          f"| {r.get('kernels', '-')} | {r.get('graphs', '-')} | {launches} | {outside} "
          f"| {coll} |")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--targets", default="h100", help="comma-separated: h100, h200, tpu:<topology>, cpu")
  p.add_argument("--config", default=os.path.join(C.REPO, "configs", "msmt17_vit.py"),
                 help="a recipe config file, optionally with ':variant' (configs/msmt17_vit.py:sie_olp); the "
                      "model gets MSMT17's identities and cameras, stage 1 its 32,621 images")
  p.add_argument("--programs", default=",".join(PROGRAMS), help=f"comma-separated, of {', '.join(PROGRAMS)}")
  p.add_argument("--variants", default="default", help=f"comma-separated, of {', '.join(VARIANTS)}")
  p.add_argument("--attention", choices=["auto", "xla"], default="auto",
                 help="as model.attention: auto (cuDNN's on a GPU target, as the trainer's default), xla (XLA's)")
  p.add_argument("--tiny", action="store_true", help="a small model (smoke run)")
  p.add_argument("--json", default=None, help="write the rows here")
  args = p.parse_args(argv)
  targets = [t for t in args.targets.split(",") if t]
  variants = [v for v in args.variants.split(",") if v]
  for v in variants:
    if v not in VARIANTS:
      p.error(f"--variants: unknown variant {v!r}; expected one of {', '.join(VARIANTS)}")
  for name in [x for x in args.programs.split(",") if x]:
    if name not in PROGRAMS:
      p.error(f"--programs: unknown program {name!r}; expected one of {', '.join(PROGRAMS)}")
  _prepare_environment(targets)
  from clipreid_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  saved = clip_lib.TARGET_PLATFORM, clip_lib.ATTENTION_IMPLEMENTATION  # recipe() sets both for each target
  try:
    rows = _rows(args, targets, variants)
  finally:
    clip_lib.TARGET_PLATFORM, clip_lib.ATTENTION_IMPLEMENTATION = saved
  print()
  print_table(rows)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 1 if any("error" in r for r in rows) else 0


def _rows(args, targets: list[str], variants: list[str]) -> list[dict]:
  wanted = [x for x in args.programs.split(",") if x]
  rows = []
  for target in targets:
    try:
      mesh, platform = target_mesh(target)
    except TargetError as e:
      print(f"error: --targets {target}: {e}", file=sys.stderr)
      rows.append({"target": target, "program": "-", "variant": "-", "error": str(e).split(" (")[0]})
      continue
    r = recipe(args.config, platform, args.tiny, args.attention)
    for variant in variants:
      options, without_grad_norm = VARIANTS[variant]
      if options and platform != "gpu":
        continue  # XLA:GPU's options: elsewhere the program would be the default's
      progs = programs(r, mesh, without_grad_norm)
      for name in [x for x in wanted if x in progs]:
        if without_grad_norm and name != "stage2":
          continue  # the other programs have no grad_norm
        build, prog_args = progs[name]
        # XLA:GPU's thunk sequence is read from its dump (HLO passes not dumped), removed once read.
        dump_dir = tempfile.mkdtemp(prefix=f"aot_{name}_") if platform == "gpu" else None
        opts = dict(options, xla_dump_to=dump_dir, xla_dump_hlo_pass_re="^$") if dump_dir else {}
        row = {"target": target, "devices": mesh.size, "program": name, "variant": variant,
               "attention": args.attention}
        try:
          try:
            row.update(report(build(opts or None), prog_args, platform, dump_dir))
          except Exception as e:  # pylint: disable=broad-except
            if "Couldn't find output tile sizes" not in str(e):
              raise
            # Without a device XLA cannot autotune, and the default tiling of some Triton GEMM fusions is invalid
            # (float32 products, XLA's attention: both run on a GPU, where the autotuner skips such tilings). cuBLAS
            # then takes every product; the row says so.
            opts = dict(opts, xla_gpu_enable_triton_gemm=False)
            row.update(report(build(opts), prog_args, platform, dump_dir), note="Triton GEMM off")
        except Exception as e:  # pylint: disable=broad-except  # one program's failure is a row, not the end
          row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        finally:
          if dump_dir:
            shutil.rmtree(dump_dir, ignore_errors=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
  return rows


if __name__ == "__main__":
  sys.exit(main())
