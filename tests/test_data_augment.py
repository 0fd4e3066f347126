"""On-device augmentation: flip, pad-crop, normalisation and timm-style random erasing, per image, jittable."""
import functools
import math

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


def test_crop_offsets_cover_zero_to_twice_the_padding():
  # torchvision RandomCrop after Pad(10): top and left are uniform over 0..20 inclusive. A constant image shows the
  # offset in its black border: offset = 10 - (black rows at the top) + (black rows at the bottom).
  n = 4000
  x = jnp.full((n, H, W, 3), 255, jnp.uint8)
  out = np.asarray(aug.flip_pad_crop(x, jax.random.key(2), flip_prob=0.0, padding=10))[..., 0] == 0
  black_rows, black_cols = out.all(2), out.all(1)
  lead = lambda black: np.argmin(black, axis=1)  # length of the leading run of black lines
  top = 10 - lead(black_rows) + lead(black_rows[:, ::-1])
  left = 10 - lead(black_cols) + lead(black_cols[:, ::-1])
  for offsets in (top, left):
    counts = np.bincount(offsets, minlength=21)
    assert len(counts) == 21 and counts.min() > n / 21 * 0.6  # each of 0..20 about 190 times


def _timm_erase_geometry(n, h, w, rng, min_area=0.02, max_area=1 / 3, min_aspect=0.3, attempts=10):
  """numpy transcription of timm RandomErasing's placement loop: (eh, ew, top, left) of the first fitting attempt."""
  area = rng.uniform(min_area, max_area, (n, attempts)) * h * w
  ratio = np.exp(rng.uniform(math.log(min_aspect), math.log(1 / min_aspect), (n, attempts)))
  eh, ew = np.round(np.sqrt(area * ratio)).astype(int), np.round(np.sqrt(area / ratio)).astype(int)
  fits = (eh < h) & (ew < w)
  first = np.argmax(fits, axis=1)
  eh, ew = eh[np.arange(n), first], ew[np.arange(n), first]
  top, left = rng.integers(0, h - eh + 1), rng.integers(0, w - ew + 1)
  return eh[fits.any(1)], ew[fits.any(1)], top[fits.any(1)], left[fits.any(1)]


def test_random_erasing_distribution_matches_timm():
  # Area U(0.02, 1/3), log-uniform aspect in [0.3, 1/0.3], uniform top-left reaching every edge: the statistics of
  # 4000 erased rectangles agree with a numpy transcription of timm's loop.
  n = 4000
  x = jnp.full((n, H, W, 3), 100.0, jnp.float32)
  erased = np.asarray(aug.random_erasing(x, jax.random.key(21), prob=1.0))[..., 0] != 100.0
  rows, cols = erased.any(2), erased.any(1)
  assert rows.any(1).all()  # with 10 attempts one always fits at this size
  eh, ew = rows.sum(1), cols.sum(1)
  top, left = rows.argmax(1), cols.argmax(1)
  np.testing.assert_array_equal(erased.sum((1, 2)), eh * ew)  # one rectangle each
  reh, rew, rtop, rleft = _timm_erase_geometry(200_000, H, W, np.random.default_rng(0))

  def stats(eh, ew, top, left):
    return np.array([(eh * ew).mean() / (H * W), (eh >= 2 * ew).mean(), (ew >= 2 * eh).mean(), (eh == ew).mean(),
                     (top == 0).mean(), (top + eh == H).mean(), (left == 0).mean(), (left + ew == W).mean()])

  ref, got = stats(reh, rew, rtop, rleft), stats(eh, ew, top, left)
  assert ref[0] > 0.1 and ref[1] > 0.2 and ref[2] > 0.02 and ref[5] > 0.03 and ref[7] > 0.05  # the checks bite
  np.testing.assert_allclose(got, ref, atol=0.02)
  assert abs(got[0] - ref[0]) < 0.006  # mean area: standard error about 0.0015


def test_augment_erases_with_timm_parameters(batch):
  # Without flip and crop, augment is normalisation then RandomErasing(area 0.02..1/3, aspect 0.3) on the same draws.
  kw = dict(mean=MEAN, std=STD, flip_prob=0.0, padding=0)
  key = jax.random.key(4)
  x = np.asarray(data.augment(batch, key, erase_prob=0.5, **kw))
  ref = np.asarray(aug.random_erasing(jnp.asarray(data.images.normalize_np(batch, MEAN, STD)), key, prob=0.5,
                                      min_area=0.02, max_area=1 / 3, min_aspect=0.3))
  np.testing.assert_array_equal(x, ref)
  assert 10 < (x != data.images.normalize_np(batch, MEAN, STD)).any((1, 2, 3)).sum() < 54


def _uniforms(n, area, ratio, erase=0.0, flip=0.0, place=(0.0, 0.0)):
  u = np.zeros((n, aug._NUM_UNIFORMS), np.float32)
  u[:, aug._FLIP], u[:, aug._ERASE] = flip, erase
  u[:, aug._AREA], u[:, aug._RATIO], u[:, aug._PLACE] = area, ratio, place
  return jnp.asarray(u)


