"""Real processes of `python -m clipreid_jax.main` on the tiny config: killed (SIGKILL) at many points and restarted
with the same command, pre-empted with a real SIGTERM, a disk that fills up during a save, a diverging run, and two
runs of one seed; each must end with the variables and metrics of one uninterrupted run, bit for bit (CPU).

The processes share a persistent JAX compilation cache, so only the first one compiles (~10 s saved per process).
"""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from clipreid_jax.models.clipreid import load_clipreid
from train_helpers import CLI_MAIN, SLOW_STEPS, checkpoint_steps, folder_state, tensorboard_scalars

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "tiny_run_config.py"
# P = K = 2: stage-2 epochs of ~8 steps (logged every step), so a signal sent at step 1 lands mid-epoch.
OVERRIDES = ["--config.stage2.num_ids=2", "--config.stage2.num_instances=2", "--config.log_every_steps=1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
  root = tmp_path_factory.mktemp("resume")
  return {"root": root, "data": root / "data",
          "env": {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
                  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}}


def _args(env, workdir, *extra) -> list[str]:
  return ["--config", f"{CONFIG}:{env['data']}", "--workdir", str(workdir), *OVERRIDES, *extra]


def _run(env, workdir, *extra, code: str | None = None) -> subprocess.CompletedProcess:
  """The CLI to the end; `code` (Python run before main, e.g. a monkeypatch) replaces `-m clipreid_jax.main`."""
  argv = _args(env, workdir, *extra)
  if code is None:
    cmd = [sys.executable, "-m", "clipreid_jax.main", *argv]
  else:
    cmd = [sys.executable, "-c", code + CLI_MAIN, *argv]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env["env"])


def _variables(workdir) -> list[np.ndarray]:
  _, v = load_clipreid(pathlib.Path(workdir) / "model")
  return [np.asarray(x) for x in jax.tree.leaves(v)]


def _records(workdir) -> list[dict]:
  """metrics.jsonl without the wall-clock times."""
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in json.loads(l).items() if k not in ("time_s", "images_per_s")} for l in lines]


def _assert_same_run(workdir, reference) -> None:
  a, b = _variables(workdir), _variables(reference)
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert _records(workdir) == _records(reference)
  assert tensorboard_scalars(workdir) == tensorboard_scalars(reference)  # the epochs lost to a kill are not in TensorBoard twice
  summary = [json.loads((w / "metrics.json").read_text()) for w in (workdir, reference)]
  assert summary[0].pop("evaluated")["checkpoint"] == str((workdir / "model").resolve())  # each run's own model
  assert summary[1].pop("evaluated")["checkpoint"] == str((reference / "model").resolve())
  assert summary[0] == summary[1]  # the numbers, to the last digit


def _leftovers(workdir) -> list[pathlib.Path]:
  return [*workdir.glob(".*.partial-*"), *workdir.glob(".*.tmp-*"),
          *(workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*")]


def _meta(workdir, step: int) -> dict:
  return json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())


@pytest.fixture(scope="module")
def reference(env) -> pathlib.Path:
  work = env["root"] / "reference"
  out = _run(env, work)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1].startswith("final: mAP")
  return work


def test_same_seed_same_metrics(env, reference):
  """Determinism: a second run of the same seed writes the same metrics and variables, bit for bit (CPU).

  (The second run also loads its executables from the persistent cache the first one filled.)
  """
  work = env["root"] / "again"
  out = _run(env, work)
  assert out.returncode == 0, out.stderr[-3000:]
  _assert_same_run(work, reference)
  records = _records(reference)
  assert all(np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in records if "stage" in r)


# Ctrl-C as a terminal's foreground job has it: a suite started in the background (`cmd &` in a script) ignores
# SIGINT, and the run, inheriting that, rightly leaves it ignored. Then each stage-2 batch late (a Ctrl-C meant for
# epoch 1 had landed after training).
_SLOW_STEPS = """
import signal
signal.signal(signal.SIGINT, signal.default_int_handler)
""" + SLOW_STEPS


