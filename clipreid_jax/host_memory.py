"""Host memory: keep XLA:CPU's per-step buffers mapped from one step to the next; no GPU memory reservation in
evaluation and extraction.

XLA:CPU allocates each execution's temporary buffer (1.09 GiB for a ViT-B/16 stage-2 step at batch 8) with malloc
from one of its worker threads and frees it when the step ends. glibc serves a request that large from a thread's
arena with a fresh mmap and unmaps it on free, so every step faults in 285k new pages: 0.5 s of kernel time and
about 10% of the step on a 2-core machine (docs/performance.md). With a single arena and no mmap, the freed block
stays in the heap and the next step reuses it. Accelerator backends keep their buffers on the device, so this is
done only where JAX will run on the CPU alone.

JAX's GPU client reserves 75% of the device's memory when it starts (XLA_PYTHON_CLIENT_PREALLOCATE), and the driver
keeps host memory for the reservation: on an H200 (141 GB) the process held 4.2 GB after its first operation, 0.7 GB
without the reservation (benchmarks/runtime_memory.py; docs/evaluation.md). Evaluation and extraction hold one model
and one chunk of distances at a time, so they allocate as they go (a full-size evaluation then peaked at 2.0 GB, its
goal is 3 GB). Training keeps the reservation: one arena, no fragmentation over a long run.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import pkgutil
import sys
from importlib import metadata

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def cpu_only() -> bool:
  """Whether JAX will run on the CPU alone, decided without starting a backend (which would be too late: XLA's
  worker threads pick their malloc arenas when they start)."""
  import jax  # pylint: disable=g-import-not-at-top
  requested = jax.config.jax_platforms  # JAX_PLATFORMS, e.g. "cpu" or "cuda,cpu": the first is the default
  if requested:
    return requested.split(",")[0].strip() == "cpu"
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top  # GPU plugins live in this namespace package
    plugins = any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))
  except ImportError:
    plugins = False
  plugins = plugins or any(True for _ in metadata.entry_points(group="jax_plugins"))
  tpu = importlib.util.find_spec("libtpu") is not None or bool(os.environ.get("TPU_LIBRARY_PATH"))
  return not plugins and not tpu


def keep_step_buffers_mapped() -> bool:
  """One malloc arena, no mmap, no trimming (glibc only), on CPU-only runs. Call before JAX starts its backend.
  Returns whether it was applied."""
  if not sys.platform.startswith("linux") or not cpu_only():
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (musl, say): leave malloc as it is
    return False
  return all(mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))


def no_device_preallocation() -> bool:
  """Evaluation and extraction: JAX allocates device memory as needed instead of reserving 75% of it at start-up
  (and the host memory the driver keeps for such a reservation). A value the user set wins, and once JAX has
  started its backend the setting would have no effect, so nothing is set then. Returns whether it was applied."""
  if "XLA_PYTHON_CLIENT_PREALLOCATE" in os.environ or _backend_started():
    return False
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  return True


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # another JAX: setting the variable is harmless either way
    return False
