"""Random access to the images of a split, by record position: from files, or from any other store (packed)."""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np
from PIL import Image

from clipreid_jax.data import images


class ImageSource(Protocol):
  """Images of a split by record position (what a Split's `images` field holds)."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Image.Image | np.ndarray:
    ...


@dataclasses.dataclass(frozen=True)
class FolderImages:
  """Images of a split read from its files (`split.path(i)`)."""
  split: Any

  def __len__(self) -> int:
    return len(self.split)

  def __getitem__(self, index: int) -> Image.Image:
    return images.read_image(self.split.path(index))


@dataclasses.dataclass(frozen=True)
class ConcatImages:
  """`first` then `second` (query then gallery)."""
  first: ImageSource
  second: ImageSource

  def __len__(self) -> int:
    return len(self.first) + len(self.second)

  def __getitem__(self, index: int) -> Image.Image | np.ndarray:
    n = len(self.first)
    return self.first[index] if index < n else self.second[index - n]


@dataclasses.dataclass(frozen=True)
class IndexedImages:
  """The images of `source` at `indices`."""
  source: ImageSource
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> Image.Image | np.ndarray:
    return self.source[int(self.indices[index])]


def images_of(split: Any) -> ImageSource:
  """The split's own image source, or its files."""
  return split.images if split.images is not None else FolderImages(split)
