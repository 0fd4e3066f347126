"""JAX's persistent compilation cache as main sets it up (`compilation_cache`): written, read back, off, overridden by
JAX's own variables, off by default on several hosts, and a folder that cannot be used leaves the run going without
it."""
import os
import pathlib
import subprocess
import sys

from clipreid_jax import main

REPO = pathlib.Path(__file__).resolve().parents[1]

# A fresh process: JAX decides whether it uses the cache at its first compilation.
_PROBE = """
import sys
import jax, jax.numpy as jnp
from jax._src import monitoring
from clipreid_jax import main
hits = []
monitoring.register_event_listener(lambda name, **kw: hits.append(name))
print(main.use_compilation_cache(sys.argv[1], multi_host=sys.argv[2] == "multi"))
print(float(jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((8, 8))).sum()))
print(hits.count("/jax/compilation_cache/cache_hits"))
print(jax.config.jax_compilation_cache_max_size)
"""


def _probe(setting: str, multi_host: bool = False, **env) -> dict:
  """What a fresh process reports: the folder in use ('None': off), a jitted result, its cache hits, the size bound,
  its stderr. `env` adds to the test's environment (less any JAX_COMPILATION_CACHE_* of the caller's)."""
  base = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  out = subprocess.run([sys.executable, "-c", _PROBE, setting, "multi" if multi_host else "one"], capture_output=True,
                       text=True, timeout=300, cwd=REPO,
                       env={**base, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **env})
  assert out.returncode == 0, out.stderr[-3000:]
  path, value, hits, max_size = out.stdout.split()
  return dict(path=path, value=float(value), hits=int(hits), max_size=int(max_size), stderr=out.stderr)


def _entries(folder: pathlib.Path) -> list:
  return sorted(folder.glob("*-cache")) if folder.is_dir() else []


def test_cache_is_written_then_read_back(tmp_path):
  folder = tmp_path / "cache"
  first = _probe(str(folder))
  written = _entries(folder)
  assert first["path"] == str(folder) and first["hits"] == 0, first
  assert any(f.name.startswith("jit__lambda") for f in written), written
  again = _probe(str(folder))  # every compilation of the first process is read back
  assert again["hits"] == len(written) and again["value"] == first["value"] and _entries(folder) == written


def test_auto_is_under_the_user_cache_folder(tmp_path):
  path = _probe("auto", XDG_CACHE_HOME=str(tmp_path / "xdg"))["path"]
  assert path == str(tmp_path / "xdg" / "clipreid_jax" / "jax") and _entries(pathlib.Path(path))


def test_size_bound_set_unless_the_user_set_one(tmp_path):
  assert _probe(str(tmp_path / "a"))["max_size"] == main.COMPILATION_CACHE_MAX_BYTES
  assert _probe(str(tmp_path / "b"), JAX_COMPILATION_CACHE_MAX_SIZE="12345678")["max_size"] == 12345678


def test_multi_host_runs_use_only_a_named_folder(tmp_path):
  """JAX writes from process 0 only: 'auto' (each host's own folder) is off on several hosts, a named one is used."""
  assert _probe("auto", multi_host=True, XDG_CACHE_HOME=str(tmp_path / "xdg"))["path"] == "None"
  assert not (tmp_path / "xdg").exists()
  shared = tmp_path / "shared"
  assert _probe(str(shared), multi_host=True)["path"] == str(shared) and _entries(shared)


def test_empty_setting_is_off_and_jax_variable_wins(tmp_path):
  off = _probe("", XDG_CACHE_HOME=str(tmp_path / "xdg"))
  assert off["path"] == "None" and off["hits"] == 0 and not (tmp_path / "xdg").exists()
  theirs = tmp_path / "theirs"
  assert _probe(str(tmp_path / "ours"), JAX_COMPILATION_CACHE_DIR=str(theirs))["path"] == str(theirs)
  assert _entries(theirs) and not (tmp_path / "ours").exists()


def test_unusable_folder_warns_and_compiles_without(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  got = _probe(str(blocker / "cache"))
  assert got["path"] == "None" and got["hits"] == 0 and got["value"] == _probe("")["value"]
  assert f"compilation_cache: cannot use {blocker / 'cache'}" in got["stderr"]


def test_main_uses_the_configured_cache(tmp_path):
  """The CLI sets the cache up before it compiles: a tiny training run leaves its executables there."""
  folder = tmp_path / "cache"
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  out = subprocess.run([sys.executable, "-m", "clipreid_jax.main", "--config",
                        f"{REPO / 'tests' / 'tiny_run_config.py'}:{tmp_path / 'data'}", "--workdir",
                        str(tmp_path / "work"), f"--config.compilation_cache={folder}", "--config.stage1.max_epochs=1",
                        "--config.stage2.max_epochs=1"], capture_output=True, text=True, timeout=600, cwd=REPO,
                       env={**env, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
  assert out.returncode == 0, out.stderr[-3000:]
  assert len(_entries(folder)) >= 5, _entries(folder)  # the model's init, stage 1, the stage-2 step, evaluation...
