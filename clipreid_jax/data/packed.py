"""Packed datasets for pods: a tensorflow-datasets builder (manual download, array_record), read without TensorFlow.

Many small image files are slow on network filesystems; a pod reads a few large array_record files instead.

    python -m clipreid_jax.data.prepare market1501 --manual_dir data --data_dir gs-or-local/tfds
    dataset = load_packed("market1501", "gs-or-local/tfds")   # a ReidDataset; the loaders work unchanged

Each record holds the original file bytes (decoded on read by the same `images.decode_image` as the folder source,
so both give identical pixels), the path relative to the dataset folder, pid, camid, viewid and the record's
position. Records are written in position order (`disable_shuffling`), so position i of a split is record i, and
the split tables (paths, pids, cameras, views) are stored in the dataset metadata: the sampler needs no pass over
the records. Config names are the dataset names, plus `vehicleid_1600` and `vehicleid_2400`.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import warnings
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from clipreid_jax.data import errors, images, registry
from clipreid_jax.data.records import ReidDataset, Split

SPLITS = ("train", "query", "gallery")
# Config name -> (dataset name, reader options).
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    **{name: (name, {}) for name in registry.DATASET_NAMES},
    "vehicleid_1600": ("vehicleid", {"test_size": 1600}),
    "vehicleid_2400": ("vehicleid", {"test_size": 2400}),
}


class ReidPacked(tfds.core.GeneratorBasedBuilder):
  """Re-identification datasets (train / query / gallery) packed from their official layouts."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=f"{ds} {opts or ''}".strip())
                     for name, (ds, opts) in CONFIGS.items()]
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put the dataset in its official layout under --manual_dir (see data/README.md "
                                  "of clipreid-jax; `python -m clipreid_jax.data NAME ROOT` checks it).")
  # tfds derives this from the package with `importlib_resources`, which it does not install; set it directly.
  code_path = epath.Path(__file__)

  def __init__(self, *, dataset: ReidDataset | None = None, reader_opts: dict[str, Any] | None = None, **kwargs):
    """Args: dataset: the dataset already read from the manual dir (else it is read there with `reader_opts`)."""
    self._dataset, self._reader_opts = dataset, reader_opts or {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.splitlines()[0],
        features=tfds.features.FeaturesDict({
            "image_bytes": tfds.features.Tensor(shape=(), dtype=np.object_),
            "relpath": tfds.features.Text(),
            "pid": tfds.features.Scalar(dtype=np.int32),
            "camid": tfds.features.Scalar(dtype=np.int32),
            "viewid": tfds.features.Scalar(dtype=np.int32),
            "index": tfds.features.Scalar(dtype=np.int64),
        }),
        disable_shuffling=True,  # record i of a split is position i
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    name, opts = CONFIGS[self.builder_config.name]
    dataset = self._dataset or registry.get_dataset(name, os.fspath(dl_manager.manual_dir),
                                                    **{**opts, **self._reader_opts})
    self.info.metadata["dataset"] = name
    self.info.metadata["stats"] = dataset.stats()
    # The reader options baked into the records, so that a run asking for others is refused (load_packed).
    if name == "vehicleid":
      self.info.metadata["gallery_seed"] = int({**opts, **self._reader_opts}.get("gallery_seed", 0))
    if name == "veri":  # without keypoint files every view is 0
      self.info.metadata["keypoints"] = bool(any(getattr(dataset, s).viewids.any() for s in SPLITS))
    self.info.metadata["splits"] = {
        s: {"relpaths": getattr(dataset, s).relpaths.tolist(), "pids": getattr(dataset, s).pids.tolist(),
            "camids": getattr(dataset, s).camids.tolist(), "viewids": getattr(dataset, s).viewids.tolist()}
        for s in SPLITS}
    return {s: self._generate_examples(getattr(dataset, s)) for s in SPLITS}

  def _generate_examples(self, split: Split):
    for i in range(len(split)):
      path = split.path(i)
      data = images.read_bytes(path)
      images.decode_image(data, path)  # fail at packing time, naming the file, rather than in training
      yield i, {"image_bytes": data, "relpath": str(split.relpaths[i]), "pid": int(split.pids[i]),
                "camid": int(split.camids[i]), "viewid": int(split.viewids[i]), "index": i}


@dataclasses.dataclass(frozen=True)
class PackedImages:
  """Images of one packed split by position, decoded with `images.decode_image` (picklable for grain workers)."""
  source: Any  # tfds ArrayRecordDataSource
  label: str

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int):
    try:
      record = self.source[index]
    except Exception as e:  # pylint: disable=broad-except  # array_record raises RuntimeError/ValueError/OSError
      raise errors.ImageReadError(f"packed {self.label}: cannot read record {index} ({errors.first_line(e)}); "
                                  "the pack is corrupt or truncated: delete it and prepare it again") from None
    return images.decode_image(record["image_bytes"], f"{self.label}[{index}] ({record['relpath'].decode()})")


