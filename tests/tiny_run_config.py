"""The tiny end-to-end run of tests/train_helpers.py as a config file, for tests that start real processes.

  python -m clipreid_jax.main --config tests/tiny_run_config.py:DATA_ROOT --workdir W

The argument after ':' is the synthetic dataset's root (written on first use). Like every config file this is
the user's own Python, executed by the CLI; nothing else the trainer reads from disk is ever executed.
"""
import importlib.util
import pathlib


def get_config(arg: str = "data/tiny_synthetic"):
  # tests/ is not a package; load the helper by path so the CLI needs no PYTHONPATH.
  spec = importlib.util.spec_from_file_location("train_helpers", pathlib.Path(__file__).with_name("train_helpers.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.tiny_config(arg)
  c.visualize = False  # the pictures have their own tests; these processes stay short
  return c
