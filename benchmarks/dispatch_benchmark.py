"""Host time per step in the trainer's stage-2 loop: the state passed as a pytree against its leaves, in one process.

    python benchmarks/dispatch_benchmark.py                  # ViT-B/16, MSMT17 recipe's optimizer state
    python benchmarks/dispatch_benchmark.py --calls 1000 --real_steps 0     # host rows only (no step compiled)

Forms (both over the same full-size state: ViT-B/16 with random weights, the trainer's optimizer, donated):
- pytree: `jax.jit(step)` over the TrainState, its key derived by an eager `fold_in` per call, its metrics summed by
  `jax.tree.map(jnp.add)`: the trainer's loop before this benchmark.
- leaves: `steps.loop_step` over the state's leaves (the key folded inside the compiled call), metrics summed by
  `steps.add_metrics`: the trainer's loop now.
Rows:
- host: a step with no device work (the state passes through, its counter + 1, the real step's metrics), so the
  time is the loop's host cost alone: mean over --calls calls, the collector included, and the median call (one
  without a full pass of the collector). "gc" is the collector's share
  (gc.callbacks) and "full" its full passes (generation 2) per 100 calls; each pass walks every object the collector
  tracks ("objects", at the row's end), so its cost grows with the heap. "+freeze" rows run after gc.freeze() (the
  heap at that point moved out of the collector's reach, and out of "objects"). Full passes are rare (one per ~150
  calls on the CPU host): --calls 300 or more to see their share.
- step: the real stage-2 step (batch --batch): median host time for one call to return ("dispatch"; the device
  works on after it) and the first step's loss, equal in both forms (the same key, the same draws).
The last line compares the forms' host rows.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # pylint: disable=g-import-not-at-top,wrong-import-position
import step_benchmark as SB  # pylint: disable=g-import-not-at-top,wrong-import-position


class GcMeter:
  """Time and full passes of Python's cyclic collector between reset() and read()."""

  def __init__(self):
    self.events = []
    gc.callbacks.append(self._record)

  def _record(self, phase, info):
    self.events.append((phase, info["generation"], time.perf_counter()))

  def reset(self):
    self.events.clear()

  def read(self) -> tuple[float, int]:
    starts = [(g, t) for p, g, t in self.events if p == "start"]
    stops = [t for p, _, t in self.events if p == "stop"]
    spent = sum(b - a for (_, a), b in zip(starts, stops))
    return spent, sum(1 for g, _ in starts if g == 2)


