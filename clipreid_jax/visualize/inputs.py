"""What the pictures are drawn from (workdirs, model directories, datasets) and where they go (output folders
written all at once, figures written whole), checked with one-line errors."""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Iterator, Optional

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


def require_valid_queries(dataset: ReidDataset) -> None:
  """Rank lists choose among the queries with a true match from another camera: there must be one."""
  from clipreid_jax.evaluation import metrics
  q, g = dataset.query, dataset.gallery
  if metrics.num_valid_queries(q.pids, g.pids, q.camids, g.camids) == 0:
    raise VisualizeError(f"{dataset.name}: no query has a gallery image of its identity from another camera; "
                         "expected at least one for the rank lists")


def dataset_for(name: Optional[str], root: Optional[str], workdir: Optional[str | os.PathLike]) -> ReidDataset:
  """The dataset given by --dataset/--root, or else the one the run in `workdir` was trained on."""
  if name and root:
    return open_dataset(name, root)
  settings = training_settings(workdir) if workdir is not None else None
  if settings is None:
    where = f" ({pathlib.Path(workdir) / 'config.json'} names no training dataset)" if workdir is not None else ""
    raise VisualizeError(f"--dataset and --root: both are needed{where}")
  return open_dataset(name or settings["name"], root or settings["root"], settings.get("options"))


# ------------------------------------------------------------------------------------------------------------------
# Outputs: a failure leaves the destination as it was.


def output_anchor(out: str | os.PathLike, option: str) -> pathlib.Path:
  """The folder `out` is (or will be) created in: `out` itself where it exists, else its nearest existing ancestor.

  Raises VisualizeError, before anything is computed, where `out` or that ancestor is not a folder.
  """
  out = pathlib.Path(out).resolve()
  if out.exists():
    if not out.is_dir():
      raise VisualizeError(f"{option}: {out} exists and is not a directory")
    return out
  anchor = out.parent
  while not anchor.exists():
    anchor = anchor.parent
  if not anchor.is_dir():
    raise VisualizeError(f"{option}: cannot create {out}: {anchor} is not a directory")
  return anchor


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
  tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_dir():
      raise IsADirectoryError(21, "is a directory")
    fig.savefig(tmp, format="png", facecolor="white")  # explicit format: the temporary name has no .png suffix
    os.replace(tmp, out)
  except OSError as e:
    raise VisualizeError(f"{option}: cannot write {out}: {e.strerror or e}") from None
  finally:
    tmp.unlink(missing_ok=True)
  return out