class _Process:
  """A CLI process whose output lines are collected as they come, to signal it at a chosen point."""

  def __init__(self, env, workdir, slow_steps: bool = False):
    cmd = ["-c", _SLOW_STEPS + CLI_MAIN] if slow_steps else ["-m", "clipreid_jax.main"]
    self.p = subprocess.Popen([sys.executable, *cmd, *_args(env, workdir)], cwd=REPO,
                              env=env["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.lines: list[str] = []
    self._reader = threading.Thread(target=lambda: self.lines.extend(self.p.stdout), daemon=True)
    self._reader.start()

  def saw(self, text: str) -> bool:
    return any(text in line for line in list(self.lines))

  def signal_when(self, condition, sig, timeout: float = 300) -> bool:
    """Polls `condition` every 2 ms; sends `sig` once it holds. False if the process ended first."""
    end = time.time() + timeout
    while time.time() < end:
      if condition():
        self.p.send_signal(sig)
        return True
      if self.p.poll() is not None:
        return False
      time.sleep(0.002)
    raise TimeoutError("the condition never held")

  def wait(self) -> int:
    code = self.p.wait(timeout=300)
    self._reader.join(timeout=10)
    return code


def _orbax_tmp(workdir) -> bool:
  return any((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))


def test_killed_anywhere_resumes_bit_exactly(env, reference):
  """SIGKILL in stage 1, during checkpoint writes, mid-epoch in stage 2, while stage1/ and model/ are written, a
  Ctrl-C (SIGINT) and a real SIGTERM mid-epoch; each time the same command restarts the run; the end is the
  uninterrupted run's."""
  work = env["root"] / "killed"
  points = [
      ("stage 1, writing checkpoint 1", lambda p: _orbax_tmp(work) or (work / "checkpoints" / "1").is_dir(),
       signal.SIGKILL),
      ("stage 1 -> 2, writing stage1/", lambda p: any(work.glob(".stage1.partial-*")) or (work / "stage1").is_dir(),
       signal.SIGKILL),
      ("stage 2 epoch 1, mid-epoch", lambda p: p.saw("stage 2 epoch 1 step 1/"), signal.SIGKILL),
      ("stage 2 epoch 1, Ctrl-C", lambda p: p.saw("stage 2 epoch 1 step 3/"), signal.SIGINT),
      ("stage 2 epoch 2, pre-empted", lambda p: p.saw("stage 2 epoch 2 step 1/"), signal.SIGTERM),
      ("stage 2, writing the last checkpoint", lambda p: p.saw("stage 2 epoch 2/2") and (
          _orbax_tmp(work) or _meta(work, checkpoint_steps(work)[-1]).get("epoch") == 2), signal.SIGKILL),
      ("after training, writing model/ or evaluating",
       lambda p: any(work.glob(".model.partial-*")) or (work / "model").is_dir(), signal.SIGKILL),
  ]
  hit = []
  for name, condition, sig in points:
    proc = _Process(env, work, slow_steps=sig != signal.SIGKILL)
    if not proc.signal_when(lambda c=condition, p=proc: c(p), sig):
      pytest.fail(f"{name}: the run ended before the point\n{''.join(proc.lines[-30:])}")
    code = proc.wait()
    leftovers = [p.name for p in _leftovers(work)]
    hit.append((name, code, leftovers))
    if sig == signal.SIGKILL:
      assert code == -signal.SIGKILL, (name, code, "".join(proc.lines[-30:]))
    else:  # SIGTERM (pre-emption) or Ctrl-C: a checkpoint of the current position, then exit code 143 or 130
      assert code == 128 + sig, (name, code, "".join(proc.lines[-30:]))
      assert not proc.saw("Traceback"), "".join(proc.lines[-30:])
      epoch = 1 if sig == signal.SIGINT else 2
      meta = _meta(work, checkpoint_steps(work)[-1])
      assert meta["stage"] == 2, meta
      assert meta["epoch"] == epoch or meta["next_batch"] > 0, meta  # saved mid-epoch (or at its end)
      assert proc.saw(f"pre-empted: saved stage 2 epoch {epoch}") or meta["epoch"] == epoch
      hit[-1] += (f"saved at step {meta['next_batch']} of epoch {epoch}" if "next_batch" in meta
                  else f"saved at the end of epoch {epoch}",)
  print("\n".join(f"{n}: exit {c}, left {l} {' '.join(rest)}" for n, c, l, *rest in hit))
  # Whatever the kills left must not matter: add the worst leftovers by hand before the last restart.
  (work / "checkpoints" / "99.orbax-checkpoint-tmp").mkdir(exist_ok=True)
  (work / "checkpoints" / "99.orbax-checkpoint-tmp" / "junk").write_bytes(b"\0" * 100)
  (work / ".model.partial-deadbeef").mkdir(exist_ok=True)
  with open(work / "metrics.jsonl", "a") as f:
    f.write('{"stage": 2, "epoch": 2, "lo')  # half a record
  out = _run(env, work)
  assert out.returncode == 0, out.stderr[-3000:]
  assert not _leftovers(work), _leftovers(work)
  _assert_same_run(work, reference)


_DISK_FULL = """
import errno, os
from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler
_save = handler.JsonCheckpointHandler._save_fn

async def _full_at_stage_2(self, x, directory):
  # The checkpoint's metadata is written after its arrays: the disk fills up with the step half written.
  if isinstance(x, dict) and x.get("stage") == 2:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  return await _save(self, x, directory)

handler.JsonCheckpointHandler._save_fn = _full_at_stage_2
"""


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(env, reference):
  work = env["root"] / "disk_full"
  out = _run(env, work, code=_DISK_FULL)
  assert out.returncode == 1, out.stderr[-3000:]
  line = out.stderr.strip().splitlines()[-1]
  assert line.startswith("error: ") and "No space left on device" in line, line
  assert f"the last good checkpoint {work / 'checkpoints' / '2'} is kept" in line, line
  assert checkpoint_steps(work) == [1, 2] and not _leftovers(work)  # the half-written step is gone
  assert not (work / "model").exists()
  out = _run(env, work)  # space freed: the same command resumes from checkpoint 2
  assert out.returncode == 0, out.stderr[-3000:]
  _assert_same_run(work, reference)


_STAGE1_DISK_FULL = """
from clipreid_jax import checkpoints
_make = checkpoints._checkpointer

def _checkpointer():
  ckptr = _make()
  save = ckptr.save

  def full_at_stage1(directory, *args, **kwargs):
    if ".stage1.partial-" in str(directory):
      # What tensorstore raises under orbax on a full disk: a ValueError (an OSError was caught, this was not).
      raise ValueError('RESOURCE_EXHAUSTED: Error writing "params.x/0" in OCDBT database at local file "'
                       + str(directory) + '": Failed to write 8 bytes to file 7: No space left on device '
                       "[os_error_code='28']")
    return save(directory, *args, **kwargs)
  ckptr.save = full_at_stage1
  return ckptr

checkpoints._checkpointer = _checkpointer
"""


def test_disk_full_while_writing_stage1_is_one_line_and_resumes(env, reference):
  """The model directories (stage1/, model/) fail like the checkpoints: one line, exit 1 (it was a traceback)."""
  work = env["root"] / "stage1_full"
  out = _run(env, work, code=_STAGE1_DISK_FULL)
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  line = out.stderr.strip().splitlines()[-1]
  assert line.startswith(f"error: {work / 'stage1'}: cannot save (cannot write the variables ([Errno 28] No space "
                         "left on device)); the training checkpoints are kept"), line
  assert "the training checkpoints are kept" in line and not (work / "stage1").exists() and not _leftovers(work)
  out = _run(env, work)  # space freed: stage 1 is not trained again, its checkpoint becomes stage1/
  assert out.returncode == 0, out.stderr[-3000:]
  _assert_same_run(work, reference)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(env, reference):
  work = env["root"] / "diverged"
  out = _run(env, work, "--config.stage2.base_lr=1e30")
  assert out.returncode == 1, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  line = out.stderr.strip().splitlines()[-1]
  assert line.startswith("error: stage 2 epoch 1 step "), line
  for piece in ("non-finite", "loss", "id_cls", "tri_proj", "i2t", "grad_norm",
                f"the last good checkpoint {work / 'checkpoints' / '2'} is kept"):
    assert piece in line, (piece, line)
  assert checkpoint_steps(work) == [1, 2]  # stage 1 only: nothing non-finite was saved
  assert not (work / "model").exists() and (work / "stage1").is_dir()


# Python run before the CLI: stage 2's step runs out of device memory at its first call, as XLA reports it (its
# allocator's state follows the first line).
OUT_OF_MEMORY = """
import jax
from clipreid_jax import steps
_loop_step = steps.loop_step
def _out_of_memory(*args, **kwargs):
  _loop_step(*args, **kwargs)
  def call(*a):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2634022912 bytes."
                                     "\\nBFCAllocator dump for GPU_0_bfc\\nBin (256): Total Chunks: 1")
  return call
steps.loop_step = _out_of_memory
"""


def test_device_out_of_memory_is_one_line_and_keeps_the_checkpoints(env, reference):
  work = env["root"] / "out_of_memory"
  out = _run(env, work, code=OUT_OF_MEMORY)
  assert out.returncode == 1, out.stderr[-3000:]
  assert "Traceback" not in out.stderr and "BFCAllocator" not in out.stderr, out.stderr[-3000:]
  line = out.stderr.strip().splitlines()[-1]
  assert line == ("error: the device ran out of memory (RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                  "2634022912 bytes.); expected more device memory or a smaller stage2.num_ids, stage1.batch_size, "
                  "eval.batch_size or model.input_size (python benchmarks/aot_report.py reports what a config needs "
                  "per device); the training checkpoints are kept"), line
  assert checkpoint_steps(work) == [1, 2] and (work / "stage1").is_dir() and not (work / "model").exists()
  out = _run(env, work)  # memory freed: the run resumes at stage 2 and ends as an uninterrupted one
  assert out.returncode == 0, out.stderr[-3000:]
  _assert_same_run(work, reference)


def test_workdir_of_another_configuration(env, reference):
  before = folder_state(reference)
  out = _run(env, reference, "--config.seed=7")
  assert out.returncode == 2, out.stderr[-3000:]
  line = out.stderr.strip().splitlines()[-1]
  assert line.startswith("error: ") and str(reference / "config.json") in line and "differs in seed" in line, line
  assert folder_state(reference) == before


def test_unreadable_checkpoint_is_named_and_nothing_changes(env, reference):
  for name, cut in (("corrupt", lambda f: f.stat().st_size // 2), ("one_cut", lambda f: 100)):
    work = shutil.copytree(reference, env["root"] / name)
    last = checkpoint_steps(work)[-1]
    files = [f for f in (work / "checkpoints" / str(last) / "state").rglob("*") if f.is_file() and f.stat().st_size > 64]
    if name == "one_cut":  # one array file cut short while the others read: their late reads printed tracebacks
      files = [max(files, key=lambda f: f.stat().st_size)]
    for f in files:
      f.write_bytes(f.read_bytes()[:cut(f)])
    before = folder_state(work)
    out = _run(env, work)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {work / 'checkpoints' / str(last)}: cannot restore") and "move it away" in line
    assert "See full TensorStore details" not in line, line
    assert folder_state(work) == before


_HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
"""


def test_a_workdir_in_use_is_refused_and_nothing_changes(env, reference):
  """The same command started while another process holds the workdir: one line, exit 2, and the other's files
  untouched (its checkpoint being written is not removed as a kill's leftover, its records not trimmed)."""
  work = shutil.copytree(reference, env["root"] / "in_use")
  (work / "checkpoints" / "99.orbax-checkpoint-tmp").mkdir()  # what the other run is writing
  before = folder_state(work)
  holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(work)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    out = _run(env, work)
  finally:
    holder.kill()
    holder.wait()
  assert out.returncode == 2, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1] == (f"error: --workdir: {work} is in use by another run (this command "
                                                 "started twice, or a job requeued while the first still runs); "
                                                 "expected it to end first, or another --workdir"), out.stderr[-3000:]
  assert folder_state(work) == before
