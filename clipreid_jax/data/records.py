"""Splits as columns of numpy arrays, and a dataset as three splits.

A split is the list of (path, pid, camid, viewid) records of the official code, stored column-wise: one small
picklable object that grain workers and hosts share cheaply, and that the sampler reads without touching images.
Paths are kept relative to the split's root so the same split can point at a copy mounted elsewhere.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np


class Record(NamedTuple):
  """One image: absolute path, identity (a label in train, the dataset's pid elsewhere), camera and view."""
  path: str
  pid: int
  camid: int
  viewid: int


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """Records of one split, column-wise.

  Attributes:
    root: folder the relative paths start from.
    relpaths: (N,) numpy unicode array of paths relative to `root`.
    pids: (N,) int32. Train: labels 0..num_pids-1 in sorted order of the dataset's pids. Query and gallery: the
      dataset's own pids (0 = distractor where the dataset has them).
    camids: (N,) int32, 0-based.
    viewids: (N,) int32, 0-based.
    images: where the loaders get image i from (an `image_sources.ImageSource`, e.g. a packed tfds source);
      None means the files `path(i)`.
  """
  root: str
  relpaths: np.ndarray
  pids: np.ndarray
  camids: np.ndarray
  viewids: np.ndarray
  images: Any = None

  def __post_init__(self):
    n = len(self.relpaths)
    for name in ("pids", "camids", "viewids"):
      if len(getattr(self, name)) != n:
        raise ValueError(f"Split.{name} has {len(getattr(self, name))} entries, relpaths has {n}")

  @classmethod
  def from_records(cls, root: str, records: Sequence[tuple[str, int, int, int]]) -> Split:
    """Builds a split from (relpath, pid, camid, viewid) tuples."""
    root = os.fspath(root)
    if not records:
      return cls(root, np.zeros((0,), np.str_), *(np.zeros((0,), np.int32) for _ in range(3)))
    relpaths, pids, camids, viewids = zip(*records)
    return cls(root, np.asarray(relpaths, dtype=np.str_), np.asarray(pids, np.int32), np.asarray(camids, np.int32),
               np.asarray(viewids, np.int32))

  def __len__(self) -> int:
    return len(self.relpaths)

  def path(self, i: int) -> str:
    return os.path.join(self.root, str(self.relpaths[i]))

  def __getitem__(self, i: int) -> Record:
    return Record(self.path(i), int(self.pids[i]), int(self.camids[i]), int(self.viewids[i]))

  def __iter__(self) -> Iterator[Record]:
    return (self[i] for i in range(len(self)))

  def take(self, indices: np.ndarray) -> Split:
    """The records at `indices`, in that order."""
    indices = np.asarray(indices, np.int64)
    source = None
    if self.images is not None:
      from clipreid_jax.data import image_sources  # pylint: disable=g-import-not-at-top
      source = image_sources.IndexedImages(self.images, indices)
    return Split(self.root, self.relpaths[indices], self.pids[indices], self.camids[indices], self.viewids[indices],
                 source)

  @property
  def num_pids(self) -> int:
    return len(np.unique(self.pids))

  @property
  def num_cams(self) -> int:
    return len(np.unique(self.camids))

  @property
  def num_views(self) -> int:
    return len(np.unique(self.viewids))

  def fingerprint(self) -> dict[str, Any]:
    """Counts and a digest of the records (relative paths and labels, not pixels): the same on a moved copy."""
    h = hashlib.sha256()
    h.update("\n".join(map(str, self.relpaths)).encode())
    for k in ("pids", "camids", "viewids"):
      h.update(np.ascontiguousarray(getattr(self, k), np.int32).tobytes())
    return {"images": len(self), "identities": self.num_pids, "cameras": self.num_cams, "sha256": h.hexdigest()[:16]}

  @staticmethod
  def concat(first: Split, second: Split) -> Split:
    """`first` then `second`; paths stay relative when both splits share a root."""
    source = None
    if first.images is not None or second.images is not None:
      from clipreid_jax.data import image_sources  # pylint: disable=g-import-not-at-top
      source = image_sources.ConcatImages(image_sources.images_of(first), image_sources.images_of(second))
    if first.root == second.root:
      root, a, b = first.root, first.relpaths, second.relpaths
    else:
      root = ""
      a = np.asarray([first.path(i) for i in range(len(first))], np.str_)
      b = np.asarray([second.path(i) for i in range(len(second))], np.str_)
    return Split(root, np.concatenate([a, b]), *(np.concatenate([getattr(first, k), getattr(second, k)])
                                                  for k in ("pids", "camids", "viewids")), source)

  def same_records(self, other: Split) -> bool:
    """Whether both splits hold the same records in the same order (roots may differ)."""
    return (len(self) == len(other) and bool(np.all(self.relpaths == other.relpaths))
            and all(np.array_equal(getattr(self, k), getattr(other, k)) for k in ("pids", "camids", "viewids")))


@dataclasses.dataclass(frozen=True, eq=False)
class ReidDataset:
  """A re-identification dataset: train, query and gallery splits.

  Attributes:
    name: registry name (e.g. 'market1501').
    train: training split, pids relabelled to 0..num_train_pids-1 in sorted pid order.
    query: query split (dataset pids).
    gallery: gallery split (dataset pids).
  """
  name: str
  train: Split
  query: Split
  gallery: Split

  @property
  def num_train_pids(self) -> int:
    """Number of classes of the ID classifiers and prompt learner."""
    return self.train.num_pids

  @property
  def num_train_cams(self) -> int:
    """Number of SIE camera entries (the official `cam_num`)."""
    return self.train.num_cams

  @property
  def num_train_views(self) -> int:
    """Number of SIE view entries (the official `view_num`)."""
    return self.train.num_views

  def fingerprint(self) -> dict[str, dict[str, Any]]:
    """Each split's `Split.fingerprint`: what a resumed run checks it is still reading."""
    return {name: getattr(self, name).fingerprint() for name in ("train", "query", "gallery")}

  def stats(self) -> dict[str, int]:
    """The split statistics printed by `python -m clipreid_jax.data`."""
    return {
        "num_train_pids": self.num_train_pids,
        "num_train_imgs": len(self.train),
        "num_train_cams": self.num_train_cams,
        "num_train_views": self.num_train_views,
        "num_query_pids": self.query.num_pids,
        "num_query_imgs": len(self.query),
        "num_gallery_pids": self.gallery.num_pids,
        "num_gallery_imgs": len(self.gallery),
    }
