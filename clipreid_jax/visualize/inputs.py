"""What the pictures are drawn from (workdirs, model directories, datasets) and where they go (output folders
written all at once, figures written whole), checked with one-line errors."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Iterator, Optional

from clipreid_jax import outputs
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


def require_valid_queries(dataset: ReidDataset) -> None:
  """Rank lists choose among the queries with a true match from another camera: there must be one."""
  from clipreid_jax.evaluation import metrics
  q, g = dataset.query, dataset.gallery
  if metrics.num_valid_queries(q.pids, g.pids, q.camids, g.camids) == 0:
    raise VisualizeError(f"{dataset.name}: no query has a gallery image of its identity from another camera; "
                         "expected at least one for the rank lists")


def dataset_for(name: Optional[str], root: Optional[str], workdir: Optional[str | os.PathLike],
                packed_dir: Optional[str] = None) -> ReidDataset:
  """The dataset of --dataset/--root/--packed_dir, each defaulting to the run's in `workdir` (its config.json).

  Read by the trainer's own `train.load_dataset`: the packed copy where a packed_dir is named, else the folder,
  with the run's reader options (check_counts, test_size, ...) where it is the run's dataset. `root` reads that
  folder instead of a recorded pack. 'synthetic' is read as the Market-layout folder it is, never (re)written.
  """
  if root and packed_dir:
    raise VisualizeError(f"--root and --packed_dir: expected one of them (a folder or its packed copy), got both "
                         f"{root} and {packed_dir}")
  settings = training_settings(workdir) if workdir is not None else None
  if settings is None:
    if not (name and (root or packed_dir)):
      where = ""
      if workdir is not None:
        f = pathlib.Path(workdir) / "config.json"
        if f.is_file() and (pathlib.Path(workdir) / "variables").is_dir():
          where = f" ({workdir} is a model directory, not a training workdir: pass the workdir that holds it)"
        elif f.is_file():
          where = f" ({f} names no training dataset)"
        else:
          where = f" ({workdir} holds no config.json: not a training workdir)"
      raise VisualizeError(f"--dataset and --root (or --packed_dir): both are needed{where}")
    settings = {}
  import ml_collections
  from clipreid_jax import train
  from clipreid_jax.config_defaults import recipe
  from clipreid_jax.data.registry import canonical_name
  name = name or settings["name"]
  ds = recipe(name).dataset.to_dict()  # the reader options' defaults, for another dataset or an older record
  if settings and canonical_name(name) == canonical_name(settings["name"]):
    ds.update(settings)
  else:  # not the run's dataset: its reader options do not apply, only where the data lives carries over
    ds.update({k: settings[k] for k in ("root", "packed_dir") if k in settings})
  ds["name"] = name
  if root:
    ds.update(root=root, packed_dir="")
  if packed_dir:
    ds["packed_dir"] = packed_dir
  if canonical_name(name) == "synthetic":
    # The trainer's synthetic branch (re)writes the folder, and a demo's data must only be read; it reads no pack.
    ds.update(name="market1501", check_counts=False, packed_dir=packed_dir or "")
  with _quiet_logger("absl"):  # tfds logs a pack it cannot find, before load_packed's one-line error says so
    return train.load_dataset(ml_collections.ConfigDict({"dataset": ds}), everywhere=False)


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
  """Only errors of logger `name` inside the block."""
  logger = logging.getLogger(name)
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


# ------------------------------------------------------------------------------------------------------------------
# Outputs: a failure leaves the destination as it was.


def output_anchor(out: str | os.PathLike, option: str) -> pathlib.Path:
  """outputs.output_anchor, raising VisualizeError."""
  return outputs.output_anchor(out, option, VisualizeError)


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike, option: str) -> Iterator[pathlib.Path]:
  """Yields an empty staging folder whose files land in `out` only when the block finishes without error.

  On an error `out` is left as it was (not created where it did not exist). Files already in `out` stay, except
  those the block wrote again, which are replaced. The staging folder sits on `out`'s file system, so the final
  moves are renames.
  """
  out = pathlib.Path(out).resolve()
  anchor = output_anchor(out, option)
  try:
    stage = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=anchor))
  except OSError as e:
    raise VisualizeError(f"{option}: cannot write in {anchor}: {e.strerror or e}") from None
  try:
    yield stage
    if not out.exists():
      out.parent.mkdir(parents=True, exist_ok=True)
      os.rename(stage, out)
      return
    moves = [(src, out / src.relative_to(stage)) for src in sorted(stage.rglob("*")) if not src.is_dir()]
    for _, dst in moves:  # all checked before the first move, so a clash moves nothing
      folders = [out / p for p in reversed(dst.relative_to(out).parents)][1:]  # those between out and dst
      in_way = [f for f in folders if f.exists() and not f.is_dir()] + ([dst] if dst.is_dir() else [])
      if in_way:
        raise VisualizeError(f"{option}: cannot write {dst}: {in_way[0]} is in the way")
    for src, dst in moves:
      dst.parent.mkdir(parents=True, exist_ok=True)
      os.replace(src, dst)
  finally:
    shutil.rmtree(stage, ignore_errors=True)


def save_figure(fig, out: str | os.PathLike, option: str) -> pathlib.Path:
  """Saves a matplotlib figure as the PNG `out` through a temporary file, so `out` is never half-written."""
  out = pathlib.Path(out)
  output_anchor(out.parent, option)
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_dir():
      raise IsADirectoryError(21, "is a directory")
    with outputs.atomic_file(out) as tmp:
      fig.savefig(tmp, format="png", facecolor="white")  # explicit format: the temporary name has no .png suffix
  except OSError as e:
    raise VisualizeError(f"{option}: cannot write {out}: {e.strerror or e}") from None
  return out
