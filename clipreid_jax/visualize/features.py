"""Features of split images for the pictures: evaluation features (rank lists), projected image features and
identity text features (t-SNE). Images come from the split's own source (files or a packed store)."""
from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from clipreid_jax.data import image_sources, images as image_io
from clipreid_jax.data.device_augment import normalize
from clipreid_jax.data.records import Split
from clipreid_jax.models.clipreid import CLIPReID

# Images decoded at a time: bounds host memory on large galleries.
_CHUNK = 256


def as_pil(img: Image.Image | np.ndarray) -> Image.Image:
  return img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, np.uint8)).convert("RGB")


def split_images(split: Split, indices: Sequence[int]) -> list[Image.Image]:
  source = image_sources.images_of(split)
  return [as_pil(source[int(i)]) for i in indices]


def _chunks(n: int) -> Iterator[slice]:
  for lo in range(0, n, _CHUNK):
    yield slice(lo, min(lo + _CHUNK, n))


def eval_features(extractor, split: Split) -> np.ndarray:
  """Test features of every image of `split` (a `FeatureExtractor`; cameras and views feed SIE models)."""
  out = []
  for s in _chunks(len(split)):
    idx = np.arange(s.start, s.stop)
    try:
      out.append(extractor(split_images(split, idx), cams=split.camids[s], views=split.viewids[s]))
    except ValueError as e:  # an SIE model's table against this dataset's camera (view) ids
      from clipreid_jax.visualize.inputs import VisualizeError  # pylint: disable=g-import-not-at-top
      raise VisualizeError(f"--checkpoint: cannot embed the images under {split.root} ({e}); expected the "
                           "dataset the model was trained on") from None
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


# The model is static: models of one configuration (stage 1 and stage 2 of a run) hash equal and share a compile.
@functools.partial(jax.jit, static_argnums=0)
def _project(model: CLIPReID, variables: dict, images: jax.Array) -> jax.Array:
  x = normalize(images, model.config.pixel_mean, model.config.pixel_std)
  return model.apply(variables, x, method=CLIPReID.stage1_feature)


def projected_features(model: CLIPReID, variables: dict, split: Split, indices: Sequence[int],
                       batch_size: int = 64) -> np.ndarray:
  """The projected image feature (the stage-1 bank's: no SIE, BN on running statistics) of split[indices].

  This is the feature that lives in the text features' space, so image and text can share one t-SNE.
  """
  size = model.config.input_size
  out = []
  for lo in range(0, len(indices), batch_size):
    chunk = [image_io.resize(img, size, image_io.BILINEAR) for img in split_images(split, indices[lo:lo + batch_size])]
    pad = batch_size - len(chunk)  # one compiled shape for every batch
    batch = np.stack(chunk + [np.zeros_like(chunk[0])] * pad)
    out.append(np.asarray(_project(model, variables, jnp.asarray(batch)))[:len(chunk)])
  return np.concatenate(out)


def text_features(model: CLIPReID, variables: dict, labels: Sequence[int]) -> np.ndarray:
  """The learned-prompt text feature of each training identity label."""
  return np.asarray(_text(model, variables, jnp.asarray(np.asarray(labels, np.int32))))


@functools.partial(jax.jit, static_argnums=0)
def _text(model: CLIPReID, variables: dict, labels: jax.Array) -> jax.Array:
  return model.apply(variables, labels, method=CLIPReID.text_features)


def l2_normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