def config_name(name: str, **opts) -> str:
  """The builder config of dataset `name` with reader options (only vehicleid's test_size selects one)."""
  if name in CONFIGS and name not in registry.DATASET_NAMES:
    return name
  name = registry.canonical_name(name)
  if name == "vehicleid" and opts.get("test_size", 800) != 800:
    return f"vehicleid_{opts['test_size']}"
  return name


def prepare(name: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike, **opts) -> str:
  """Packs dataset `name` from its folder `manual_dir` into `data_dir`; returns the tfds name ('reid_packed/NAME').

  Args:
    name: a dataset name or config name (e.g. 'market1501', 'vehicleid_1600').
    manual_dir: the dataset root, as for `get_dataset`.
    data_dir: tfds data folder to write.
    **opts: reader options (`test_size` picks the vehicleid config; others, e.g. `gallery_seed`, are baked in).

  Raises:
    DataError: the folder does not hold the dataset (the message shows the expected layout), or a bad image.
  """
  config = config_name(name, **opts)
  if config not in CONFIGS:
    raise errors.DataError(f"{name}: no packed configuration {config!r}; expected one of {', '.join(CONFIGS)}")
  dataset_name, config_opts = CONFIGS[config]
  # Read (and check) the folder first, so a wrong layout gets our one-line error, not tfds' assertion.
  dataset = registry.get_dataset(dataset_name, manual_dir, **{**opts, **config_opts})
  if not len(dataset.train):  # pylint: disable=g-explicit-length-test
    raise errors.DataError(f"packed {config}: {os.fspath(manual_dir)} has no training split; a pack holds all three "
                           "splits (evaluate a test-only set from its folder)")
  root = pathlib.Path(data_dir)
  if root.exists() and not root.is_dir():
    raise errors.DataError(f"--data_dir: {root} is a file; expected a folder for the pack")
  builder = ReidPacked(config=config, data_dir=os.fspath(data_dir), dataset=dataset, reader_opts=opts)
  # tfds writes into `incomplete.*` beside the pack and removes it on any exception; only a kill leaves one. It may
  # also be another host's pack in progress, so it is named, not deleted.
  for left in sorted(builder.data_path.parent.glob(f"incomplete.*_{builder.data_path.name}")):
    warnings.warn(f"{left}: left by an interrupted prepare (or one still running elsewhere); delete it to free "
                  "the space", errors.DataWarning, stacklevel=2)
  # What tfds creates around the pack (its downloads and metadata folders): removed again when packing fails.
  created = [p for p in (root, root / "downloads", root / "reid_packed", root / "reid_packed" / ".config",
                         root / "reid_packed" / config) if not p.exists()]
  try:
    builder.download_and_prepare(file_format="array_record",
                                 download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
  except BaseException:
    for p in created:
      shutil.rmtree(p, ignore_errors=True)
    raise
  # tfds keeps a pack that exists: make sure it is this folder's (a changed folder or option is not repacked).
  pack = load_packed(config, data_dir)
  stale = [s for s in SPLITS if not getattr(pack, s).same_records(getattr(dataset, s))]
  if stale:
    raise errors.DataError(f"packed {config}: {builder.data_dir} holds other records than {os.fspath(manual_dir)} "
                           f"in split {stale[0]} ({len(getattr(pack, stale[0]))} packed, "
                           f"{len(getattr(dataset, stale[0]))} now; other reader options such as gallery_seed "
                           "draw other records too); expected the same: delete it to pack again")
  return f"reid_packed/{config}"


def load_packed(name: str, data_dir: str | os.PathLike, **opts) -> ReidDataset:
  """The packed dataset `name` as a ReidDataset whose splits read their images from the array_record files.

  Args:
    name: the dataset or config name.
    data_dir: the folder given to `prepare` as --data_dir.
    **opts: reader options: `test_size` picks the vehicleid config; `gallery_seed` (vehicleid) and `keypoint_dir`
      (veri) are checked against the options the pack was prepared with (packs from before they were recorded are
      not checked).

  Raises:
    DatasetNotFoundError: no packed dataset of that name under data_dir.
    DataError: a reader option that differs from the pack's.
  """
  config = config_name(name, **opts)
  data_dir = os.fspath(data_dir)
  try:
    builder = ReidPacked(config=config, data_dir=data_dir)
    prepared = builder.is_prepared()
  except Exception as e:  # pylint: disable=broad-except
    raise errors.DatasetNotFoundError(f"packed {config}: cannot open under {data_dir}: {errors.describe(e)}") from None
  if not prepared:
    parts = pathlib.Path(data_dir).resolve().parts
    if "reid_packed" in parts:  # a folder inside a pack (reid_packed/NAME/1.0.0): the pack's own root is above it
      top = pathlib.Path(*parts[:parts.index("reid_packed")])
      raise errors.DatasetNotFoundError(f"packed {config}: {data_dir} is a folder inside a pack; expected the folder "
                                        f"given to prepare --data_dir, which holds reid_packed/ ({top})")
    raise errors.DatasetNotFoundError(
        f"packed {config}: not prepared under {data_dir}; run python -m clipreid_jax.data.prepare {config} "
        f"--manual_dir ROOT --data_dir {data_dir}")
  try:
    sources = builder.as_data_source()
    lengths = {s: len(sources[s]) for s in SPLITS}
  except Exception as e:  # pylint: disable=broad-except  # a truncated or corrupt array_record file
    raise errors.DataError(f"packed {config}: cannot read the pack under {data_dir} ({errors.first_line(e)}); "
                           "it is corrupt or truncated: delete it and prepare it again") from None
  meta = builder.info.metadata
  if "gallery_seed" in opts and meta.get("gallery_seed", opts["gallery_seed"]) != opts["gallery_seed"]:
    raise errors.DataError(f"dataset.gallery_seed: {opts['gallery_seed']}, but the pack under {data_dir} was prepared "
                           f"with gallery_seed {meta['gallery_seed']}; expected {meta['gallery_seed']}, or prepare the "
                           f"pack again with --opt gallery_seed={opts['gallery_seed']} in another --data_dir")
  if opts.get("keypoint_dir") and meta.get("keypoints") is False:
    raise errors.DataError(f"dataset.keypoint_dir: {opts['keypoint_dir']} given, but the pack under {data_dir} was "
                           "prepared without keypoint files (every view is 0); expected no keypoint_dir, or prepare "
                           "the pack again with --opt keypoint_dir=DIR")
  tables = meta["splits"]
  splits = {}
  for s in SPLITS:
    t = tables[s]
    if lengths[s] != len(t["pids"]):
      raise errors.DataError(f"packed {config}: split {s} has {lengths[s]} records, metadata {len(t['pids'])}")
    splits[s] = Split(f"{builder.data_dir}#{s}", np.asarray(t["relpaths"], np.str_), np.asarray(t["pids"], np.int32),
                      np.asarray(t["camids"], np.int32), np.asarray(t["viewids"], np.int32),
                      PackedImages(sources[s], f"{config}/{s}"))
  return ReidDataset(meta["dataset"], **splits)
