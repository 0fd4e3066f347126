"""Re-identification data: dataset readers, the PK sampler, grain loaders and on-device augmentation.

    dataset = get_dataset("market1501", "data")            # ReidDataset: train / query / gallery Splits
    loader = train_loader(dataset.train, image_size=(256, 128), num_ids=16, num_instances=4, seed=0, epoch=1,
                          process_index=jax.process_index(), process_count=jax.process_count())
    for batch in loader:                                     # numpy: image uint8 NHWC, pid, camid, viewid, ...
      x = augment(batch["image"], rng, mean=mean, std=std)   # on the device, jittable

`python -m clipreid_jax.data NAME ROOT` prints the split statistics; see docs/data.md for the design.
The grain loaders and the JAX augmentation are imported on first use, so the readers (and the inspection CLI and
grain worker processes) do not pay for importing JAX.
"""
import importlib

from clipreid_jax.data.errors import (DataError, DatasetNotFoundError, DataWarning, EmptySplitError, ImageReadError,
                                      ListFileError, NotEnoughIdentitiesError, UnknownDatasetError)
from clipreid_jax.data.images import PIXEL_STATS, load_resized, pixel_stats, read_image, resize, test_transform
from clipreid_jax.data.records import Record, ReidDataset, Split
from clipreid_jax.data.registry import DATASET_NAMES, VEHICLE_DATASETS, canonical_name, get_dataset
from clipreid_jax.data.sampler import pk_epoch_plan

_LAZY = {
    "augment": "device_augment", "flip_pad_crop": "device_augment", "normalize": "device_augment",
    "random_erasing": "device_augment",
    "FolderImages": "image_sources", "Loader": "pipelines", "eval_loader": "pipelines", "stage1_loader": "pipelines",
    "train_loader": "pipelines",
    # Lazy also so that `python -m clipreid_jax.data.synthetic` does not find its module already imported.
    "write_synthetic_market": "synthetic",
}


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module(f"clipreid_jax.data.{_LAZY[name]}"), name)
  raise AttributeError(f"module 'clipreid_jax.data' has no attribute {name!r}")


__all__ = [
    "DATASET_NAMES", "PIXEL_STATS", "VEHICLE_DATASETS", "DataError", "DataWarning", "DatasetNotFoundError",
    "EmptySplitError", "ImageReadError", "ListFileError", "NotEnoughIdentitiesError", "Record", "ReidDataset", "Split",
    "UnknownDatasetError", "canonical_name", "get_dataset", "load_resized", "pixel_stats", "pk_epoch_plan",
    "read_image", "resize", "test_transform", *_LAZY,
]
