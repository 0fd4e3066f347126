"""Multi-host data parallelism: 2 processes (jax.distributed over gloo, 2 CPU devices each) equal 1 process, and
both write one checkpoint that restores exactly."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np

from clipreid_jax.data.synthetic import write_synthetic_market
from train_helpers import CLI_MAIN, SLOW_STEPS, tiny_config

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
  # Evaluation over a mesh that interleaves the hosts' devices: every feature still pairs with its own image.
  assert multi["eval_index"] == ref["eval_index"]
  np.testing.assert_allclose(np.asarray(multi["eval_features"]), np.asarray(ref["eval_features"]), rtol=1e-5,
                             atol=1e-6)


# Each stage-2 batch 0.2 s late: the SIGTERM sent once host 0 logs "epoch 1 step 2" must reach host 1 before training
# ends, ~1.4 s later on an idle machine; one that lands after training is not agreed on (host 1 dies of it, host 0
# aborts ~100 s later).


class _Host:
  """One process of a 2-process CLI run; its output lines are collected as they come."""

  def __init__(self, index: int, port: int, data, work, extra=(), slow_steps: bool = False):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    args = ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(index),
            "--config", f"{HERE / 'tiny_run_config.py'}:{data}", "--workdir", str(work), *extra]
    cmd = ["-c", SLOW_STEPS + CLI_MAIN] if slow_steps else ["-m", "clipreid_jax.main"]
    self.p = subprocess.Popen([sys.executable, *cmd, *args], cwd=HERE.parent, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.lines: list = []
    self._reader = threading.Thread(target=lambda: self.lines.extend(self.p.stdout), daemon=True)
    self._reader.start()

  def saw(self, text: str) -> bool:
    return any(text in line for line in list(self.lines))

  def wait(self) -> int:
    code = self.p.wait(timeout=600)
    self._reader.join(timeout=10)
    return code


def test_two_hosts_train_through_the_cli_and_resume_after_sigterm_to_one(tmp_path):
  """The trainer on 2 processes: stage1/ and model/ are written by process 0 while the others wait (they used to
  deadlock in orbax's barriers), and a SIGTERM that reaches one host only is agreed on by both, which save the
  same checkpoint and exit 143 (each used to act alone: a deadlock, nothing saved); the same command resumes and
  finishes, pictures included (their dataset read used to wait for the other host)."""
  data, work = tmp_path / "data", tmp_path / "work"
  port = _free_port()
  hosts = [_Host(i, port, data, work, slow_steps=True) for i in range(2)]
  end = time.time() + 600
  while not hosts[0].saw("stage 2 epoch 1 step 2/") and time.time() < end:
    assert hosts[0].p.poll() is None and hosts[1].p.poll() is None, "".join(hosts[0].lines[-30:])
    time.sleep(0.01)
  hosts[1].p.send_signal(signal.SIGTERM)
  codes = [h.wait() for h in hosts]
  assert codes == [143, 143], (codes, "".join(hosts[0].lines[-20:]), "".join(hosts[1].lines[-20:]))
  assert (work / "stage1" / "config.json").is_file() and any((work / "checkpoints").iterdir())
  port = _free_port()
  hosts = [_Host(i, port, data, work, ["--config.visualize=True"]) for i in range(2)]
  codes = [h.wait() for h in hosts]
  assert codes == [0, 0], (codes, "".join(hosts[0].lines[-20:]), "".join(hosts[1].lines[-20:]))
  assert (work / "model" / "config.json").is_file() and (work / "visualizations" / "curves.png").is_file()
  assert json.loads((work / "metrics.json").read_text())["final"]["mAP"] > 0


def test_two_hosts_stop_together_when_process_0_cannot_write_the_synthetic_data(tmp_path):
  """Process 0 writes the synthetic data while the others wait; where it fails (here the root holds someone
  else's files), every host stops with a one-line error (the others used to wait at the barrier forever)."""
  data, work = tmp_path / "data", tmp_path / "work"
  (data / "query").mkdir(parents=True)
  (data / "query" / "mine.jpg").write_bytes(b"not the generator's")
  port = _free_port()
  hosts = [_Host(i, port, data, work) for i in range(2)]
  codes = [h.wait() for h in hosts]
  assert codes == [2, 2], (codes, "".join(hosts[0].lines[-20:]), "".join(hosts[1].lines[-20:]))
  # The last error line (stdout and stderr are merged here, and gloo's own stdout lines may come after it).
  errors = [[l[l.index("error: "):].strip() for l in h.lines if "error: " in l] for h in hosts]
  assert all(errors), ("".join(hosts[0].lines[-20:]), "".join(hosts[1].lines[-20:]))
  last = [e[-1] for e in errors]
  assert last[0].startswith("error: synthetic:") and "did not write" in last[0], last[0]
  assert last[1] == f"error: synthetic: process 0 could not write {data} (its error is in its output)", last[1]
  assert not any(h.saw("Traceback") for h in hosts) and not work.exists()
