"""Dataset names -> readers: `get_dataset(name, root, **opts)`."""
from __future__ import annotations

import inspect
import os
from typing import Callable, Sequence

from clipreid_jax.data import custom, dukemtmc, errors, market1501, msmt17, vehicleid, veri
from clipreid_jax.data.records import ReidDataset

READERS: dict[str, Callable[..., ReidDataset]] = {
    "market1501": market1501.load,
    "msmt17": msmt17.load,
    "dukemtmc": dukemtmc.load_duke,
    "occ_duke": dukemtmc.load_occ_duke,
    "veri": veri.load,
    "vehicleid": vehicleid.load,
    "custom": custom.load,
}
DATASET_NAMES = tuple(READERS)


def _read_synthetic(root: str | os.PathLike, **expected) -> ReidDataset:
  # Imported on use: `python -m clipreid_jax.data.synthetic` must not find the module imported by the package.
  from clipreid_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  return synthetic.load(root, **expected)


# Not a published dataset: the synthetic Market-layout data written by `write_synthetic_market` (or the trainer, for
# configs/demo.py), read as it is; this reader never writes it.
READERS["synthetic"] = _read_synthetic
# Every name get_dataset takes, aliases aside.
KNOWN_NAMES = tuple(READERS)
# The official DATASETS.NAMES spellings and common variants.
_ALIASES = {"market": "market1501", "market-1501": "market1501", "duke": "dukemtmc", "dukemtmcreid": "dukemtmc",
            "occluded_duke": "occ_duke", "veri776": "veri", "veri-776": "veri"}

# Vehicle datasets use the vehicle prompt ('A photo of a X X X X vehicle.').
VEHICLE_DATASETS = frozenset({"veri", "vehicleid"})


def is_vehicle(name: str) -> bool:
  """Whether `name` (any spelling the registry reads, 'VeRi-776' too) is a vehicle dataset; other names (custom
  data) are persons."""
  key = name.strip().lower()
  return _ALIASES.get(key, key) in VEHICLE_DATASETS


def canonical_name(name: str) -> str:
  """The registry name of `name` (case-insensitive; 'VehicleID' -> 'vehicleid').

  Raises:
    UnknownDatasetError: not a known name.
  """
  key = name.strip().lower()
  key = _ALIASES.get(key, key)
  if key not in READERS:
    raise errors.UnknownDatasetError(f"unknown dataset {name!r}; known: {', '.join(KNOWN_NAMES)}")
  return key


def get_dataset(name: str, root: str | os.PathLike, **opts) -> ReidDataset:
  """Reads dataset `name` from `root`.

  Args:
    name: one of DATASET_NAMES (case-insensitive; the official spellings such as 'VehicleID' work too), or
      'synthetic': data written by `write_synthetic_market`, read and never written (options: settings of
      `write_synthetic_market` that the data must have).
    root: the dataset root (see data/README.md for each layout).
    **opts: reader options, e.g. `test_size=1600, gallery_seed=0` (vehicleid), `keypoint_dir=...` (veri),
      `check_counts=False`, `check_files=False` (list-based datasets).

  Raises:
    DataError (a subclass of ValueError) for an unknown name, an unknown option or one of the wrong type, a missing
    layout, an empty split or a bad list file.
  """
  key = canonical_name(name)
  params = reader_options(key)
  unknown = [k for k in opts if k not in params]
  if unknown:
    raise errors.DataError(f"{name}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                           f"valid options: {', '.join(params) or 'none'}")
  _check_option_types(name, params, opts)
  return READERS[key](root, **opts)


def reader_options(name: str) -> dict[str, inspect.Parameter]:
  """The options (keyword parameters) that dataset `name`'s reader takes, by name."""
  key = canonical_name(name)
  if key == "synthetic":
    from clipreid_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    params = list(inspect.signature(synthetic.write_synthetic_market).parameters.values())[1:]  # after root
  else:
    params = list(inspect.signature(READERS[key]).parameters.values())[1:]
  return {p.name: p for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _check_option_types(name: str, params: dict[str, inspect.Parameter], opts: dict) -> None:
  """An option whose default is a bool or an int takes only that type ('maybe' is not a bool), seeds >= 0."""
  for key, value in opts.items():
    default = params[key].default if key in params else None
    if isinstance(default, bool) and not isinstance(value, bool):
      raise errors.DataError(f"{name}: option {key}: expected true or false, got {value!r}")
    if isinstance(default, int) and not isinstance(default, bool) and (
        not isinstance(value, int) or isinstance(value, bool) or (key.endswith("seed") and value < 0)):
      raise errors.DataError(f"{name}: option {key}: expected an integer{' >= 0' if key.endswith('seed') else ''}, "
                             f"got {value!r}")


def parse_options(items: Sequence[str]) -> dict:
  """`--opt KEY=VALUE` strings -> reader options (ints, floats and true/false converted)."""
  opts = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise errors.DataError(f"--opt {item!r}: expected KEY=VALUE")
    opts[key] = _option_value(value)
  return opts


def _option_value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {"true": True, "false": False}.get(text.lower(), text)
