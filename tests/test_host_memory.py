"""host_memory: XLA:CPU's per-execution buffers are reused instead of mapped afresh (keep_step_buffers_mapped), and
evaluation, extraction and FeatureExtractor start JAX without its GPU memory reservation (no_device_preallocation).
Each case runs in a fresh interpreter: the settings must come before JAX starts its backend."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# A jitted program whose temporaries (two 48 MB prefix sums) are far above glibc's mmap threshold; the minor page
# faults of its later executions count the pages mapped afresh per execution.
PROGRAM = """
import json, resource, sys
from clipreid_jax import host_memory
applied = host_memory.keep_step_buffers_mapped() if sys.argv[1] != "off" else False
if sys.argv[1] == "decide":  # no computation: this case names a backend that is not here
  print(json.dumps(dict(applied=applied, cpu_only=host_memory.cpu_only())))
  sys.exit(0)
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.cumsum(jnp.cumsum(x)[::-1]).sum())
x = jnp.arange(12_000_000, dtype=jnp.float32) / 12_000_000
first = float(f(x))
for _ in range(5):  # warm: the heap settles at the size the executions need
  float(f(x))
out, counts = [], []
for _ in range(9):  # per execution; the median ignores the one where thread timing grew the heap
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  out.append(float(f(x)))
  counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = sorted(counts)[len(counts) // 2]
print(json.dumps(dict(applied=applied, cpu_only=host_memory.cpu_only(), faults=faults, counts=counts,
                      same=out == [first] * 9)))
"""


def _run(mode: str, **env) -> dict:
  out = subprocess.run([sys.executable, "-c", PROGRAM, mode], cwd=REPO, capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, timeout=300)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_step_buffers_are_reused_not_mapped_afresh():
  off, on = _run("off"), _run("on")
  assert on["applied"] and on["cpu_only"] and not off["applied"]
  assert on["same"] and off["same"]
  # Off: ~3 x 48 MB of fresh pages per execution (36k faults); on: the freed blocks are reused (0 faults in most
  # executions; thread timing can still grow the heap in one now and then, under load: hence the median of 9).
  assert off["faults"] > 10_000 and on["faults"] < off["faults"] / 4, (off, on)


def test_accelerator_runs_are_left_alone():
  """JAX_PLATFORMS naming an accelerator first: malloc is not touched (the run's buffers live on the device)."""
  got = _run("decide", JAX_PLATFORMS="cuda,cpu")
  assert not got["applied"] and not got["cpu_only"]


# main.py with the mode's work replaced by a report of the setting it started JAX's backend with.
_MAIN_REPORTS_PREALLOCATION = """
import os, sys
from absl import app
from clipreid_jax import inference, main, train

def report(*args, **kwargs):  # the setting must be there before the backend starts, which reads it
  from jax._src import xla_bridge
  assert not xla_bridge.backends_are_initialized()
  print("PREALLOCATE", os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"))

train.validate_config = lambda config: None
train.train_and_evaluate = inference.evaluate_checkpoint = inference.extract_to_files = report
app.run(lambda argv: sys.exit(main.main(argv)), flags_parser=main.parse_flags)
"""


def _preallocation_in_mode(tmp_path, mode: str, **env) -> str:
  base = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_PREALLOCATE"}
  out = subprocess.run([sys.executable, "-c", _MAIN_REPORTS_PREALLOCATION, "--config", "configs/demo.py",
                        f"--config.mode={mode}", "--config.visualize=False", "--workdir", str(tmp_path / mode)],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env={**base, **env})
  lines = [l for l in out.stdout.splitlines() if l.startswith("PREALLOCATE")]
  assert out.returncode == 0 and lines, out.stdout + out.stderr
  return lines[-1].split()[1]


def test_evaluation_and_extraction_reserve_no_gpu_memory(tmp_path):
  """eval / extract start JAX without its GPU memory reservation (whose driver bookkeeping alone is 2-4 GB of host
  memory); training keeps it; a value the user set is left as it is."""
  assert _preallocation_in_mode(tmp_path, "eval") == "false"
  assert _preallocation_in_mode(tmp_path, "extract") == "false"
  assert _preallocation_in_mode(tmp_path, "train") == "None"
  assert _preallocation_in_mode(tmp_path, "eval", XLA_PYTHON_CLIENT_PREALLOCATE="true") == "true"


_EXTRACTOR = """
import json, os, sys
from clipreid_jax import host_memory
if sys.argv[1] == "started":
  import jax
  jax.devices()
import clipreid_jax
try:
  clipreid_jax.FeatureExtractor("/nonexistent/model")
except Exception as e:  # no model there: the setting comes first
  kind = type(e).__name__
print(json.dumps(dict(kind=kind, preallocate=os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
                      again=host_memory.no_device_preallocation())))
"""


@pytest.mark.parametrize("case,user,expected", [
    ("fresh", None, "false"),  # an extractor in a tracker's process: no 75% reservation beside its detector
    ("fresh", "true", "true"),  # the user's value wins
    ("started", None, None),  # JAX already running: setting the variable now would only mislead
])
def test_feature_extractor_reserves_no_gpu_memory_when_it_starts_jax(case, user, expected):
  env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_PREALLOCATE"}
  if user is not None:
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = user
  out = subprocess.run([sys.executable, "-c", _EXTRACTOR, case], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=env)
  assert out.returncode == 0, out.stderr
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got["kind"] == "CheckpointError" and got["preallocate"] == expected and got["again"] is False, got
