"""Host data throughput: decode + resize per core, and the whole grain pipeline per worker.

    python benchmarks/data_benchmark.py [--seconds 3] [--input 256,128]

Writes a synthetic Market-layout dataset of 128x64 JPEGs to a temporary folder, then measures
  - decode + resize per core: `read_image` + PIL bicubic (train) or bilinear (test) resize to the input size,
    one thread, images per second;
  - pipeline per worker: `train_loader` (PK plan, grain, decode, resize, batching) with one reading thread and no
    worker process, and the same with one grain worker process (start-up excluded), images per second;
  - the PK plan of an MSMT17-sized training split (32,621 images, 1,041 identities), seconds per epoch;
  - `augment` on this machine's JAX backend, images per second (informative: it runs on the accelerator in training).
It prints a table and ends with one line per goal: `goal NAME: measured X target Y met` (or `not met`).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clipreid_jax import data  # pylint: disable=g-import-not-at-top
from clipreid_jax.data import images  # pylint: disable=g-import-not-at-top

GOALS = {"decode_resize_per_core": 400.0, "pipeline_per_worker": 400.0}


def _rate(fn, items, seconds: float) -> float:
  """Items per second of fn over `items`, cycling for at least `seconds`."""
  fn(items[0])  # warm up
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    for item in items:
      fn(item)
    n += len(items)
  return n / (time.perf_counter() - start)


def _pipeline_rate(split, size, seconds: float, worker_count: int) -> float:
  """Images per second of the train loader; each epoch's clock starts at its first batch (start-up excluded)."""
  import grain  # pylint: disable=g-import-not-at-top
  opts = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
  count, elapsed, epoch = 0, 0.0, 0
  while elapsed < seconds:
    epoch += 1
    loader = data.train_loader(split, image_size=size, num_ids=16, num_instances=4, seed=0, epoch=epoch,
                               read_options=opts, worker_count=worker_count)
    it = iter(loader)
    try:
      next(it)
      start = time.perf_counter()
      for batch in it:
        count += len(batch["index"])
      elapsed += time.perf_counter() - start
    finally:
      if hasattr(it, "close"):
        it.close()
  return count / elapsed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement")
  parser.add_argument("--input", default="256,128", help="input size H,W of the model")
  parser.add_argument("--skip-workers", action="store_true", help="skip the grain worker-process measurement")
  args = parser.parse_args()
  size = tuple(int(x) for x in args.input.split(","))
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    data.write_synthetic_market(tmp, num_train_ids=128, num_test_ids=16, imgs_per_id=12, num_cams=6, size=(128, 64))
    n_written = 128 * 12 + 16 * 12 + 16
    rows.append(("synthetic write 128x64 JPEG", n_written / (time.perf_counter() - start), "img/s"))
    ds = data.get_dataset("market1501", tmp)
    paths = [ds.train.path(i) for i in range(len(ds.train))]
    rows.append(("decode only (read_image)", _rate(images.read_image, paths, args.seconds), "img/s"))
    train = _rate(lambda p: images.load_resized(p, size, images.BICUBIC), paths, args.seconds)
    test = _rate(lambda p: images.load_resized(p, size, images.BILINEAR), paths, args.seconds)
    rows.append((f"decode + bicubic resize to {size[0]}x{size[1]} (1 core)", train, "img/s"))
    rows.append((f"decode + bilinear resize to {size[0]}x{size[1]} (1 core)", test, "img/s"))
    pipe = _pipeline_rate(ds.train, size, args.seconds, worker_count=0)
    rows.append(("train pipeline, 1 thread, no worker process", pipe, "img/s"))
    if not args.skip_workers:
      pipe_mp = _pipeline_rate(ds.train, size, args.seconds, worker_count=1)
      rows.append(("train pipeline, 1 grain worker process", pipe_mp, "img/s"))

  pids = np.repeat(np.arange(1041), np.diff(np.linspace(0, 32621, 1042).astype(int)))
  start = time.perf_counter()
  data.pk_epoch_plan(pids, num_ids=16, num_instances=4, seed=0, epoch=1)
  rows.append(("PK plan, MSMT17-sized split", time.perf_counter() - start, "s/epoch"))

  import jax  # pylint: disable=g-import-not-at-top
  batch = np.random.default_rng(0).integers(0, 256, (64, *size, 3), dtype=np.uint8)
  aug = jax.jit(functools.partial(data.augment, mean=(0.5,) * 3, std=(0.5,) * 3))
  x = jax.device_put(batch)
  jax.block_until_ready(aug(x, jax.random.key(0)))
  reps, start = 0, time.perf_counter()
  while time.perf_counter() - start < args.seconds:
    jax.block_until_ready(aug(x, jax.random.key(reps)))
    reps += 1
  rows.append((f"augment on {jax.devices()[0].platform} (batch 64)", reps * 64 / (time.perf_counter() - start),
               "img/s"))

  width = max(len(r[0]) for r in rows)
  print(f"{'measurement':<{width}}  {'value':>10}  unit")
  for name, value, unit in rows:
    print(f"{name:<{width}}  {value:>10.{3 if unit == 's/epoch' else 0}f}  {unit}")
  # Per worker: one grain worker process when measured (it includes the transfer to the main process).
  measured = {"decode_resize_per_core": min(train, test), "pipeline_per_worker": pipe if args.skip_workers else pipe_mp}
  for name, target in GOALS.items():
    verdict = "met" if measured[name] >= target else "not met"
    print(f"goal {name}: measured {measured[name]:.0f} target {target:.0f} {verdict}")


if __name__ == "__main__":
  main()
