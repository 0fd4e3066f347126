"""VeRi-776 (Liu et al., ICME 2016 / ECCV 2016): 776 vehicles, 20 cameras, 8 viewpoints.

Official rules kept: pid -1 skipped; camera from 'c<k>' in the file name; view ids from the keypoint files of
Zhongdao/VehicleReIDKeyPointData (`keypoint_train.txt`, `keypoint_test.txt`: an image path, 40 keypoint numbers and
the view 0..7 last), looked up by file name in the train map first, then the test map; images without an entry are
dropped from every split, as the official code does. The official code reads the keypoint files relative to the
working directory; here they are looked for in `keypoint_dir`, the VeRi folder, then ROOT. Without them every view
is 0 and a warning says so.
"""
from __future__ import annotations

import os
import warnings

from clipreid_jax.data import errors, layouts, published
from clipreid_jax.data.records import ReidDataset

NAME = "veri"
SPLIT_DIRS = ("image_train", "image_query", "image_test")
KEYPOINT_FILES = ("keypoint_train.txt", "keypoint_test.txt")
LAYOUT = ("ROOT/VeRi/{image_train,image_query,image_test}/<pid>_c<cam>_<frame>_0.jpg, "
          "optionally ROOT/VeRi/{keypoint_train,keypoint_test}.txt for view ids")


def read_keypoint_views(path: str) -> dict[str, int]:
  """File name -> view id of one keypoint file."""
  views = {}
  for line, fields in layouts.read_list_file(path, NAME, min_fields=2):
    view = layouts.parse_int(fields[-1], path, line, NAME, "view")
    if not 0 <= view <= 7:
      raise errors.ListFileError(f"{NAME}: {path}:{line}: view {view} outside 0..7")
    views[os.path.basename(fields[0])] = view
  return views


def _keypoint_maps(search: list[str]) -> tuple[list[str], list[dict[str, int]]] | None:
  for folder in search:
    paths = [os.path.join(folder, f) for f in KEYPOINT_FILES]
    found = [os.path.isfile(p) for p in paths]
    if all(found):
      return paths, [read_keypoint_views(p) for p in paths]
    if any(found):  # with one file only, every image of the other split lacks a view and would be dropped
      missing = paths[found.index(False)]
      raise errors.DatasetNotFoundError(f"{NAME}: {missing} is missing (its pair {paths[found.index(True)]} is "
                                        "there); expected both keypoint files, or neither")
  return None


def load(root: str | os.PathLike, *, keypoint_dir: str | None = None, check_counts: bool = True) -> ReidDataset:
  """Reads VeRi-776 from ROOT/VeRi (or ROOT itself), with views from the keypoint files when present."""
  d, _ = layouts.find_dataset_dir(root, NAME, ("VeRi", "VeRi-776", "veri"), [SPLIT_DIRS], LAYOUT)
  if keypoint_dir and not any(os.path.isfile(os.path.join(keypoint_dir, f)) for f in KEYPOINT_FILES):
    raise errors.DatasetNotFoundError(f"{NAME}: keypoint_dir {keypoint_dir} holds neither {' nor '.join(KEYPOINT_FILES)}")
  search = ([keypoint_dir] if keypoint_dir else []) + [d, os.fspath(root)]
  found = _keypoint_maps(search)
  maps = found[1] if found else None
  no_entry = []  # images of the split being read that no keypoint file names
  if maps is None:
    warnings.warn(f"{NAME}: no {' or '.join(KEYPOINT_FILES)} in {', '.join(search)}: every view id is 0 and no image "
                  "is dropped (the official code uses the keypoint files)", errors.DataWarning, stacklevel=2)

    def view_of(fname: str) -> int | None:
      return 0
  else:
    def view_of(fname: str) -> int | None:
      for m in maps:
        if fname in m:
          return m[fname]
      no_entry.append(fname)
      return None

  splits = []
  for sub in SPLIT_DIRS:
    no_entry.clear()
    splits.append(layouts.parse_folder(d, sub, name=NAME, num_cams=20, skip_junk=True, view_of=view_of))
    if not splits[-1] and no_entry:  # said as "no usable images", the keypoint files went unmentioned
      raise errors.EmptySplitError(
          f"{NAME}: none of the {len(no_entry)} images in {os.path.join(d, sub)} has an entry in "
          f"{' or '.join(found[0])} (views are looked up by file name, e.g. {no_entry[0]}); expected the keypoint "
          "files of this VeRi copy, or neither file (every view 0)")
  dataset = layouts.folder_dataset(NAME, d, SPLIT_DIRS, *splits)
  if check_counts:
    published.check_counts(dataset, NAME if maps is not None else "veri_no_keypoints", d)
  return dataset
