"""What the pictures are drawn from: workdirs, model directories and datasets, checked with one-line errors."""
from __future__ import annotations

import json
import os
import pathlib
from typing import Optional

from clipreid_jax.data.records import ReidDataset


class VisualizeError(ValueError):
  """An input that cannot be used; the message names the path or option."""


def require_dir(path: str | os.PathLike, option: str) -> pathlib.Path:
  p = pathlib.Path(path)
  if not p.is_dir():
    raise VisualizeError(f"{option}: {p} is not a directory")
  return p


def require_model_dir(path: str | os.PathLike, option: str) -> pathlib.Path:
  """A directory written by training or conversion (config.json + variables/)."""
  p = require_dir(path, option)
  if not (p / "config.json").is_file() or not (p / "variables").is_dir():
    raise VisualizeError(f"{option}: {p} is not a model directory (expected config.json and variables/ in it)")
  return p


def training_settings(workdir: str | os.PathLike) -> Optional[dict]:
  """The `dataset` section the trainer wrote to WORKDIR/config.json, or None where there is none."""
  f = pathlib.Path(workdir) / "config.json"
  if not f.is_file():
    return None
  try:
    data = json.loads(f.read_text())
  except json.JSONDecodeError:
    return None
  ds = data.get("dataset") if isinstance(data, dict) else None
  return ds if isinstance(ds, dict) and "name" in ds and "root" in ds else None


def open_dataset(name: str, root: str | os.PathLike, options: Optional[dict] = None) -> ReidDataset:
  """Reads a dataset; 'synthetic' is read as the Market-layout folder it is, never (re)written.

  The registry's 'synthetic' reader rewrites the folder when its settings differ from the defaults, which would
  destroy a demo's data; here only reading is wanted.
  """
  from clipreid_jax.data import get_dataset
  if name == "synthetic":
    return get_dataset("market1501", root, check_counts=False)
  return get_dataset(name, root, **dict(options or {}))


def dataset_for(name: Optional[str], root: Optional[str], workdir: Optional[str | os.PathLike]) -> ReidDataset:
  """The dataset given by --dataset/--root, or else the one the run in `workdir` was trained on."""
  if name and root:
    return open_dataset(name, root)
  settings = training_settings(workdir) if workdir is not None else None
  if settings is None:
    where = f" ({pathlib.Path(workdir) / 'config.json'} names no training dataset)" if workdir is not None else ""
    raise VisualizeError(f"--dataset and --root: both are needed{where}")
  return open_dataset(name or settings["name"], root or settings["root"], settings.get("options"))
