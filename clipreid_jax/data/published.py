"""Published split statistics, and the check that warns when a dataset on disk differs from them.

The numbers are those the official readers print on complete copies (after their filters: Market and VeRi junk
removed, MSMT17 train = list_train + list_val, VeRi images without a keypoint entry dropped). A differing count
usually means an incomplete download or the wrong folder, so it is a warning, not an error.
"""
from __future__ import annotations

import os
import warnings

from clipreid_jax.data import errors
from clipreid_jax.data.records import ReidDataset

# Keys as in ReidDataset.stats(); only the keys listed are checked.
PUBLISHED: dict[str, dict[str, int]] = {
    "market1501": dict(num_train_pids=751, num_train_imgs=12936, num_train_cams=6, num_query_pids=750,
                       num_query_imgs=3368, num_gallery_pids=751, num_gallery_imgs=15913),
    "dukemtmc": dict(num_train_pids=702, num_train_imgs=16522, num_train_cams=8, num_query_pids=702,
                     num_query_imgs=2228, num_gallery_pids=1110, num_gallery_imgs=17661),
    "occ_duke": dict(num_train_pids=702, num_train_imgs=15618, num_train_cams=8, num_query_pids=519,
                     num_query_imgs=2210, num_gallery_pids=1110, num_gallery_imgs=17661),
    "msmt17": dict(num_train_pids=1041, num_train_imgs=32621, num_train_cams=15, num_query_pids=3060,
                   num_query_imgs=11659, num_gallery_pids=3060, num_gallery_imgs=82161),
    # With the official keypoint files (63 train, 1 query and 1 gallery image have no entry and are dropped).
    "veri": dict(num_train_pids=576, num_train_imgs=37715, num_train_cams=20, num_train_views=8, num_query_pids=200,
                 num_query_imgs=1677, num_gallery_pids=200, num_gallery_imgs=11578),
    # Without keypoint files every image is kept, with view 0.
    "veri_no_keypoints": dict(num_train_pids=576, num_train_imgs=37778, num_train_cams=20, num_train_views=1,
                              num_query_pids=200, num_query_imgs=1678, num_gallery_pids=200, num_gallery_imgs=11579),
    "vehicleid_800": dict(num_train_pids=13164, num_train_imgs=113346, num_query_pids=800, num_query_imgs=6532,
                          num_gallery_pids=800, num_gallery_imgs=800),
    "vehicleid_1600": dict(num_train_pids=13164, num_train_imgs=113346, num_query_pids=1600, num_query_imgs=11395,
                           num_gallery_pids=1600, num_gallery_imgs=1600),
    "vehicleid_2400": dict(num_train_pids=13164, num_train_imgs=113346, num_query_pids=2400, num_query_imgs=17638,
                           num_gallery_pids=2400, num_gallery_imgs=2400),
}

# A folder holding this file was written by `clipreid_jax.data.synthetic`; its counts are not checked.
SYNTHETIC_MARKER = "synthetic.json"


def differences(dataset: ReidDataset, key: str) -> list[str]:
  """'name measured (published N)' for every statistic of `dataset` that differs from PUBLISHED[key]."""
  stats = dataset.stats()
  return [f"{k} {stats[k]} (published {v})" for k, v in PUBLISHED[key].items() if stats[k] != v]


def check_counts(dataset: ReidDataset, key: str, dataset_dir: str) -> None:
  """Warns (DataWarning) naming every statistic that differs from the published one."""
  if os.path.exists(os.path.join(dataset_dir, SYNTHETIC_MARKER)):
    return
  diff = differences(dataset, key)
  if diff:
    warnings.warn(f"{dataset.name} at {dataset_dir}: counts differ from the published ones: {', '.join(diff)}",
                  errors.DataWarning, stacklevel=3)
