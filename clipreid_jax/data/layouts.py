"""Helpers shared by the dataset readers: finding the dataset folder, parsing file names, relabelling, list files."""
from __future__ import annotations

import os
import re
import warnings
from typing import Callable, Iterable, Sequence

from clipreid_jax.data import errors
from clipreid_jax.data.records import Split

# '0002_c1s1_000451_03.jpg' (Market, Duke), '-1_c3s2_...' (Market junk), '0001_c001_00016450_0.jpg' (VeRi).
PID_CAM_PATTERN = re.compile(r"([-\d]+)_c(\d+)")


def find_dataset_dir(root: str | os.PathLike, name: str, candidates: Sequence[str],
                     required: Sequence[Sequence[str]], layout: str) -> tuple[str, tuple[str, ...]]:
  """Finds the dataset folder under `root` (or `root` itself) that holds one of the `required` sets of entries.

  Args:
    root: the folder the user passed.
    name: dataset name, for messages.
    candidates: sub-folder names to try under root, in order ('.' is root itself, tried last when not listed).
    required: alternative sets of entries (folders or files) that must all exist, e.g. the V1 and V2 MSMT17 names.
    layout: one-line description of the expected layout, shown when nothing matches.

  Returns:
    (dataset folder, the set of entries that matched).

  Raises:
    DatasetNotFoundError: nothing under root matches; the message shows the expected layout.
  """
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise errors.DatasetNotFoundError(f"{name}: root {root} is not a folder; expected layout: {layout}")
  tried = list(candidates) + ([] if "." in candidates else ["."])
  partial = []  # (entries found, folder, entries missing) of folders that hold some of a set
  for sub in tried:
    d = os.path.normpath(os.path.join(root, sub))
    for entries in required:
      missing = [e for e in entries if not os.path.exists(os.path.join(d, e))]
      if not missing:
        return d, tuple(entries)
      if len(missing) < len(entries):
        partial.append((len(entries) - len(missing), d, missing))
  if partial:  # e.g. VeRi/ without image_query, or VehicleID without the test list asked for: name what is missing
    _, d, missing = max(partial, key=lambda x: x[0])
    raise errors.DatasetNotFoundError(f"{name}: {d} has no {', no '.join(missing)}; expected layout: {layout}")
  raise errors.DatasetNotFoundError(f"{name}: no dataset found under {root}; expected layout: {layout}")


def list_images(folder: str, exts: tuple[str, ...] = (".jpg",)) -> list[str]:
  """Sorted file names in `folder` with one of the extensions (case-insensitive)."""
  return sorted(f for f in os.listdir(folder) if f.lower().endswith(exts) and not f.startswith("."))


def parse_folder(dataset_dir: str, sub: str, *, name: str, num_cams: int, skip_junk: bool,
                 view_of: Callable[[str], int | None] = lambda _: 0) -> list[tuple[str, int, int, int]]:
  """Reads `dataset_dir/sub/*.jpg` named '<pid>_c<cam>...' into (relpath, pid, camid, viewid) records, sorted by name.

  Args:
    dataset_dir: the dataset folder; relpaths start there.
    sub: the split folder.
    name: dataset name, for messages.
    num_cams: cameras are numbered 1..num_cams in file names and become 0..num_cams-1.
    skip_junk: drop pid -1 (Market and VeRi 'junk' images).
    view_of: view id of a file name, or None to drop the image (VeRi without a keypoint entry).

  Raises:
    DataError: a camera number outside 1..num_cams.
  """
  records, unparsed = [], []
  names = list_images(os.path.join(dataset_dir, sub))
  if not names:  # e.g. the images re-encoded as .png: the split would be "empty" without a word about them
    others = sorted(f for f in os.listdir(os.path.join(dataset_dir, sub)) if not f.startswith("."))
    if others:
      warnings.warn(f"{name}: {sub} holds no .jpg image (the published layout's), only {len(others)} other files, "
                    f"e.g. {', '.join(others[:3])}", errors.DataWarning, stacklevel=2)
  for fname in names:
    m = PID_CAM_PATTERN.search(fname)
    try:  # the pattern's [-\d]+ (the official one) also takes '12-3'
      pid, cam = int(m.group(1)), int(m.group(2))
    except (AttributeError, ValueError):
      unparsed.append(fname)
      continue
    if pid == -1 and skip_junk:
      continue
    if not 1 <= cam <= num_cams:
      raise errors.DataError(f"{name}: {os.path.join(dataset_dir, sub, fname)}: camera {cam} outside 1..{num_cams}")
    view = view_of(fname)
    if view is None:
      continue
    records.append((f"{sub}/{fname}", pid, cam - 1, view))
  if unparsed:
    warnings.warn(f"{name}: skipped {len(unparsed)} files in {sub} not named '<pid>_c<cam>...', e.g. "
                  f"{', '.join(unparsed[:3])}", errors.DataWarning, stacklevel=2)
  return records


