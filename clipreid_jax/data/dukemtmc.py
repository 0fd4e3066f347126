"""DukeMTMC-reID (Ristani et al. 2016; Zheng et al. 2017) and Occluded-Duke (Miao et al., ICCV 2019), 8 cameras.

Both use Market-style file names. There are no junk images; the official reader drops nothing. The official view id
is 0 for Duke and 1 for Occluded-Duke; here both are 0 (see docs/data.md: view ids are 0-based everywhere).
"""
from __future__ import annotations

import os

from clipreid_jax.data import layouts, published
from clipreid_jax.data.records import ReidDataset

SPLIT_DIRS = ("bounding_box_train", "query", "bounding_box_test")
DUKE_LAYOUT = "ROOT/dukemtmcreid/DukeMTMC-reID/{bounding_box_train,query,bounding_box_test}/<pid>_c<cam>_f<frame>.jpg"
OCC_DUKE_LAYOUT = ("ROOT/dukemtmcreid/Occluded_Duke/{bounding_box_train,query,bounding_box_test}/"
                   "<pid>_c<cam>_f<frame>.jpg")


def _load(root, name: str, folder: str, layout: str, check_counts: bool) -> ReidDataset:
  d, _ = layouts.find_dataset_dir(root, name, (f"dukemtmcreid/{folder}", folder), [SPLIT_DIRS], layout)
  train, query, gallery = (layouts.parse_folder(d, sub, name=name, num_cams=8, skip_junk=False) for sub in SPLIT_DIRS)
  dataset = layouts.folder_dataset(name, d, SPLIT_DIRS, train, query, gallery)
  if check_counts:
    published.check_counts(dataset, name, d)
  return dataset


def load_duke(root: str | os.PathLike, *, check_counts: bool = True) -> ReidDataset:
  """Reads DukeMTMC-reID from ROOT/dukemtmcreid/DukeMTMC-reID (or ROOT/DukeMTMC-reID, or ROOT itself)."""
  return _load(root, "dukemtmc", "DukeMTMC-reID", DUKE_LAYOUT, check_counts)


def load_occ_duke(root: str | os.PathLike, *, check_counts: bool = True) -> ReidDataset:
  """Reads Occluded-Duke from ROOT/dukemtmcreid/Occluded_Duke (or ROOT/Occluded_Duke, or ROOT itself)."""
  return _load(root, "occ_duke", "Occluded_Duke", OCC_DUKE_LAYOUT, check_counts)
