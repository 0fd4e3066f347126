"""VehicleID (Liu et al., CVPR 2016): 26,267 vehicles, read from its split files.

Official rules kept: train = every image of train_list.txt; the test set of `test_size` (800, 1600 or 2400)
identities puts one random image of each identity in the gallery and the rest in the query, with query camera 0
and gallery camera 1 so that the same-camera filter of the evaluation never fires. Differences: all three test
sizes are reachable (the official factory only reaches 800), the gallery draw is seeded (`gallery_seed`, so every
host draws the same one), and views are 0 (the official uses 1).
"""
from __future__ import annotations

import collections
import os

import numpy as np

from clipreid_jax.data import errors, layouts, published
from clipreid_jax.data.records import ReidDataset

NAME = "vehicleid"
TEST_SIZES = (800, 1600, 2400)
LAYOUT = ("ROOT/VehicleID_V1.0/image/<name>.jpg plus ROOT/VehicleID_V1.0/train_test_split/"
          "{train_list,test_list_800,test_list_1600,test_list_2400}.txt with lines '<name> <pid>'")


def _read(d: str, list_name: str, check_files: bool) -> list[tuple[str, int]]:
  list_file = os.path.join(d, "train_test_split", list_name)
  out = []
  for line, (image, pid_text, *_) in layouts.read_list_file(list_file, NAME):
    relpath = f"image/{image}" if os.path.splitext(image)[1] else f"image/{image}.jpg"
    if check_files:
      layouts.check_exists(os.path.join(d, relpath), list_file, line, NAME)
    out.append((relpath, layouts.parse_int(pid_text, list_file, line, NAME, "pid")))
  return out


def load(root: str | os.PathLike, *, test_size: int = 800, gallery_seed: int = 0, check_counts: bool = True,
         check_files: bool = True) -> ReidDataset:
  """Reads VehicleID with the test set of `test_size` identities.

  Args:
    root: folder holding VehicleID_V1.0 (or that folder itself).
    test_size: 800, 1600 or 2400.
    gallery_seed: seed of the one-image-per-identity gallery draw (the official protocol averages 10 draws).
    check_counts: warn when the counts differ from the published ones.
    check_files: check that every listed image exists, naming the first missing one.
  """
  if test_size not in TEST_SIZES:
    raise errors.DataError(f"{NAME}: test_size {test_size} is not one of {TEST_SIZES}")
  test_list = f"test_list_{test_size}.txt"
  d, _ = layouts.find_dataset_dir(root, NAME, ("VehicleID_V1.0", "VehicleID"),
                                  [("image", "train_test_split/train_list.txt", f"train_test_split/{test_list}")],
                                  LAYOUT)
  train = [(p, pid, 0, 0) for p, pid in _read(d, "train_list.txt", check_files)]
  by_pid = collections.defaultdict(list)
  for p, pid in _read(d, test_list, check_files):
    by_pid[pid].append(p)
  rng = np.random.default_rng(gallery_seed)
  query, gallery = [], []
  for pid in sorted(by_pid):
    paths = by_pid[pid]
    pick = int(rng.integers(len(paths)))
    gallery.append((paths[pick], pid, 1, 0))
    query.extend((p, pid, 0, 0) for i, p in enumerate(paths) if i != pick)
  where = os.path.join(d, "train_test_split", test_list)
  dataset = ReidDataset(
      NAME,
      train=layouts.make_split(NAME, "train", d, layouts.relabel(train),
                               os.path.join(d, "train_test_split", "train_list.txt")),
      query=layouts.make_split(NAME, "query", d, query, where),
      gallery=layouts.make_split(NAME, "gallery", d, gallery, where))
  if check_counts:
    published.check_counts(dataset, f"{NAME}_{test_size}", d)
  return dataset