def loops(step, treedef, key):
  """{form: (fn over its state, sum_metrics)}: one step call as each form's loop makes it."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from clipreid_jax import steps  # pylint: disable=g-import-not-at-top
  jitted = jax.jit(step, donate_argnums=0)
  leaf_step = steps.loop_step(step, treedef)

  def pytree(state, batch, done):
    return jitted(state, batch, jax.random.fold_in(key, done))

  def leaves(state, batch, done):
    del done  # loop_step folds the state's own counter in
    return leaf_step(state, batch, key)

  tree_sum = lambda a, b: jax.tree.map(jnp.add, a, b)
  return {"pytree": (pytree, tree_sum), "leaves": (leaves, steps.add_metrics)}


def host_row(fn, add, state, batch, calls: int, meter: GcMeter):
  """(state, mean and median host seconds per loop iteration, collector seconds per iteration, full passes per 100
  iterations). The mean carries the rare full passes; the median is an iteration without one."""
  import jax  # pylint: disable=g-import-not-at-top
  sums = None
  for i in range(10):  # compile and warm up
    state, metrics = fn(state, batch, i)
    sums = metrics if sums is None else add(sums, metrics)
  jax.block_until_ready(sums)
  meter.reset()
  times = []
  t = time.perf_counter()
  for i in range(calls):
    t_call = time.perf_counter()
    state, metrics = fn(state, batch, i)
    sums = add(sums, metrics)
    times.append(time.perf_counter() - t_call)
  jax.block_until_ready(sums)
  spent = time.perf_counter() - t
  gc_s, full = meter.read()
  return state, spent / calls, statistics.median(times), gc_s / calls, 100 * full / calls


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--backbone", default="vit", choices=["vit", "rn50"])
  p.add_argument("--calls", type=int, default=300, help="loop iterations per host row")
  p.add_argument("--real_steps", type=int, default=None, help="real steps timed per form (default: 20 on GPU, "
                 "3 on CPU; 0 skips the step rows and their compilation)")
  p.add_argument("--batch", type=int, default=None, help="real step's batch (default: 64 on GPU, 4 on CPU)")
  p.add_argument("--json", default=None, help="write the rows here too")
  args = p.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  gpu = jax.default_backend() == "gpu"
  real_steps = args.real_steps if args.real_steps is not None else (20 if gpu else 3)
  batch_size = args.batch or (64 if gpu else 4)
  job = dict(framework="jax", stage=2, backbone=args.backbone, batch=batch_size, stride=16, variant="default",
             input_size=[256, 128], iters=1, warmup=0, pipelined=1, groups="two")
  step, state, batch, dtype, _ = SB.build_jax_job(job)
  key = jax.random.PRNGKey(0)
  treedef = jax.tree.structure(state)
  metric_shapes = jax.eval_shape(step, state, batch, key)[1]

  def no_work(state, batch, rng):
    del rng  # the real step's metrics, made of nothing
    zero = batch["pid"][0].astype(jnp.float32) * 0
    return state.replace(step=state.step + 1), {k: zero + i for i, k in enumerate(metric_shapes)}

  # Each form holds the state its own way (donated at every call): converted on the way in and out.
  held = lambda state, form: state if form == "pytree" else jax.tree.leaves(state)
  tree = lambda s, form: s if form == "pytree" else jax.tree.unflatten(treedef, s)
  meter = GcMeter()
  rows = []
  for freeze in (False, True):
    if freeze:
      gc.collect()
      gc.freeze()
    for form, (fn, add) in loops(no_work, treedef, key).items():
      s, host_s, median_s, gc_s, full = host_row(fn, add, held(state, form), batch, args.calls, meter)
      state = tree(s, form)
      rows.append(dict(row="host", form=form + ("+freeze" if freeze else ""), host_us=1e6 * host_s,
                       median_us=1e6 * median_s, gc_us=1e6 * gc_s, full_per_100=full, objects=len(gc.get_objects())))
      print("ROW " + json.dumps(rows[-1]), flush=True)  # as it finishes: a part cut by its timeout keeps it
  gc.unfreeze()
  if real_steps:
    for form, (fn, _) in loops(step, treedef, key).items():
      done = int(jax.device_get(state.step))
      t = time.perf_counter()  # each form from a copy of the same state: the same first loss
      s, metrics = fn(held(jax.tree.map(jnp.copy, state), form), batch, done)
      first_loss = float(metrics["loss"])
      first_s = time.perf_counter() - t  # compilation included
      times = []
      for i in range(real_steps):
        t = time.perf_counter()
        s, metrics = fn(s, batch, done + 1 + i)
        times.append(time.perf_counter() - t)
        jax.block_until_ready(metrics)
      rows.append(dict(row="step", form=form, dispatch_ms=1e3 * statistics.median(times), first_s=first_s,
                       first_loss=first_loss, objects=len(gc.get_objects())))
      print("ROW " + json.dumps(rows[-1]), flush=True)

  print(f"\nstage-2 step calls in the trainer's loop, {args.backbone}, {treedef.num_leaves} state arrays in "
        f"{treedef.num_nodes} pytree nodes, {jnp.dtype(dtype).name}; device: {C.device_name()}; jax {jax.__version__}")
  print(f"{'row':<6}{'form':<16}{'host us':>10}{'median':>8}{'gc us':>9}{'full/100':>10}{'dispatch ms':>13}"
        f"{'first s':>9}{'loss':>10}{'objects':>10}")
  cell = lambda r, k, width, spec: f"{format(r[k], spec) if k in r else '-':>{width}}"
  for r in rows:
    print(f"{r['row']:<6}{r['form']:<16}{cell(r, 'host_us', 10, '.0f')}{cell(r, 'median_us', 8, '.0f')}"
          f"{cell(r, 'gc_us', 9, '.0f')}{cell(r, 'full_per_100', 10, '.2f')}{cell(r, 'dispatch_ms', 13, '.2f')}"
          f"{cell(r, 'first_s', 9, '.1f')}{cell(r, 'first_loss', 10, '.4f')}{r['objects']:>10,}")
  host = {r["form"]: r["host_us"] for r in rows if r["row"] == "host"}
  print(f"leaves/pytree host time: {host['leaves'] / host['pytree']:.2f}x "
        f"({host['pytree'] - host['leaves']:.0f} us less per step); after gc.freeze(): "
        f"{host['leaves+freeze'] / host['pytree+freeze']:.2f}x")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
