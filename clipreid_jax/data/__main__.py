"""Split statistics of a dataset as JSON: `python -m clipreid_jax.data NAME ROOT [--opt KEY=VALUE ...]`.

Example: `python -m clipreid_jax.data vehicleid /data --opt test_size=1600`. A data error prints one line to stderr
and exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

from clipreid_jax.data import errors, registry


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m clipreid_jax.data", description=__doc__.splitlines()[0])
  parser.add_argument("name", help=f"one of {', '.join(registry.KNOWN_NAMES)}")
  parser.add_argument("root", help="dataset root (see data/README.md)")
  parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="reader option, repeatable")
  args = parser.parse_args(argv)
  try:
    opts = registry.parse_options(args.opt)
    with errors.warnings_as_lines():  # e.g. counts that differ from the published ones
      warnings.simplefilter("always", errors.DataWarning)
      dataset = registry.get_dataset(args.name, args.root, **opts)
  except errors.DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(dataset.stats(), indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
