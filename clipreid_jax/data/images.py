"""Host-side image work: decoding to RGB, PIL resizing to uint8, and the exact official test transform.

The host only decodes and resizes (uint8, HWC); flip, pad-crop, normalisation and erasing run on the device
(`device_augment.py`). `test_transform` is the official `Resize + ToTensor + Normalize` in numpy, bit-exact
(HWC layout), for single images and parity tests.
"""
from __future__ import annotations

import io
import os
import threading
import warnings
from typing import Sequence

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from clipreid_jax.data import errors

# Official ymls: ViT uses mean = std = 0.5; the CNN (RN50) ymls use the ImageNet values (not CLIP's own constants).
PIXEL_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "rn50": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
BICUBIC = Image.Resampling.BICUBIC  # train resize (torchvision interpolation=3)
BILINEAR = Image.Resampling.BILINEAR  # test and stage-1 resize (torchvision default)

_truncated_lock = threading.Lock()


def pixel_stats(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) of the official config of `backbone` ('vit'/'ViT-B-16' or 'rn50'/'RN50')."""
  key = "rn50" if backbone.lower().startswith(("rn", "resnet", "cnn")) else "vit"
  return PIXEL_STATS[key]


def read_image(path: str | os.PathLike) -> Image.Image:
  """Reads an image file as RGB (grayscale, palette, CMYK, RGBA and PNG are converted).

  A truncated file that PIL can still partially decode is loaded with a DataWarning (the official code sets
  ImageFile.LOAD_TRUNCATED_IMAGES for everything, silently).

  Raises:
    ImageReadError: the file is missing, empty, not an image, or cannot be decoded; the message names it.
  """
  path = os.fspath(path)
  return decode_image(read_bytes(path), path)


def _unreadable(path, e: OSError) -> errors.ImageReadError:
  return errors.ImageReadError(f"cannot read image {os.fspath(path)}: {e.strerror or e}")


def _empty(name) -> errors.ImageReadError:
  return errors.ImageReadError(f"image file {os.fspath(name)} is empty (0 bytes)")


def read_bytes(path: str | os.PathLike) -> bytes:
  """The file's bytes; ImageReadError naming it when it cannot be read."""
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise _unreadable(path, e) from None


def check_file(path: str | os.PathLike) -> None:
  """The ImageReadError that `read_image` would raise first for a missing, unreadable or empty file, from one stat
  (the trainer checks the test images so before training: the evaluation reads them only after it)."""
  try:
    size = os.stat(path).st_size
  except OSError as e:
    raise _unreadable(path, e) from None
  if not size:
    raise _empty(path)


def decode_image(data: bytes, name: str) -> Image.Image:
  """Decodes the bytes of an image file as RGB, like `read_image`; `name` identifies it in messages."""
  if not data:
    raise _empty(name)
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
  except UnidentifiedImageError:
    raise errors.ImageReadError(f"{name} is not an image file PIL can read") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # a bomb: above 2x MAX_IMAGE_PIXELS
    if "truncated" not in str(e).lower():
      raise errors.ImageReadError(f"cannot decode image {name}: {errors.first_line(e)}") from None
    img = _load_truncated(data, name, e)
  return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
  """A PIL image of any mode as RGB (gray repeated, alpha dropped, palette and CMYK converted)."""
  # 16-bit gray, or 32-bit gray holding 16-bit values (a 16-bit PGM opens so): PIL's convert("RGB") (the official
  # path) clips at 255 and whitens the picture; keep the top byte. Values up to 255 (8-bit data in an int32 image)
  # convert as they are.
  if img.mode.startswith("I;16") or (img.mode == "I" and np.asarray(img).max() > 255):
    img = Image.fromarray((np.clip(np.asarray(img), 0, 65535).astype(np.uint32) >> 8).astype(np.uint8), "L")
  return img if img.mode == "RGB" else img.convert("RGB")


def _load_truncated(data: bytes, path: str, first_error: Exception) -> Image.Image:
  """Decodes what a truncated file holds, with a warning; raises ImageReadError when nothing decodes."""
  try:
    if data[:2] == b"\xff\xd8":
      # An end-of-image marker lets libjpeg finish a cut JPEG (the rest is grey) without the global PIL flag.
      img = Image.open(io.BytesIO(data + b"\xff\xd9"))
      img.load()
    else:
      # Other formats only decode partially under the module-wide flag; hold it briefly, under a lock.
      with _truncated_lock:
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
          img = Image.open(io.BytesIO(data))
          img.load()
        finally:
          ImageFile.LOAD_TRUNCATED_IMAGES = False
  except Exception:  # pylint: disable=broad-except
    raise errors.ImageReadError(f"cannot decode truncated image {path}: {first_error}") from None
  warnings.warn(f"{path}: truncated image file, decoded partially", errors.DataWarning, stacklevel=3)
  return img


def resize(img: Image.Image | np.ndarray, size: Sequence[int], resample: int = BILINEAR) -> np.ndarray:
  """PIL resize to size = (height, width); returns uint8 (height, width, 3)."""
  if isinstance(img, np.ndarray):
    img = Image.fromarray(img)
  h, w = size
  if img.size != (w, h):
    img = img.resize((w, h), resample)
  return np.asarray(img, dtype=np.uint8)


def load_resized(path: str | os.PathLike, size: Sequence[int], resample: int = BILINEAR) -> np.ndarray:
  """read_image + resize: uint8 (height, width, 3)."""
  return resize(read_image(path), size, resample)


def normalize_np(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """ToTensor + Normalize on uint8 HWC (or NHWC) arrays, in torchvision's float32 operation order (bit-exact)."""
  x = images.astype(np.float32) / np.float32(255)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def test_transform(img: Image.Image | np.ndarray, size: Sequence[int], mean: Sequence[float],
                   std: Sequence[float]) -> np.ndarray:
  """The official test transform (PIL bilinear resize, ToTensor, Normalize) as float32 HWC."""
  return normalize_np(resize(img, size, BILINEAR), mean, std)
