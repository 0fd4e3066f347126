"""Entry point: python -m clipreid_jax.main --config CONFIG [--workdir DIR] [--config.KEY=VALUE ...]."""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and outputs (default: config.workdir).")


def run(config, workdir: str) -> int:
  from clipreid_jax import demo
  return demo.run(config, workdir)


def main(argv):
  del argv
  config = _CONFIG.value
  if config is None:
    print("error: --config is required, e.g. --config configs/demo.py", file=sys.stderr)
    return 2
  return run(config, _WORKDIR.value or config.get("workdir", "workdirs/run"))


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
