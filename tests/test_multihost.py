"""Multi-host data parallelism: 2 processes (jax.distributed over gloo, 2 CPU devices each) equal 1 process, and
both write one checkpoint that restores exactly."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

from clipreid_jax.data.synthetic import write_synthetic_market
from train_helpers import tiny_config

HERE = pathlib.Path(__file__).parent


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_hosts_equal_one(tmp_path):
  c = tiny_config(tmp_path / "data")
  write_synthetic_market(c.dataset.root, num_train_ids=c.dataset.num_train_ids, num_test_ids=c.dataset.num_test_ids,
                         imgs_per_id=c.dataset.imgs_per_id, num_cams=c.dataset.num_cams, seed=c.dataset.seed)
  env = dict(os.environ, PYTHONPATH=str(HERE), XLA_FLAGS="--xla_force_host_platform_device_count=2")
  port = str(_free_port())
  script = str(HERE / "multihost_check.py")
  procs = [subprocess.Popen([sys.executable, script, c.dataset.root, port, str(i), "2", str(tmp_path / "multi.json")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  single = subprocess.run([sys.executable, script, c.dataset.root, port, "0", "1", str(tmp_path / "single.json")],
                          env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"), capture_output=True,
                          text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  multi, ref = json.loads((tmp_path / "multi.json").read_text()), json.loads((tmp_path / "single.json").read_text())
  assert (multi["devices"], multi["processes"]) == (4, 2) and (ref["devices"], ref["processes"]) == (4, 1)
  assert multi["restored_equal"] and ref["restored_equal"]  # checkpoints written by both hosts restore exactly
  assert multi["local_batch"] * 2 == ref["local_batch"]  # each host loaded half of the global batch
  assert abs(multi["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"])
  np.testing.assert_allclose(np.asarray(multi["kernel"]), np.asarray(ref["kernel"]), rtol=0, atol=1e-6)
