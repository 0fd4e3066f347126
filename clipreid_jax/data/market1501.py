"""Market-1501 (Zheng et al., ICCV 2015): 1,501 pedestrians, 6 cameras.

Official rules kept: pid -1 ('junk') images are skipped in every split, pid 0 ('distractors') are kept (they are
in the gallery), the camera comes from 'c<k>' in the file name, view 0.
"""
from __future__ import annotations

import os

from clipreid_jax.data import layouts, published
from clipreid_jax.data.records import ReidDataset

NAME = "market1501"
SPLIT_DIRS = ("bounding_box_train", "query", "bounding_box_test")
LAYOUT = "ROOT/Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test}/<pid>_c<cam>s<seq>_<frame>_<box>.jpg"


def load(root: str | os.PathLike, *, check_counts: bool = True) -> ReidDataset:
  """Reads Market-1501 from ROOT/Market-1501-v15.09.15 (or ROOT itself when it holds the split folders)."""
  d, _ = layouts.find_dataset_dir(root, NAME, ("Market-1501-v15.09.15", "Market-1501", "market1501"),
                                  [SPLIT_DIRS], LAYOUT)
  train, query, gallery = (layouts.parse_folder(d, sub, name=NAME, num_cams=6, skip_junk=True) for sub in SPLIT_DIRS)
  dataset = layouts.folder_dataset(NAME, d, SPLIT_DIRS, train, query, gallery)
  if check_counts:
    published.check_counts(dataset, NAME, d)
  return dataset
