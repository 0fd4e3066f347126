"""JAX's persistent compilation cache as main sets it up (`compilation_cache`): written, read back, off, overridden by
JAX's own variable, and a folder that cannot be used leaves the run going without it."""
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

# A fresh process: JAX decides whether it uses the cache at its first compilation.
_PROBE = """
import sys
import jax, jax.numpy as jnp
from jax._src import monitoring
from clipreid_jax import main
hits = []
monitoring.register_event_listener(lambda name, **kw: hits.append(name))
print(main.use_compilation_cache(sys.argv[1]))
print(float(jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((8, 8))).sum()))
print(hits.count("/jax/compilation_cache/cache_hits"))
"""


def _probe(setting: str, **env) -> tuple[str, float, int, str]:
  base = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  out = subprocess.run([sys.executable, "-c", _PROBE, setting], capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={**base, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **env})
  assert out.returncode == 0, out.stderr[-3000:]
  path, value, hits = out.stdout.split()
  return path, float(value), int(hits), out.stderr


def _entries(folder: pathlib.Path) -> list:
  return sorted(folder.glob("*-cache")) if folder.is_dir() else []


def test_cache_is_written_then_read_back(tmp_path):
  folder = tmp_path / "cache"
  path, first, hits, _ = _probe(str(folder))
  written = _entries(folder)
  assert path == str(folder) and hits == 0 and any(f.name.startswith("jit__lambda") for f in written), written
  path, again, hits, _ = _probe(str(folder))  # every compilation of the first process is read back
  assert hits == len(written) and again == first and _entries(folder) == written


def test_auto_is_under_the_user_cache_folder(tmp_path):
  path, _, _, _ = _probe("auto", XDG_CACHE_HOME=str(tmp_path / "xdg"))
  assert path == str(tmp_path / "xdg" / "clipreid_jax" / "jax") and _entries(pathlib.Path(path))


def test_empty_setting_is_off_and_jax_variable_wins(tmp_path):
  path, _, hits, _ = _probe("", XDG_CACHE_HOME=str(tmp_path / "xdg"))
  assert path == "None" and hits == 0 and not (tmp_path / "xdg").exists()
  theirs = tmp_path / "theirs"
  path, _, _, _ = _probe(str(tmp_path / "ours"), JAX_COMPILATION_CACHE_DIR=str(theirs))
  assert path == str(theirs) and _entries(theirs) and not (tmp_path / "ours").exists()


def test_unusable_folder_warns_and_compiles_without(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  path, value, hits, err = _probe(str(blocker / "cache"))
  assert path == "None" and hits == 0 and value == _probe("")[1]
  assert f"compilation_cache: cannot use {blocker / 'cache'}" in err


def test_main_uses_the_configured_cache(tmp_path):
  """The CLI sets the cache up before it compiles: a tiny training run leaves its executables there."""
  folder = tmp_path / "cache"
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  out = subprocess.run([sys.executable, "-m", "clipreid_jax.main", "--config",
                        f"{REPO / 'tests' / 'tiny_run_config.py'}:{tmp_path / 'data'}", "--workdir",
                        str(tmp_path / "work"), f"--config.compilation_cache={folder}", "--config.stage1.max_epochs=1",
                        "--config.stage2.max_epochs=1"], capture_output=True, text=True, timeout=600, cwd=REPO,
                       env={**env, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
  assert out.returncode == 0, out.stderr[-3000:]
  assert len(_entries(folder)) >= 5, _entries(folder)  # the model's init, stage 1, the stage-2 step, evaluation...
