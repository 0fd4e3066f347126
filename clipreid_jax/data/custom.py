"""Bring-your-own dataset: three CSV list files, no code.

Format (see data/README.md): ROOT/train.csv, ROOT/query.csv and ROOT/gallery.csv, one image per row (train.csv
may be left out where the set is only evaluated or embedded: the training split is then empty)

    path,identity,camera[,view]
    images/alice/0001.jpg,alice,cam1
    images/bob/0002.png,bob,cam2

- The camera column may be left out of every list file (`path,identity`) where the cameras are not known: query
  images then count as camera 0 and gallery images as camera 1, so the protocol's same-camera rule removes no
  gallery image (the usual convention; SIE needs real cameras). An image listed in both query and gallery gets a
  camera of its own there, so that the rule leaves out of its ranking its own copy, and only that.
- `path` is relative to the folder of the list file (absolute paths work too); any format PIL reads.
- `identity` and `camera` (and the optional `view`) are integers or free text.
- The header row is optional; with it the columns may come in any order (names: path, identity|id|pid,
  camera|cam|camid, view|viewid). Blank lines and lines starting with '#' are skipped.

Numbering: train identities become labels 0..K-1 in sorted order. Query and gallery identities keep their integer
values when all of them are integers, and are otherwise numbered in sorted order over query and gallery together
(so the same text is the same person in both). Cameras and views are numbered 0.. in sorted order (integers sort as
numbers), so 'cam1'..'cam6' or 1..6 become 0..5: first those of train, then any that only query or gallery have, so
the SIE table (one row per training camera) has a row for every training camera. A missing view column means view 0.
"""
from __future__ import annotations

import csv
import os
from typing import Sequence

from clipreid_jax.data import errors, layouts
from clipreid_jax.data.records import ReidDataset, Split

NAME = "custom"
SPLITS = ("train", "query", "gallery")
LAYOUT = ("ROOT/{train,query,gallery}.csv with rows 'path,identity,camera[,view]' or 'path,identity' (paths relative "
          "to ROOT; train.csv only for training)")
COLUMN_NAMES = {"path": "path", "identity": "identity", "id": "identity", "pid": "identity", "camera": "camera",
                "cam": "camera", "camid": "camera", "view": "view", "viewid": "view"}
Row = tuple[str, str, str, str]  # relpath, identity, camera ('' in a list without cameras), view


def read_csv(list_file: str, check_files: bool = True) -> list[Row]:
  """Rows (relpath from the list file's folder, identity, camera, view) of one list file.

  Raises:
    ListFileError: a malformed row, or a row naming a missing image (the message names the file and line).
  """
  if not os.path.isfile(list_file):
    raise errors.ListFileError(f"{NAME}: list file {list_file} not found; expected layout: {LAYOUT}")
  base = os.path.dirname(list_file)
  order = ("path", "identity", "camera", "view")
  rows: list[Row] = []
  header_seen = False
  with_camera = None  # set by the header or the first row: every row of a file has a camera, or none has
  # utf-8-sig: Excel's "CSV UTF-8" and Notepad start the file with a BOM, which would hide the header
  with open(list_file, newline="", encoding="utf-8-sig") as f:
    for line, fields in enumerate(csv.reader(layouts.utf8_lines(f, list_file, NAME)), 1):
      fields = [x.strip() for x in fields]
      if not any(fields) or fields[0].startswith("#"):
        continue
      if not rows and not header_seen and "path" in (x.lower() for x in fields):
        unknown = [x for x in fields if x.lower() not in COLUMN_NAMES]
        order = tuple(COLUMN_NAMES.get(x.lower(), x) for x in fields)
        with_camera = "camera" in order
        if (unknown or not {"path", "identity"} <= set(order) or len(set(order)) < len(order)
            or ("view" in order and not with_camera)):
          raise errors.ListFileError(f"{NAME}: {list_file}:{line}: header {','.join(fields)!r} needs columns path, "
                                     "identity, and optionally camera (then optionally view), each once")
        header_seen = True
        continue
      if with_camera is None:  # the first row: two fields are a list without cameras
        with_camera = len(fields) != 2
      low = 3 if with_camera else 2
      if not low <= len(fields) <= (len(order) if header_seen else low + with_camera):
        form = "path,identity,camera[,view]" if with_camera else "path,identity (as the rows before it)"
        raise errors.ListFileError(f"{NAME}: {list_file}:{line}: expected '{form}', got {','.join(fields)!r}")
      row = dict(zip(order, fields))
      if not row.get("path") or not row.get("identity") or (with_camera and not row.get("camera")):
        raise errors.ListFileError(f"{NAME}: {list_file}:{line}: empty path, identity or camera")
      relpath = row["path"]
      if check_files:
        layouts.check_exists(os.path.join(base, relpath), list_file, line, NAME)
      rows.append((relpath, row["identity"], row.get("camera", ""), row.get("view") or "0"))
  return rows


