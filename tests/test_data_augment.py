"""On-device augmentation: flip, pad-crop, normalisation and timm-style random erasing, per image, jittable."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipreid_jax import data
from clipreid_jax.data import device_augment as aug

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
H, W = 32, 16


@pytest.fixture(scope="module")
def batch():
  return np.random.default_rng(0).integers(0, 256, (64, H, W, 3), dtype=np.uint8)


def test_shapes_dtype_determinism(batch):
  f = functools.partial(data.augment, mean=MEAN, std=STD)  # jitted inside
  a = f(batch, jax.random.key(0))
  assert a.shape == batch.shape and a.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(a), np.asarray(f(batch, jax.random.key(0))))
  assert not np.array_equal(np.asarray(a), np.asarray(f(batch, jax.random.key(1))))
  # Float pixel values in [0, 255] give the same result as uint8 (up to float rounding).
  np.testing.assert_allclose(np.asarray(f(batch.astype(np.float32), jax.random.key(0))), np.asarray(a), atol=1e-5)


def test_no_randomness_is_plain_normalisation(batch):
  x = data.augment(batch, jax.random.key(3), mean=MEAN, std=STD, flip_prob=0.0, padding=0, erase_prob=0.0)
  np.testing.assert_array_equal(np.asarray(x), data.images.normalize_np(batch, MEAN, STD))
  flipped = data.augment(batch, jax.random.key(3), mean=MEAN, std=STD, flip_prob=1.0, padding=0, erase_prob=0.0)
  np.testing.assert_array_equal(np.asarray(flipped), data.images.normalize_np(batch[:, :, ::-1], MEAN, STD))


def test_flip_pad_crop_windows(batch):
  out = np.asarray(aug.flip_pad_crop(jnp.asarray(batch), jax.random.key(5), flip_prob=0.5, padding=10))
  padded = np.pad(batch, ((0, 0), (10, 10), (10, 10), (0, 0)))
  padded_flipped = np.pad(batch[:, :, ::-1], ((0, 0), (10, 10), (10, 10), (0, 0)))
  offsets, flips = set(), []
  for n in range(len(batch)):
    found = None
    for flip, p in ((False, padded[n]), (True, padded_flipped[n])):
      for i in range(21):
        for j in range(21):
          if np.array_equal(p[i:i + H, j:j + W], out[n]):
            found = (flip, i, j)
            break
        if found:
          break
      if found:
        break
    assert found is not None, f"image {n} is not a flipped/unflipped window of the padded image"
    flips.append(found[0])
    offsets.add(found[1:])
  assert 10 < sum(flips) < 54  # about half flipped
  assert len(offsets) > 20  # per-image offsets, spread over [0, 20]^2


def test_random_erasing_matches_timm_geometry():
  n = 4000
  x = jnp.full((n, H, W, 3), 100.0, jnp.float32)  # a value the N(0, 1) noise never produces
  out = np.asarray(aug.random_erasing(x, jax.random.key(7), prob=0.5))
  erased = out != 100.0
  assert np.array_equal(erased[..., 0], erased[..., 1])  # all channels of a pixel are erased together
  frac = erased[..., 0].reshape(n, -1).mean(1)
  applied = frac > 0
  assert 0.45 < applied.mean() < 0.55
  # Every erased region is one rectangle of area within rounding of [0.02, 1/3] of the image, with h < H, w < W.
  for m in np.flatnonzero(applied)[:300]:
    rows, cols = np.flatnonzero(erased[m, :, :, 0].any(1)), np.flatnonzero(erased[m, :, :, 0].any(0))
    h, w = len(rows), len(cols)
    assert erased[m, :, :, 0].sum() == h * w and np.ptp(rows) == h - 1 and np.ptp(cols) == w - 1
    assert h < H and w < W
    assert 0.02 * H * W * 0.5 <= h * w <= H * W / 3 * 1.6
  noise = out[erased]
  assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05


def test_erasing_on_the_normalised_image(batch):
  x = np.asarray(data.augment(batch, jax.random.key(11), mean=MEAN, std=STD, flip_prob=0.0, padding=0,
                              erase_prob=1.0))
  base = data.images.normalize_np(batch, MEAN, STD)
  changed = (x != base).any(-1).reshape(len(batch), -1).mean(1)
  assert (changed > 0.01).all() and (changed < 0.5).all()