def relabel(records: Iterable[tuple[str, int, int, int]]) -> list[tuple[str, int, int, int]]:
  """Replaces pids by labels 0..K-1 in sorted pid order (the same on every host, unlike Python set order)."""
  records = list(records)
  label = {pid: i for i, pid in enumerate(sorted({r[1] for r in records}))}
  return [(p, label[pid], cam, view) for p, pid, cam, view in records]


def folder_dataset(name: str, d: str, split_dirs: Sequence[str], train, query, gallery):
  """The ReidDataset of three folder splits (train relabelled to 0..K-1; query and gallery keep their pids)."""
  from clipreid_jax.data.records import ReidDataset  # pylint: disable=g-import-not-at-top
  return ReidDataset(
      name,
      train=make_split(name, "train", d, relabel(train), os.path.join(d, split_dirs[0])),
      query=make_split(name, "query", d, query, os.path.join(d, split_dirs[1])),
      gallery=make_split(name, "gallery", d, gallery, os.path.join(d, split_dirs[2])))


def make_split(name: str, split: str, root: str, records: Sequence[tuple[str, int, int, int]], where: str) -> Split:
  """A Split of `records`; raises EmptySplitError when there are none."""
  if not records:
    raise errors.EmptySplitError(f"{name}: split '{split}' is empty (no usable images in {where})")
  return Split.from_records(root, records)


def read_list_file(path: str, name: str, min_fields: int = 2) -> list[tuple[int, list[str]]]:
  """Non-empty, non-comment lines of a whitespace-separated list file as (line number, fields).

  Raises:
    ListFileError: the file is missing, or a line has fewer than `min_fields` fields.
  """
  if not os.path.isfile(path):
    raise errors.ListFileError(f"{name}: list file {path} not found")
  out = []
  with open(path, encoding="utf-8-sig") as f:  # a leading BOM (Windows editors) is not part of the first name
    for n, line in enumerate(utf8_lines(f, path, name), 1):
      fields = line.split()
      if not fields or fields[0].startswith("#"):
        continue
      if len(fields) < min_fields:
        raise errors.ListFileError(f"{name}: {path}:{n}: expected at least {min_fields} fields, got {line.strip()!r}")
      out.append((n, fields))
  return out


def utf8_lines(f, path: str, name: str):
  """The lines of a text file opened as UTF-8; ListFileError naming the file and line where the bytes are not
  UTF-8 (a list saved by Excel as "CSV (Comma delimited)" is Windows-1252, as "Unicode Text" UTF-16)."""
  try:
    yield from f
  except UnicodeDecodeError:
    with open(path, "rb") as raw:  # the text layer decodes blocks ahead of the line being read: find the line
      data = raw.read()
    try:
      data.decode("utf-8")  # not utf-8-sig: its error positions would not count a BOM's 3 bytes
      at, byte = 0, b""
    except UnicodeDecodeError as e:
      at, byte = e.start, data[e.start:e.start + 1]
    line = data[:at].count(b"\n") + 1
    raise errors.ListFileError(
        f"{name}: {path}:{line}: not UTF-8 text (byte {byte!r} cannot be decoded); expected "
        "a UTF-8 list file (in Excel: save as \"CSV UTF-8\")") from None


def check_exists(path: str, list_file: str, line: int, name: str) -> None:
  """Raises ListFileError naming the list file and line when a listed image is missing."""
  if not os.path.isfile(path):
    raise errors.ListFileError(f"{name}: {list_file}:{line} names a missing image {path}")


def parse_int(text: str, list_file: str, line: int, name: str, what: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise errors.ListFileError(f"{name}: {list_file}:{line}: {what} {text!r} is not an integer") from None