def _sort_key(values: Sequence[str]):
  """Numeric order when every value is an integer, text order otherwise."""
  if all(_is_int(v) for v in values):
    return int
  return str


def _is_int(text: str) -> bool:
  try:
    int(text)
    return True
  except ValueError:
    return False


def _numbering(values: set[str], more: set[str] = frozenset()) -> dict[str, int]:
  """`values` as 0..n-1 in sorted order, then the rest of `more` as n.. in sorted order."""
  key = _sort_key(list(values | more))
  order = sorted(values, key=key) + sorted(more - values, key=key)
  return {v: i for i, v in enumerate(order)}


def load(root: str | os.PathLike, *, train_list: str = "train.csv", query_list: str = "query.csv",
         gallery_list: str = "gallery.csv", check_files: bool = True) -> ReidDataset:
  """Reads a custom dataset from three CSV list files (see the module docstring for the format).

  Args:
    root: folder of the list files.
    train_list, query_list, gallery_list: list file names (or paths) relative to root.
    check_files: check that every listed image exists, naming the first missing one.
  """
  root = os.fspath(root)
  lists = [os.path.join(root, x) for x in (train_list, query_list, gallery_list)]
  # train.csv may be absent: a test-only set (cross-domain evaluation) has query and gallery only.
  if not os.path.isdir(root) or not all(os.path.isfile(x) for x in lists[1:]):
    missing = [x for x in lists[1:] if not os.path.isfile(x)]
    raise errors.DatasetNotFoundError(
        f"{NAME}: missing {', '.join(missing) or root} under {root}; expected layout: {LAYOUT}")
  rows = {s: read_csv(x, check_files) if s != "train" or os.path.isfile(x) else [] for s, x in zip(SPLITS, lists)}
  without = [x for s, x in zip(SPLITS, lists) if rows[s] and not rows[s][0][2]]
  if without and len(without) < sum(bool(rows[s]) for s in SPLITS):
    raise errors.ListFileError(f"{NAME}: {without[0]} has no camera column but "
                               f"{next(x for s, x in zip(SPLITS, lists) if rows[s] and rows[s][0][2])} has; expected "
                               "cameras in every list file or in none")

  def relpath(split: str, p: str) -> str:
    """A row's image path from root: the same for every list file that names that image."""
    base = os.path.relpath(os.path.dirname(os.path.abspath(lists[SPLITS.index(split)])), os.path.abspath(root))
    return os.path.normpath(os.path.join(base, p))

  if without:  # cameras unknown: query 0, gallery 1, so no gallery image is removed as a same-camera match
    rows = {s: [(p, i, "1" if s == "gallery" else "0", v) for p, i, _, v in rows[s]] for s in SPLITS}
    # An image listed in query and gallery (a query set drawn from the gallery) would match itself at rank 1: both
    # copies get a camera of their own, so the same-camera rule removes that copy, and only it, from its ranking.
    test = {s: [relpath(s, r[0]) for r in rows[s]] for s in ("query", "gallery")}
    both = set(test["query"]) & set(test["gallery"])
    if both:
      for s, paths in test.items():
        rows[s] = [(p, i, f"same image {path}" if path in both else c, v) for (p, i, c, v), path in zip(rows[s], paths)]
  every = [r for s in SPLITS for r in rows[s]]
  cams = _numbering({r[2] for r in rows["train"]}, {r[2] for r in every})
  views = _numbering({r[3] for r in rows["train"]}, {r[3] for r in every})
  test_ids = {r[1] for s in ("query", "gallery") for r in rows[s]}
  test_pid = {v: int(v) for v in test_ids} if all(_is_int(v) for v in test_ids) else _numbering(test_ids)
  train_pid = _numbering({r[1] for r in rows["train"]})

  def records(split: str, pid_of: dict[str, int]) -> list[tuple[str, int, int, int]]:
    return [(relpath(split, p), pid_of[i], cams[c], views[v]) for p, i, c, v in rows[split]]

  return ReidDataset(
      NAME,
      train=(layouts.make_split(NAME, "train", root, records("train", train_pid), lists[0]) if os.path.isfile(lists[0])
             else Split.from_records(root, [])),
      query=layouts.make_split(NAME, "query", root, records("query", test_pid), lists[1]),
      gallery=layouts.make_split(NAME, "gallery", root, records("gallery", test_pid), lists[2]))
