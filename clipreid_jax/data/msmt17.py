"""MSMT17 (Wei et al., CVPR 2018): 4,101 pedestrians, 15 cameras, read from its list files.

Official rules kept: train = list_train + list_val (as in the official code, see its issue #39); pids are taken from
the list files; the camera is the third '_'-separated field of the file name ('0000_000_01_...' is camera 1 -> 0);
view 0. Both the V1 folder names (MSMT17_V1/{train,test}) and the V2 ones (MSMT17_V2/{mask_train_v2,mask_test_v2})
are accepted, as is the plain 'MSMT17' folder of the official code.
"""
from __future__ import annotations

import os

from clipreid_jax.data import errors, layouts, published
from clipreid_jax.data.records import ReidDataset

NAME = "msmt17"
LISTS = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")
V1_DIRS = ("train", "test")
V2_DIRS = ("mask_train_v2", "mask_test_v2")
LAYOUT = ("ROOT/MSMT17_V1/{train,test}/<pid>/<pid>_<seq>_<cam>_....jpg plus "
          "ROOT/MSMT17_V1/{list_train,list_val,list_query,list_gallery}.txt with lines '<pid>/<file>.jpg <pid>' "
          "(also MSMT17_V2/{mask_train_v2,mask_test_v2} or a folder named MSMT17)")


def camera_of(relpath: str, list_file: str, line: int) -> int:
  """0-based camera from an MSMT17 file name."""
  fields = os.path.basename(relpath).split("_")
  if len(fields) < 3 or not fields[2].isdigit() or not 1 <= int(fields[2]) <= 15:
    raise errors.ListFileError(f"{NAME}: {list_file}:{line}: cannot read a camera 1..15 from {relpath!r}")
  return int(fields[2]) - 1


def _read(d: str, image_dir: str, list_name: str, check_files: bool) -> list[tuple[str, int, int, int]]:
  list_file = os.path.join(d, list_name)
  records = []
  for line, (rel, pid_text, *_) in layouts.read_list_file(list_file, NAME):
    relpath = f"{image_dir}/{rel}"
    if check_files:
      layouts.check_exists(os.path.join(d, relpath), list_file, line, NAME)
    pid = layouts.parse_int(pid_text, list_file, line, NAME, "pid")
    records.append((relpath, pid, camera_of(rel, list_file, line), 0))
  return records


def load(root: str | os.PathLike, *, check_counts: bool = True, check_files: bool = True) -> ReidDataset:
  """Reads MSMT17 (V1 or V2 folder names) from its list files.

  Args:
    root: folder holding MSMT17_V1, MSMT17_V2 or MSMT17 (or that folder itself).
    check_counts: warn when the counts differ from the published ones.
    check_files: check that every listed image exists (one stat per image), naming the first missing one.
  """
  d, (train_dir, test_dir, *_) = layouts.find_dataset_dir(
      root, NAME, ("MSMT17_V1", "MSMT17_V2", "MSMT17"), [V1_DIRS + LISTS, V2_DIRS + LISTS], LAYOUT)
  train = _read(d, train_dir, "list_train.txt", check_files) + _read(d, train_dir, "list_val.txt", check_files)
  query = _read(d, test_dir, "list_query.txt", check_files)
  gallery = _read(d, test_dir, "list_gallery.txt", check_files)
  dataset = ReidDataset(
      NAME,
      train=layouts.make_split(NAME, "train", d, layouts.relabel(train), "list_train.txt + list_val.txt"),
      query=layouts.make_split(NAME, "query", d, query, os.path.join(d, "list_query.txt")),
      gallery=layouts.make_split(NAME, "gallery", d, gallery, os.path.join(d, "list_gallery.txt")))
  if check_counts:
    published.check_counts(dataset, NAME, d)
  return dataset
