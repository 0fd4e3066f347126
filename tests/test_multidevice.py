"""Data parallelism over a Mesh of 8 simulated CPU devices equals a single-device run."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np

from clipreid_jax import train
from clipreid_jax.models.clipreid import load_clipreid
from train_helpers import tiny_config


def test_eight_cpu_devices_match_one():
  here = pathlib.Path(__file__).parent
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(here))
  out = subprocess.run([sys.executable, str(here / "multidevice_check.py")], capture_output=True, text=True,
                       env=env, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["devices"] == [1, 8]  # the batch really was split over 8 devices
  assert r["loss_diff"] < 1e-5  # batch statistics and losses over the global batch
  assert r["stats_diff"] < 1e-6
  assert r["grad_rel"] < 1e-4  # the golden gradient tolerance
  # One Adam step moves each element by about lr; a different reduction order may flip only near-zero gradients.
  assert r["param_diff"] <= 2 * r["lr"] * 2 + 1e-6
  assert 0 < r["final"]["mAP"] <= 1
  # The 8-device run's checkpoints resume on this process's one device (pre-empted on 8 GPUs, restarted on fewer):
  # its checkpoints name 8 devices, which failed as an orbax "topology mismatch".
  assert jax.device_count() == 1
  tmp = pathlib.Path(r["tmp"])
  work = tmp / "resumed"
  shutil.copytree(tmp / "work", work)
  checkpoints = sorted((work / "checkpoints").iterdir(), key=lambda p: int(p.name))
  shutil.rmtree(checkpoints[-1])  # back to the one before the last: stage 2 has an epoch left to train here
  shutil.rmtree(work / "model")
  (work / "metrics.json").unlink()
  resumed = train.train_and_evaluate(tiny_config(tmp / "data"), str(work))
  assert 0 < resumed["mAP"] <= 1
  ours, theirs = (jax.tree.leaves(load_clipreid(w / "model")[1]["params"]) for w in (work, tmp / "work"))
  for a, b in zip(ours, theirs):  # the same last epoch, over 1 device instead of 8: float rounding apart
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)
  shutil.rmtree(tmp, ignore_errors=True)
