"""On-device training augmentation and normalisation (jittable, explicit PRNG keys, NHWC batches).

`augment` reproduces the official stage-2 transform after its PIL resize, per image with independent draws:
horizontal flip (p 0.5), Pad(10) with black + RandomCrop to the input size, ToTensor + Normalize, then timm's
RandomErasing(probability 0.5, mode='pixel', max_count 1): area U(0.02, 1/3) of the image, log-uniform aspect
ratio in [0.3, 1/0.3], up to 10 placement attempts, the patch filled with per-pixel, per-channel N(0, 1) noise.
The random numbers come from JAX instead of Python's `random`, so individual draws differ from a PyTorch run;
the distributions are the same.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

ERASE_ATTEMPTS = 10


def normalization_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """(256, 3) float32: the normalised value of every uint8 level per channel, in torchvision's operation order.

  A lookup keeps device results bit-identical to ToTensor + Normalize; XLA rewrites x / 255 as x * (1 / 255),
  which can differ in the last bit.
  """
  levels = np.arange(256, dtype=np.float32)[:, None] / np.float32(255)
  return (levels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """ToTensor + Normalize on the device: uint8 (exact, by table lookup) or float pixel values in [0, 255]."""
  return _normalize(images, tuple(map(float, mean)), tuple(map(float, std)))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normalize(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
  if images.dtype == jnp.uint8:
    table = jnp.asarray(normalization_table(mean, std))
    return jnp.take_along_axis(table, images.reshape(-1, 3).astype(jnp.int32), axis=0).reshape(images.shape)
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# Per-image uniforms, drawn with the erasing noise in one call (each random call site costs about a second of CPU
# compile time): flip, crop top, crop left, erase or not, 10 erase areas, 10 aspect ratios, erase top, erase left.
_FLIP, _CROP, _ERASE = 0, slice(1, 3), 3
_AREA = slice(4, 4 + ERASE_ATTEMPTS)
_RATIO = slice(_AREA.stop, _AREA.stop + ERASE_ATTEMPTS)
_PLACE = slice(_RATIO.stop, _RATIO.stop + 2)
_NUM_UNIFORMS = _PLACE.stop


def _draw(rng: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """(n, _NUM_UNIFORMS) uniforms in [0, 1) and N(0, 1) noise of `shape`, from one random call."""
  n, size = shape[0], math.prod(shape[1:])
  u = jax.random.uniform(rng, (n, _NUM_UNIFORMS + size))
  # Inverse-CDF normal, as jax.random.normal computes it.
  v = jnp.clip(2.0 * u[:, _NUM_UNIFORMS:] - 1.0, jnp.nextafter(jnp.float32(-1), jnp.float32(0)), 1.0)
  noise = (jnp.sqrt(2.0) * jax.lax.erf_inv(v)).reshape(shape)
  return u[:, :_NUM_UNIFORMS], noise


def _flip_pad_crop(images: jax.Array, u: jax.Array, flip_prob: float, padding: int) -> jax.Array:
  n, h, w, c = images.shape
  flip = u[:, _FLIP] < flip_prob
  images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
  if padding <= 0:
    return images
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  # torchvision RandomCrop: top and left uniform in [0, 2 * padding], both inclusive.
  offsets = jnp.minimum(jnp.floor(u[:, _CROP] * (2 * padding + 1)).astype(jnp.int32), 2 * padding)
  crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def _erase(images: jax.Array, u: jax.Array, noise: jax.Array, prob: float, min_area: float, max_area: float,
           min_aspect: float) -> jax.Array:
  n, h, w, _ = images.shape
  area = (min_area + u[:, _AREA] * (max_area - min_area)) * (h * w)
  log_ratio = math.log(min_aspect) + u[:, _RATIO] * (-2 * math.log(min_aspect))
  ratio = jnp.exp(log_ratio)
  eh = jnp.round(jnp.sqrt(area * ratio)).astype(jnp.int32)  # round half to even, like Python's round
  ew = jnp.round(jnp.sqrt(area / ratio)).astype(jnp.int32)
  fits = (eh < h) & (ew < w)
  first = jnp.argmax(fits, axis=1)  # the first attempt that fits, as timm's loop takes it
  pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]
  eh, ew = pick(eh), pick(ew)
  apply = (u[:, _ERASE] < prob) & jnp.any(fits, axis=1)
  # randint(0, H - h) and randint(0, W - w), inclusive.
  top = jnp.minimum(jnp.floor(u[:, _PLACE][:, 0] * (h - eh + 1)).astype(jnp.int32), h - eh)
  left = jnp.minimum(jnp.floor(u[:, _PLACE][:, 1] * (w - ew + 1)).astype(jnp.int32), w - ew)
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  inside = ((rows >= top[:, None, None]) & (rows < (top + eh)[:, None, None])
            & (cols >= left[:, None, None]) & (cols < (left + ew)[:, None, None]) & apply[:, None, None])
  return jnp.where(inside[..., None], noise.astype(images.dtype), images)


@functools.partial(jax.jit, static_argnames=("flip_prob", "padding"))
def flip_pad_crop(images: jax.Array, rng: jax.Array, *, flip_prob: float = 0.5, padding: int = 10) -> jax.Array:
  """Random horizontal flip, then zero padding and a random crop back to the input size, per image (any dtype)."""
  u = jax.random.uniform(rng, (images.shape[0], _NUM_UNIFORMS))
  return _flip_pad_crop(images, u, flip_prob, padding)


@functools.partial(jax.jit, static_argnames=("prob", "min_area", "max_area", "min_aspect"))
def random_erasing(images: jax.Array, rng: jax.Array, *, prob: float = 0.5, min_area: float = 0.02,
                   max_area: float = 1 / 3, min_aspect: float = 0.3) -> jax.Array:
  """timm RandomErasing(mode='pixel', max_count=1) on normalised float images, per image.

  With probability `prob`, up to 10 attempts draw a target area U(min_area, max_area) * H * W and an aspect ratio
  exp(U(log min_aspect, -log min_aspect)); h = round(sqrt(area * ratio)), w = round(sqrt(area / ratio)). The first
  attempt with h < H and w < W is placed at a uniform top-left corner and filled with N(0, 1) noise.
  """
  u, noise = _draw(rng, images.shape)
  return _erase(images, u, noise, prob, min_area, max_area, min_aspect)


def augment(images: jax.Array, rng: jax.Array, *, mean: Sequence[float], std: Sequence[float],
            flip_prob: float = 0.5, padding: int = 10, erase_prob: float = 0.5) -> jax.Array:
  """The official stage-2 train transform after the resize, on an NHWC batch; returns normalised float32.

  Args:
    images: (N, H, W, 3) uint8, or float holding pixel values in [0, 255], already resized (PIL bicubic) on the host.
    rng: a PRNG key; every image gets its own flip, crop and erasing draws.
    mean, std: normalisation constants (`images.pixel_stats`), static.
    flip_prob, padding, erase_prob: the official INPUT.PROB, INPUT.PADDING and INPUT.RE_PROB, static.
  """
  return _augment(images, rng, tuple(map(float, mean)), tuple(map(float, std)), float(flip_prob), int(padding),
                  float(erase_prob))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _augment(images: jax.Array, rng: jax.Array, mean: tuple[float, ...], std: tuple[float, ...], flip_prob: float,
             padding: int, erase_prob: float) -> jax.Array:
  u, noise = _draw(rng, images.shape)
  x = _normalize(_flip_pad_crop(images, u, flip_prob, padding), mean, std)
  if erase_prob <= 0:
    return x
  return _erase(x, u, noise, erase_prob, 0.02, 1 / 3, 0.3)
