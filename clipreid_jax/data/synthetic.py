"""A synthetic person re-identification dataset in the Market-1501 layout, drawn procedurally.

Every identity has fixed clothes (shirt and trouser colours, optional stripes, bag, hat, shoe colour, build); every
camera has its own background, illumination (gain and colour cast), scale and blur; every image jitters position,
pose and noise, and some are partly occluded. Colours come from small palettes, so identities share single
attributes and only their combination identifies them: learnable, not trivial. Everything is a function of the seed.

    python -m clipreid_jax.data.synthetic /tmp/synth --ids 32 --test-ids 16 --imgs 8 --cams 4

writes ROOT/{bounding_box_train,query,bounding_box_test}/<pid>_c<cam>s1_<frame>_01.jpg plus ROOT/synthetic.json,
with '-1' junk images and '0000' distractors in the gallery, and `get_dataset('market1501', ROOT)` reads it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import warnings
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from clipreid_jax import outputs
from clipreid_jax.data import errors
from clipreid_jax.data.published import SYNTHETIC_MARKER
from clipreid_jax.data.records import ReidDataset

SPLIT_DIRS = ("bounding_box_train", "query", "bounding_box_test")
MAX_IDS = 4999  # identities in all: ids are drawn from twice as many 4-digit numbers

# The names `write_synthetic_market` gives; the frame numbers count 1, 2, ... over all splits.
FILE_NAME = re.compile(r"^(?:-1|\d{4})_c[1-6]s1_(\d{6})_01\.jpg$")
SHIRTS = np.array([[200, 30, 30], [30, 60, 190], [40, 150, 60], [230, 200, 40], [240, 240, 240], [30, 30, 30],
                   [140, 60, 160], [240, 130, 30], [100, 180, 220], [120, 80, 50], [230, 120, 170], [120, 120, 120]])
TROUSERS = np.array([[25, 25, 35], [40, 60, 120], [110, 110, 110], [190, 170, 130], [90, 60, 40], [210, 210, 210],
                     [60, 90, 50], [150, 30, 40]])
SKINS = np.array([[240, 200, 170], [210, 160, 120], [160, 110, 80], [100, 70, 50]])
HAIRS = np.array([[20, 15, 10], [90, 60, 30], [200, 170, 90], [140, 140, 140], [150, 50, 20]])


def _rng(seed: int, *keys: int) -> np.random.Generator:
  return np.random.default_rng([seed, *keys])


def _identity(seed: int, pid: int) -> dict:
  """Fixed appearance of one identity."""
  r = _rng(seed, 1, pid)
  jitter = lambda c: np.clip(c + r.integers(-20, 21, 3), 0, 255)
  return {
      "shirt": jitter(SHIRTS[r.integers(len(SHIRTS))]),
      "trousers": jitter(TROUSERS[r.integers(len(TROUSERS))]),
      "skin": SKINS[r.integers(len(SKINS))],
      "hair": HAIRS[r.integers(len(HAIRS))],
      "shoes": TROUSERS[r.integers(len(TROUSERS))],
      "stripes": jitter(SHIRTS[r.integers(len(SHIRTS))]) if r.random() < 0.4 else None,
      "stripe_period": int(r.integers(3, 7)),
      "bag": jitter(SHIRTS[r.integers(len(SHIRTS))]) if r.random() < 0.4 else None,
      "bag_side": int(r.integers(2)),
      "hat": HAIRS[r.integers(len(HAIRS))] if r.random() < 0.15 else None,
      "width": float(r.uniform(0.85, 1.15)),
      "short_sleeves": bool(r.random() < 0.5),
  }


def _camera(seed: int, cam: int, size: Sequence[int]) -> dict:
  """Background image and imaging conditions of one camera."""
  h, w = size
  r = _rng(seed, 2, cam)
  top, bottom = r.integers(40, 220, 3), r.integers(40, 220, 3)
  t = np.linspace(0, 1, h)[:, None, None]
  background = top * (1 - t) + bottom * t + r.normal(0, r.uniform(3, 15), (h, w, 3))
  ground = int(h * r.uniform(0.7, 0.9))
  background[ground:] = background[ground:] * 0.6 + r.integers(60, 160, 3) * 0.4
  for _ in range(r.integers(0, 4)):  # a few vertical structures (poles, doors)
    x0 = int(r.integers(0, w))
    background[:, x0:x0 + int(r.integers(2, max(3, w // 6)))] = r.integers(30, 230, 3)
  return {
      "background": np.clip(background, 0, 255).astype(np.uint8),
      "gain": float(r.uniform(0.7, 1.25)),
      "cast": r.uniform(0.85, 1.15, 3),
      "scale": float(r.uniform(0.72, 0.95)),
      "blur": float(r.choice([0.0, 0.0, 0.6, 1.0])),
  }


def _draw_person(draw: ImageDraw.ImageDraw, ident: dict, size: Sequence[int], scale: float, r: np.random.Generator,
                 crop: bool = False) -> None:
  h, w = size
  ph = h * scale * r.uniform(0.95, 1.05)
  cx = w / 2 + r.uniform(-0.1, 0.1) * w
  y0 = (h - ph) / 2 + r.uniform(-0.04, 0.04) * h
  if crop:  # junk detections: a badly placed box
    cx += r.choice([-1, 1]) * w * r.uniform(0.3, 0.5)
    y0 += r.uniform(-0.3, 0.3) * h
  c = lambda a: tuple(int(v) for v in a)
  head = ph * 0.075
  bw = ph * 0.13 * ident["width"]
  torso_top, torso_bottom, foot = y0 + 2.1 * head, y0 + ph * 0.52, y0 + ph
  stride = ph * r.uniform(0.0, 0.08)
  leg = bw * 0.45
  # legs, shoes
  for side in (-1, 1):
    x_hip = cx + side * bw * 0.45
    x_foot = x_hip + side * stride
    draw.polygon([(x_hip - leg, torso_bottom), (x_hip + leg, torso_bottom), (x_foot + leg * 0.8, foot - head * 0.5),
                  (x_foot - leg * 0.8, foot - head * 0.5)], fill=c(ident["trousers"]))
    draw.rectangle([x_foot - leg, foot - head * 0.6, x_foot + leg, foot], fill=c(ident["shoes"]))
  # arms
  arm = bw * 0.28
  for side in (-1, 1):
    x = cx + side * (bw + arm)
    draw.rectangle([x - arm, torso_top + head * 0.2, x + arm, torso_bottom + head * 0.5], fill=c(ident["skin"]))
    sleeve_end = torso_top + (head * 1.5 if ident["short_sleeves"] else ph * 0.4)
    draw.rectangle([x - arm, torso_top + head * 0.2, x + arm, sleeve_end], fill=c(ident["shirt"]))
  # torso and stripes
  draw.rectangle([cx - bw, torso_top, cx + bw, torso_bottom], fill=c(ident["shirt"]))
  if ident["stripes"] is not None:
    period = ident["stripe_period"] * ph / 100
    y = torso_top + period
    while y < torso_bottom - period / 2:
      draw.rectangle([cx - bw, y, cx + bw, y + period / 2], fill=c(ident["stripes"]))
      y += period * 1.5
  # head, hair, hat
  draw.ellipse([cx - head, y0 + 0.2 * head, cx + head, y0 + 2.2 * head], fill=c(ident["skin"]))
  draw.chord([cx - head, y0, cx + head, y0 + 1.6 * head], 180, 360, fill=c(ident["hair"]))
  if ident["hat"] is not None:
    draw.rectangle([cx - head * 1.2, y0 - head * 0.2, cx + head * 1.2, y0 + head * 0.5], fill=c(ident["hat"]))
  # bag with strap
  if ident["bag"] is not None:
    side = 1 if ident["bag_side"] else -1
    bx = cx + side * (bw + arm * 1.5)
    draw.line([(cx - side * bw * 0.8, torso_top), (bx, torso_bottom - head)], fill=c(ident["bag"] * 0.6), width=1)
    draw.rectangle([bx - bw * 0.45, torso_bottom - head * 1.5, bx + bw * 0.45, torso_bottom + head * 0.8],
                   fill=c(ident["bag"]))


def render(ident: dict | None, cam: dict, size: Sequence[int], r: np.random.Generator,
           junk: bool = False) -> Image.Image:
  """One image of identity `ident` (None: background only) seen by camera `cam`."""
  h, w = size
  shift = r.integers(-w // 8, w // 8 + 1)
  img = Image.fromarray(np.roll(cam["background"], shift, axis=1))
  draw = ImageDraw.Draw(img)
  if ident is not None:
    _draw_person(draw, ident, size, cam["scale"], r, crop=junk)
  if not junk and r.random() < 0.15:  # an occluder across the lower body
    y = int(h * r.uniform(0.55, 0.8))
    draw.rectangle([0, y, w, h], fill=tuple(int(v) for v in r.integers(40, 200, 3)))
  gain = (cam["gain"] * cam["cast"] * r.uniform(0.9, 1.1)).astype(np.float32)
  x = np.asarray(img, np.float32) * gain + r.standard_normal((h, w, 3), dtype=np.float32) * np.float32(4)
  img = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
  if cam["blur"] > 0:
    img = img.filter(ImageFilter.GaussianBlur(cam["blur"]))
  return img


def _settings(**kwargs) -> dict:
  return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def check_settings(**settings) -> list[tuple[str, object, str]]:
  """The generator's size rules, as (key, value, expected) for each setting given that breaks one (the trainer
  checks its `dataset.*` keys with them on every host before process 0 writes)."""
  def integer(v, low):
    return isinstance(v, int) and not isinstance(v, bool) and v >= low
  problems = [(k, settings[k], f"an integer >= {low}") for k, low in
              (("num_train_ids", 1), ("num_test_ids", 1), ("imgs_per_id", 4), ("seed", 0), ("queries_per_id", 1))
              if k in settings and not integer(settings[k], low)]
  cams = settings.get("num_cams", 2)
  if not (integer(cams, 2) and cams <= 6):
    problems.append(("num_cams", cams, "an integer in [2, 6] (Market-1501 names cameras c1..c6)"))
  ids = (settings.get("num_train_ids", 1), settings.get("num_test_ids", 1))
  if not problems and sum(ids) > MAX_IDS:
    problems.append(("num_train_ids + num_test_ids", sum(ids), f"at most {MAX_IDS} (4-digit Market-1501 ids)"))
  return problems


def write_synthetic_market(root: str | os.PathLike, num_train_ids: int = 32, num_test_ids: int = 16,
                           imgs_per_id: int = 8, num_cams: int = 4, size: Sequence[int] = (128, 64), seed: int = 0,
                           num_distractors: int | None = None, num_junk: int | None = None, queries_per_id: int = 2,
                           jpeg_quality: int = 90) -> str:
  """Writes a synthetic dataset in the Market-1501 layout under `root` and returns `root`.

  Identities get distinct random 4-digit pids (train and test disjoint). Each identity's `imgs_per_id` images are
  spread over 2..num_cams cameras; a test identity's first image in each of up to `queries_per_id` cameras is a
  query and the rest go to the gallery, so every query has a gallery match in another camera. The gallery also
  holds `num_distractors` images of one-off people (pid 0000) and `num_junk` bad detections (pid -1). A folder
  already holding the same settings is left as it is; one holding other synthetic settings is rewritten, with a
  DataWarning naming the changes, unless its split folders hold anything this function did not write.

  Args:
    root: output folder (created).
    num_train_ids, num_test_ids: identities in train and in query/gallery.
    imgs_per_id: images per identity (>= 4).
    num_cams: cameras, 2..6 (the Market reader accepts 'c1'..'c6').
    size: (height, width) of the images.
    seed: everything is a function of it.
    num_distractors, num_junk: default num_test_ids // 2 each.
    queries_per_id: queries per test identity (at most one per camera).
    jpeg_quality: JPEG quality.

  Raises:
    DataError: invalid settings, or `root` holds split folders or files not written by this function.
  """
  problems = check_settings(num_train_ids=num_train_ids, num_test_ids=num_test_ids, imgs_per_id=imgs_per_id,
                            num_cams=num_cams, seed=seed, queries_per_id=queries_per_id)
  if problems:
    key, value, expected = problems[0]
    raise errors.DataError(f"synthetic: {key}: expected {expected}, got {value!r}")
  num_distractors = num_test_ids // 2 if num_distractors is None else num_distractors
  num_junk = num_test_ids // 2 if num_junk is None else num_junk
  settings = _settings(num_train_ids=num_train_ids, num_test_ids=num_test_ids, imgs_per_id=imgs_per_id,
                       num_cams=num_cams, size=tuple(size), seed=seed, num_distractors=num_distractors,
                       num_junk=num_junk, queries_per_id=queries_per_id, jpeg_quality=jpeg_quality, version=1)
  root = os.fspath(root)
  marker = os.path.join(root, SYNTHETIC_MARKER)
  recorded = _read_marker(marker)
  if recorded is not None:
    if recorded == settings:
      return root
    # Only the generator's own files are replaced: they can be drawn again, anything else could not.
    foreign = _foreign_files(root, recorded)
    if foreign:
      more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
      raise errors.DataError(f"synthetic: {root} holds files this generator did not write ({foreign[0]}{more}); not "
                             "replacing its data of other settings: move them or pick another root")
    changes = ", ".join(f"{k} {recorded.get(k)} -> {v}" for k, v in settings.items() if recorded.get(k) != v)
    warnings.warn(f"synthetic: rewriting {root} for new settings ({changes})", errors.DataWarning, stacklevel=2)
    for sub in SPLIT_DIRS:
      shutil.rmtree(os.path.join(root, sub), ignore_errors=True)
    os.remove(marker)
  elif any(os.path.exists(os.path.join(root, sub)) for sub in SPLIT_DIRS):
    # No marker, which is written last: a write killed midway leaves only the generator's own names.
    foreign = _foreign_files(root, None)
    if foreign:
      raise errors.DataError(f"synthetic: {root} already holds split folders that this generator did not write "
                             f"({foreign[0]}); move them or pick another root")
    warnings.warn(f"synthetic: {root}: finishing a write that was interrupted (no {SYNTHETIC_MARKER})",
                  errors.DataWarning, stacklevel=2)
    for sub in SPLIT_DIRS:
      shutil.rmtree(os.path.join(root, sub), ignore_errors=True)
  for sub in SPLIT_DIRS:
    os.makedirs(os.path.join(root, sub), exist_ok=True)

  size = tuple(size)
  r = _rng(seed, 0)
  high = max(1501, 2 * (num_train_ids + num_test_ids))  # ids drawn from 1..high-1: 4 digits
  pids = r.choice(np.arange(1, high), num_train_ids + num_test_ids, replace=False)
  train_pids, test_pids = np.sort(pids[:num_train_ids]), np.sort(pids[num_train_ids:])
  cams = [_camera(seed, c, size) for c in range(num_cams)]
  frame = iter(range(1, 10**6))

  def save(sub: str, pid: int, cam: int, img: Image.Image) -> None:
    name = f"{'-1' if pid < 0 else f'{pid:04d}'}_c{cam + 1}s1_{next(frame):06d}_01.jpg"
    img.save(os.path.join(root, sub, name), quality=jpeg_quality)

  def identity_images(pid: int, test: bool) -> None:
    ident = _identity(seed, pid)
    ri = _rng(seed, 3, pid)
    max_cams = min(num_cams, imgs_per_id // 2 if test else imgs_per_id)
    chosen = ri.choice(num_cams, int(ri.integers(2, max_cams + 1)), replace=False)
    queried = set()
    for k in range(imgs_per_id):
      cam = int(chosen[k % len(chosen)])
      img = render(ident, cams[cam], size, _rng(seed, 4, pid, k))
      if not test:
        save("bounding_box_train", pid, cam, img)
      elif cam not in queried and len(queried) < queries_per_id:
        queried.add(cam)
        save("query", pid, cam, img)
      else:
        save("bounding_box_test", pid, cam, img)

  for pid in train_pids:
    identity_images(int(pid), test=False)
  for pid in test_pids:
    identity_images(int(pid), test=True)
  for k in range(num_distractors):  # one-off people, pid 0000
    rk = _rng(seed, 5, k)
    cam = int(rk.integers(num_cams))
    save("bounding_box_test", 0, cam, render(_identity(seed, 100000 + k), cams[cam], size, rk))
  for k in range(num_junk):  # background or badly cropped boxes, pid -1
    rk = _rng(seed, 6, k)
    cam = int(rk.integers(num_cams))
    ident = _identity(seed, 200000 + k) if rk.random() < 0.5 else None
    save("bounding_box_test", -1, cam, render(ident, cams[cam], size, rk, junk=True))
  with open(marker, "w") as f:
    json.dump(settings, f, indent=1)
  return root


def _read_marker(marker: str) -> dict | None:
  """The settings recorded in `marker`; None when there is no such file."""
  if not os.path.isfile(marker):
    return None
  try:
    with open(marker) as f:
      recorded = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    recorded = None
  if not isinstance(recorded, dict):
    raise errors.DataError(f"synthetic: {marker} is not a settings file written by this generator")
  return recorded


def _foreign_files(root: str, recorded: dict | None) -> list[str]:
  """Entries of the split folders that the generator did not write with the `recorded` settings: it names its images
  with the frame numbers 1..N, each once, N being the number of images those settings give (None: a write that
  never finished, of unknown settings: any N)."""
  try:
    n = float("inf") if recorded is None else (
        (recorded["num_train_ids"] + recorded["num_test_ids"]) * recorded["imgs_per_id"]
        + recorded["num_distractors"] + recorded["num_junk"])
  except (KeyError, TypeError):
    n = 0  # not settings this version writes: no file is known to be ours
  seen, foreign = set(), []
  for sub in SPLIT_DIRS:
    d = os.path.join(root, sub)
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
      m = FILE_NAME.match(name)
      frame = int(m.group(1)) if m else 0
      if not m or not 1 <= frame <= n or frame in seen or not os.path.isfile(os.path.join(d, name)):
        foreign.append(os.path.join(sub, name))
      seen.add(frame)
  return foreign


def load(root: str | os.PathLike, **expected) -> ReidDataset:
  """The registry's 'synthetic' dataset: reads the synthetic data under `root` as Market-1501 and never writes it
  (`write_synthetic_market`, this module's CLI and the trainer do).

  Args:
    root: a folder written by `write_synthetic_market`.
    **expected: settings of `write_synthetic_market` that the data must have been written with.

  Raises:
    DatasetNotFoundError: `root` holds no synthetic data (the message says how to write it).
    DataError: the data was written with other settings than `expected`.
  """
  from clipreid_jax.data import market1501  # pylint: disable=g-import-not-at-top
  root = os.fspath(root)
  recorded = _read_marker(os.path.join(root, SYNTHETIC_MARKER))
  if recorded is None:
    raise errors.DatasetNotFoundError(
        f"synthetic: {root} holds no synthetic data (no {SYNTHETIC_MARKER}); write it with `python -m "
        f"clipreid_jax.data.synthetic {root}` (--help lists the settings) or train with dataset.name 'synthetic'")
  wanted = _settings(**expected)
  for key in ("num_distractors", "num_junk"):  # None means the default, half the test identities
    if key in wanted and wanted[key] is None:
      wanted[key] = wanted.get("num_test_ids", recorded.get("num_test_ids", 0)) // 2
  diff = [f"{k} {recorded.get(k)}, not {v}" for k, v in wanted.items() if recorded.get(k) != v]
  if diff:
    raise errors.DataError(f"synthetic: {root} was written with other settings ({'; '.join(diff)}); rewrite it with "
                           "write_synthetic_market or `python -m clipreid_jax.data.synthetic`")
  return market1501.load(root)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m clipreid_jax.data.synthetic", description=__doc__.splitlines()[0])
  parser.add_argument("root", help="output folder")
  parser.add_argument("--ids", type=int, default=32, help="training identities")
  parser.add_argument("--test-ids", type=int, default=16, help="query/gallery identities")
  parser.add_argument("--imgs", type=int, default=8, help="images per identity")
  parser.add_argument("--cams", type=int, default=4, help="cameras (2..6)")
  parser.add_argument("--height", type=int, default=128)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  try:
    outputs.check_writable(args.root, "root", errors.DataError)
    with errors.warnings_as_lines():  # "rewriting ...": one line, as the errors
      root = write_synthetic_market(args.root, num_train_ids=args.ids, num_test_ids=args.test_ids,
                                    imgs_per_id=args.imgs, num_cams=args.cams, size=(args.height, args.width),
                                    seed=args.seed)
  except errors.DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(root)
  return 0


if __name__ == "__main__":
  sys.exit(main())