def test_erasing_takes_the_first_fitting_attempt_and_reaches_every_edge():
  # Attempt sizes on a 32 x 16 image: area u 0 with aspect 1 (ratio u 0.5) is 3 x 3; area u 1 with aspect 1 is
  # 13 x 13; area u 1 with aspect 0.3 (ratio u 0) is 7 x 24, wider than the image, so it does not fit.
  x = jnp.full((4, H, W, 3), 100.0, jnp.float32)
  noise = jnp.zeros((4, H, W, 3), jnp.float32)
  area = np.ones((4, aug.ERASE_ATTEMPTS), np.float32)
  ratio = np.full((4, aug.ERASE_ATTEMPTS), 0.5, np.float32)
  area[0, 0] = 0.0  # image 0: small attempt first, then large ones
  area[1, 1], ratio[1, 0] = 0.0, 0.0  # image 1: a non-fitting attempt, then the small one, then large ones
  ratio[3] = 0.0  # image 3: no attempt fits, so nothing is erased
  place = np.array([[0.0, 0.0], [0.99999, 0.99999], [0.99999, 0.0], [0.0, 0.0]], np.float32)
  u = _uniforms(4, area, ratio, place=place)
  out = np.asarray(aug._erase(x, u, noise, 0.5, 0.02, 1 / 3, 0.3))[..., 0] == 0.0
  expect = np.zeros((4, H, W), bool)
  expect[0, :3, :3] = True  # first attempt at top-left
  expect[1, H - 3:, W - 3:] = True  # second attempt, pushed to the bottom-right corner
  expect[2, H - 13:, :13] = True  # large attempt at the bottom edge
  np.testing.assert_array_equal(out, expect)


def test_erase_decision_is_its_own_draw():
  # Erasing uses its own uniform, not the flip's: with the flip draw above 0.5 and the erase draw below, it erases.
  x = jnp.full((2, H, W, 3), 100.0, jnp.float32)
  u = _uniforms(2, 1.0, 0.5, erase=np.array([0.1, 0.9]), flip=np.array([0.9, 0.1]))
  out = np.asarray(aug._erase(x, u, jnp.zeros_like(x), 0.5, 0.02, 1 / 3, 0.3))
  assert (out[0] == 0).sum() == 13 * 13 * 3 and (out[1] == 100.0).all()


def test_flip_and_erase_are_independent():
  # Column 0 is black, the rest white: a flip moves the black column to the right edge (erasing never covers a whole
  # column, h < H); erased pixels hold noise, neither value.
  n = 4000
  img = np.full((n, H, W, 3), 255, np.uint8)
  img[:, :, 0] = 0
  x = np.asarray(data.augment(img, jax.random.key(9), mean=MEAN, std=STD, flip_prob=0.5, padding=0,
                              erase_prob=0.5))[..., 0]
  black, white = data.images.normalize_np(np.array([[[[0] * 3, [255] * 3]]], np.uint8), MEAN, STD)[0, 0, :, 0]
  flipped = (x[:, :, -1] == black).any(1)
  assert ((x[:, :, 0] == black).any(1) != flipped).all()
  erased = ((x != black) & (x != white)).any((1, 2))
  assert 0.45 < flipped.mean() < 0.55 and 0.45 < erased.mean() < 0.55
  assert abs((flipped & erased).mean() - flipped.mean() * erased.mean()) < 0.03


def test_flip_top_and_left_are_separate_draws():
  # Flip, crop top and crop left each read their own uniform: no flip with top 0 and left 20 (the top-right window),
  # a flip with top 20 and left 0, and a flip with the centred window (the mirror image itself).
  x = np.random.default_rng(1).integers(0, 256, (3, H, W, 3), dtype=np.uint8)
  u = np.zeros((3, aug._NUM_UNIFORMS), np.float32)
  u[:, aug._FLIP] = [0.9, 0.1, 0.0]
  u[:, aug._CROP] = [[0.0, 0.99999], [0.99999, 0.0], [0.5, 0.5]]
  out = np.asarray(aug._flip_pad_crop(jnp.asarray(x), jnp.asarray(u), 0.5, 10))
  pad = lambda a: np.pad(a, ((10, 10), (10, 10), (0, 0)))
  np.testing.assert_array_equal(out[0], pad(x[0])[:H, 20:20 + W])
  np.testing.assert_array_equal(out[1], pad(x[1][:, ::-1])[20:20 + H, :W])
  np.testing.assert_array_equal(out[2], x[2][:, ::-1])


def test_placement_draws_are_not_the_last_attempts_draws():
  # Nine attempts too wide (aspect 0.3 at the largest area: 7 x 24), the tenth 13 x 13 and placed at the bottom-right
  # corner: the placement uniforms are their own, apart from the tenth attempt's aspect ratio.
  x = jnp.full((1, H, W, 3), 100.0, jnp.float32)
  ratio = np.zeros((1, aug.ERASE_ATTEMPTS), np.float32)
  ratio[0, -1] = 0.5
  u = _uniforms(1, np.ones((1, aug.ERASE_ATTEMPTS), np.float32), ratio, place=np.array([[0.99999, 0.99999]]))
  out = np.asarray(aug._erase(x, u, jnp.zeros_like(x), 0.5, 0.02, 1 / 3, 0.3))[0, :, :, 0] == 0.0
  expect = np.zeros((H, W), bool)
  expect[H - 13:, W - 13:] = True
  np.testing.assert_array_equal(out, expect)
