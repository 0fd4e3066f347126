"""Packs a dataset for pods: `python -m clipreid_jax.data.prepare NAME --manual_dir ROOT --data_dir OUT`.

NAME is a dataset name (market1501, msmt17, dukemtmc, occ_duke, veri, vehicleid, custom) or a config name
(vehicleid_1600, vehicleid_2400). The packed data is read back with `clipreid_jax.data.packed.load_packed(NAME, OUT)`.
A data error prints one line to stderr and exits with code 2. Interrupted (Ctrl-C, SIGTERM) it removes what it had
written (tfds' `incomplete.*` folder) and exits with code 130 or 143.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import warnings

from clipreid_jax.data import errors, registry


class Terminated(BaseException):
  """SIGTERM as an exception, so tfds' cleanup (a `finally`) removes the partial pack as it does for Ctrl-C."""


def _raise_terminated(signum, frame):
  del frame
  signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM must not cut tfds' cleanup short
  raise Terminated


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m clipreid_jax.data.prepare", description=__doc__.splitlines()[0])
  parser.add_argument("name", help="dataset or config name")
  parser.add_argument("--manual_dir", required=True, help="dataset root in its official layout")
  parser.add_argument("--data_dir", required=True, help="tfds data folder to write")
  parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="reader option, repeatable")
  args = parser.parse_args(argv)
  from clipreid_jax.data import packed  # pylint: disable=g-import-not-at-top
  previous = signal.signal(signal.SIGTERM, _raise_terminated)
  try:
    with errors.warnings_as_lines():
      warnings.simplefilter("always", errors.DataWarning)
      opts = registry.parse_options(args.opt)
      tfds_name = packed.prepare(args.name, args.manual_dir, args.data_dir, **opts)
      dataset = packed.load_packed(tfds_name.split("/", 1)[1], args.data_dir)
  except errors.DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (KeyboardInterrupt, Terminated) as e:
    print(f"error: interrupted; no partial pack is left under {args.data_dir} (a finished one is kept), run the "
          "command again", file=sys.stderr)
    return 143 if isinstance(e, Terminated) else 130
  finally:
    signal.signal(signal.SIGTERM, previous)
  print(json.dumps({"tfds_name": tfds_name, **dataset.stats()}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
