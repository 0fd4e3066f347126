"""Evaluation of a model directory, feature extraction to files, and the `FeatureExtractor` Python API."""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Optional, Sequence

import jax
import numpy as np
from PIL import Image

from clipreid_jax import host_memory, outputs, steps
from clipreid_jax.data import images as image_io
from clipreid_jax.data.errors import DataError, describe
from clipreid_jax.checkpoints import read_config
from clipreid_jax.models.clipreid import load_clipreid
from clipreid_jax.workdir import SaveError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class FeatureExtractor:
  """ReID features of images from a trained or converted model directory.

    extractor = clipreid_jax.FeatureExtractor("workdirs/msmt17_vit_clipreid/model")
    feats = extractor(["a.jpg", "b.jpg"])   # (2, 1280) float32, not normalised (L2-normalise to compare)

  `images`: a list or tuple of images, or a uint8 batch (N, H, W, C), gives one row per image; one image alone gives
  (1, D). An image is a path, a PIL image (any mode; converted to RGB as files are) or a uint8 array (H, W, 3),
  (H, W, 1), (H, W) or (H, W, 4) in RGB(A) order (gray is repeated, alpha dropped; OpenCV's BGR: `x[..., ::-1]`);
  EXIF orientation is not applied, as in training; a 3-D array is always one image, so N gray
  images are a list of (H, W) arrays or an (N, H, W, 1) batch. Images are resized with PIL bilinear to the model's
  input size (the official test transform). SIE models need `cams` (and `views` when the table has views): one id
  per image, numbered as in their training set; other models ignore them. `flip=True`: the mean of each image's
  features and its mirror image's (test-time flip, not in the official code).

  On a GPU, an extractor created before anything else starts JAX makes JAX allocate device memory as it needs it,
  instead of reserving 75% of it (room for a detector beside it; 2-4 GB less host memory), unless
  XLA_PYTHON_CLIENT_PREALLOCATE is set (host_memory.no_device_preallocation).
  """

  def __init__(self, checkpoint: str | os.PathLike, batch_size: int = 64, flip: bool = False):
    host_memory.no_device_preallocation()  # before anything below starts JAX's backend
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
      raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    self.model, variables = load_clipreid(checkpoint)
    self.variables = jax.device_put(variables)
    self.batch_size = int(batch_size)
    self._fn = jax.jit(steps.make_feature_fn(self.model, "eval", flip=flip))

  @property
  def input_size(self) -> tuple[int, int]:
    return self.model.config.input_size

  def _load(self, item, index: int) -> np.ndarray:
    if isinstance(item, (str, bytes, os.PathLike)):
      item = image_io.read_image(os.fsdecode(item))
    elif isinstance(item, Image.Image):
      item = image_io.to_rgb(item)
    else:
      item = _rgb_array(item, index)
    h, w = (item.height, item.width) if isinstance(item, Image.Image) else item.shape[:2]
    if not h or not w:  # PIL resizes an empty crop (a box outside the frame) to black: a feature of nothing
      raise ValueError(f"images[{index}]: empty image of {h}x{w} pixels; expected at least one pixel")
    return image_io.resize(item, self.input_size, image_io.BILINEAR)

  def _ids(self, ids, n: int, name: str, word: str, used: bool, num: int) -> np.ndarray:
    """One SIE id per image, checked against the table (JAX would clamp an id past it silently)."""
    if not used:
      return np.zeros(n, np.int32)
    if ids is None:
      raise ValueError(f"{name}: this model uses SIE (one embedding per {word} of its training set, ids "
                       f"0..{num - 1}); expected {name}= with one id per image")
    ids = np.asarray(ids)
    if n == 1 and ids.ndim == 0:  # one image, one id: extractor(path, cams=3)
      ids = ids.reshape(1)
    if ids.shape != (n,) or ids.dtype.kind not in "iu":
      raise ValueError(f"{name}: expected {n} integer ids (one per image), got {ids.dtype} of shape {ids.shape}")
    bad = ids[(ids < 0) | (ids >= num)]
    if bad.size:
      raise ValueError(f"{name}: expected ids in 0..{num - 1} (the model's SIE table), got {bad[0]}")
    return ids.astype(np.int32)

  def __call__(self, images, cams: Optional[Sequence[int]] = None,
               views: Optional[Sequence[int]] = None) -> np.ndarray:
    images = _as_batch(images)
    n = len(images)
    cfg = self.model.config
    cams = self._ids(cams, n, "cams", "camera", bool(cfg.sie_rows) and cfg.sie_camera, cfg.camera_num)
    views = self._ids(views, n, "views", "view", bool(cfg.sie_rows) and cfg.sie_view, cfg.view_num)
    out = []
    for lo in range(0, n, self.batch_size):
      chunk = [self._load(x, lo + i) for i, x in enumerate(images[lo:lo + self.batch_size])]
      pad = self.batch_size - len(chunk)  # one compiled shape for every batch
      batch = np.stack(chunk + [np.zeros_like(chunk[0])] * pad)
      b = {"image": batch, "camid": np.pad(cams[lo:lo + len(chunk)], (0, pad)),
           "viewid": np.pad(views[lo:lo + len(chunk)], (0, pad))}
      out.append(np.asarray(self._fn(self.variables, b))[:len(chunk)])
    if not out:
      return np.zeros((0, cfg.feature_dim + cfg.clip.embed_dim), np.float32)
    return np.concatenate(out)


def _as_batch(images) -> Sequence:
  """`images` as a sequence of images: one image alone is not iterated (a path per character, an array per row)."""
  if isinstance(images, (str, bytes, os.PathLike, Image.Image)):
    return [images]
  if isinstance(images, (list, tuple)):
    return images
  if hasattr(images, "__array__") or hasattr(images, "__array_interface__"):  # numpy, JAX, torch, pandas
    arr = np.asarray(images)
    if arr.dtype.kind in "OUS":  # paths (or images), one per element
      return [x.decode() if isinstance(x, bytes) else x for x in arr.ravel()]
    if arr.ndim == 4 and arr.shape[3] in (1, 3, 4):
      return arr
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4)):
      return [arr]
    raise ValueError(f"images: expected one image (H, W, C) / (H, W) or a batch (N, H, W, C) with C in 1, 3, 4, "
                     f"got an array of shape {arr.shape}; N gray images: (N, H, W, 1) or a list of (H, W) arrays")
  try:
    return list(images)  # any other iterable of images, e.g. a generator of crops
  except TypeError:
    raise TypeError(f"images: expected a list of images (paths, PIL images or uint8 arrays) or one image, "
                    f"got {type(images).__name__}") from None


def _rgb_array(x, index: int) -> np.ndarray:
  x = np.asarray(x)
  if x.dtype != np.uint8:
    got = type(x.item()).__name__ if x.dtype == object and x.ndim == 0 else f"dtype {x.dtype}"  # e.g. None
    raise ValueError(f"images[{index}]: expected uint8 image arrays, paths or PIL images, got {got}")
  if x.ndim == 2 or (x.ndim == 3 and x.shape[2] == 1):
    return np.repeat(x.reshape(x.shape[0], x.shape[1], 1), 3, axis=2)
  if x.ndim == 3 and x.shape[2] in (3, 4):
    return x[..., :3]  # as PIL's RGBA -> RGB: alpha dropped
  raise ValueError(f"images[{index}]: expected an (H, W, 3), (H, W) or (H, W, 4) array, got shape {x.shape}")


@dataclasses.dataclass(frozen=True)
class ImageList:
  """Images to extract, with their SIE camera and view ids when the list gives them."""
  files: list[str]
  cams: Optional[np.ndarray] = None
  views: Optional[np.ndarray] = None

  def index_lines(self) -> list[str]:
    """features_index.txt: one row per feature, in the list-file form (so it can be read back as a list)."""
    cols = [c for c in (self.cams, self.views) if c is not None]
    return [",".join([f, *(str(int(c[i])) for c in cols)]) for i, f in enumerate(self.files)]


def _list_entry(line: str, base: pathlib.Path) -> tuple[pathlib.Path, list[int]]:
  """A list-file line: a path, or `path,camera[,view]` (the path itself may hold commas)."""
  resolve = lambda text: pathlib.Path(text) if pathlib.Path(text).is_absolute() else base / text
  if resolve(line).is_file():
    return resolve(line), []
  fields = line.split(",")
  ids = []
  while len(fields) > 1 and len(ids) < 2 and fields[-1].strip().lstrip("-").isdigit():
    ids.insert(0, int(fields.pop().strip()))
  return resolve(",".join(fields).strip()), ids


def _walk_files(top: pathlib.Path):
  """Every file below `top`, through symlinked folders too (Path.rglob skips them: a folder of crops gathered with
  `ln -s` lost those images silently), each real folder once (a link to a folder above it loops)."""
  seen = set()
  for folder, dirs, names in os.walk(top, followlinks=True):
    real = os.path.realpath(folder)
    if real in seen:
      dirs[:] = []
      continue
    seen.add(real)
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # hidden folders are skipped below anyway
    for name in names:
      yield pathlib.Path(folder) / name


def list_images(spec: str) -> ImageList:
  """A folder (recursively, sorted), one image file, or a text file with one image per line: `path` or
  `path,camera[,view]` (SIE ids), paths relative to the list file; an optional header row (`path,camera,view`);
  blank lines and lines starting with '#' skipped."""
  from clipreid_jax.data.custom import COLUMN_NAMES
  from clipreid_jax.data.errors import DatasetNotFoundError, EmptySplitError, ListFileError
  p = pathlib.Path(spec)
  if p.is_dir():
    # Hidden entries skipped, as the dataset readers do: macOS copies leave `._NAME.jpg` (not images) beside each
    files = sorted(str(f) for f in _walk_files(p) if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                   and not any(part.startswith(".") for part in f.relative_to(p).parts))
    if not files:
      raise EmptySplitError(f"extract.input: {spec} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return ImageList(files)
  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
    return ImageList([str(p)])
  if not p.is_file():
    raise DatasetNotFoundError(f"extract.input: {spec} is neither a folder of images, an image nor a list file")
  try:
    lines = p.read_text(encoding="utf-8-sig").splitlines()  # a BOM (Excel, Notepad) would hide the header
  except UnicodeDecodeError:
    raise ListFileError(f"{p}: expected a UTF-8 text list of image paths (or an image file named *"
                        f"{', *'.join(IMAGE_SUFFIXES)}), got undecodable bytes") from None
  files, ids, width = [], [], None
  for number, line in enumerate(lines, 1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    if not files and width is None and line.split(",")[0].strip().lower() == "path" and not (p.parent / line).exists():
      names = tuple(COLUMN_NAMES.get(x.strip().lower(), x.strip()) for x in line.split(","))  # custom's spellings
      if names not in (("path",), ("path", "camera"), ("path", "camera", "view")):
        raise ListFileError(f"{p}:{number}: header {line!r}: expected 'path', 'path,camera' or 'path,camera,view'")
      width = len(names) - 1  # a header row, as the custom dataset's lists may have
      continue
    path, row = _list_entry(line, p.parent)
    if not path.is_file():
      fields = line.split(",")
      for k in (1, 2):  # an existing image followed by ids that are not integers ("x.jpg,cam3"), or by three ids
        image, ids = _list_entry(",".join(fields[:-k]), p.parent) if len(fields) > k else (None, [])
        if image is not None and image.is_file():
          if all(f.strip().lstrip("-").isdigit() for f in fields[-k:]):
            raise ListFileError(f"{p}:{number}: {len(ids) + k} ids after the image {image}: expected at most two "
                                "(camera, view)")
          raise ListFileError(f"{p}:{number}: {','.join(fields[-k:]).strip()!r} after the image "
                              f"{','.join(fields[:-k]).strip()}: expected integer camera (and view) ids")
      raise ListFileError(f"{p}:{number}: lists {path}, which does not exist")
    if width is None:
      width = len(row)
    elif len(row) != width:
      raise ListFileError(f"{p}:{number}: expected {width} id column(s) after the path, as the first entry, got "
                          f"{len(row)}")
    files.append(str(path))
    ids.append(row)
  if not files:
    raise EmptySplitError(f"extract.input: {spec} lists no images")
  ids = np.asarray(ids, np.int64).reshape(len(files), width)
  return ImageList(files, ids[:, 0] if width >= 1 else None, ids[:, 1] if width == 2 else None)


def check_overrides(config, model, overrides: frozenset) -> None:
  """eval / extract take the model from the checkpoint (geometry, SIE, backbone, baseline); an explicit different
  value on the command line is an error rather than silently ignored (it was: `model.sie_camera=False` evaluated
  with SIE)."""
  from clipreid_jax import train
  cfg, m = model.config, config.model
  pairs = {"model.input_size": (tuple(m.input_size), tuple(cfg.input_size)),
           "model.stride": (m.stride, cfg.clip.vision_stride if cfg.clip.is_vit else None),
           "model.sie_camera": (m.sie_camera, cfg.sie_camera and bool(cfg.sie_rows)),
           "model.sie_view": (m.sie_view, cfg.sie_view and bool(cfg.sie_rows)),
           "model.sie_coe": (m.sie_coe, cfg.sie_coe if cfg.sie_rows else None),
           "model.baseline": (m.baseline, not cfg.with_text)}
  if not m.backbone.startswith("ViT" if cfg.clip.is_vit else "RN"):  # the name picks the family
    pairs["model.backbone"] = (m.backbone, cfg.backbone)
  for key, (wanted, value) in pairs.items():
    if key in overrides and value is not None and wanted != value:
      # A released checkpoint's geometry is chosen at conversion; a trained model's is the one it learnt at.
      converted = bool(read_config(config.checkpoint).get("source"))  # `convert` records the file it read
      how = ("convert with --input_size / --stride to change it" if converted and key in ("model.input_size",
                                                                                          "model.stride")
             else "it was trained so")
      raise train.ConfigError(f"{key}: {wanted!r} contradicts the checkpoint {config.checkpoint}, which has "
                              f"{value!r}; eval and extract use the checkpoint's ({how})")


def extract_to_files(config, overrides: frozenset = frozenset()) -> pathlib.Path:
  """--config.mode=extract: features.npy + features_index.txt (one row per feature) in extract.output."""
  from clipreid_jax import train
  if not config.checkpoint:
    raise train.ConfigError("checkpoint: expected a model directory for mode=extract")
  if not config.extract.input or not config.extract.output:
    raise train.ConfigError("extract.input and extract.output: both are required for mode=extract")
  out = outputs.check_writable(config.extract.output, "extract.output", train.ConfigError)
  images = list_images(config.extract.input)
  train.use_attention(config)
  extractor = FeatureExtractor(config.checkpoint, batch_size=config.eval.batch_size, flip=config.eval.flip)
  check_overrides(config, extractor.model, overrides)
  try:
    feats = extractor(images.files, cams=images.cams, views=images.views)
  except DataError:  # an unreadable image: its own message (it is a ValueError too, but not about SIE ids)
    raise
  except ValueError as e:  # SIE ids missing or outside the table
    # `cams=` / `views=` are the Python API's words: say which list-file column gives them
    missing = images.cams is None or (images.views is None and str(e).startswith("views:"))
    hint = " (give extract.input as a list file of `path,camera[,view]` lines)" if missing else ""
    raise train.ConfigError(f"extract.input: {config.extract.input}: {e}{hint}") from None
  # Both files are written in full before either replaces the previous pair: a failed write never leaves new
  # features beside an old index.
  names = ("features.npy", "features_index.txt")
  tmps = [out / f".{name}.partial" for name in names]
  replaced = [name for name in names if (out / name).exists()]
  try:  # check_writable tried the folder before the work; the disk may have filled since
    out.mkdir(parents=True, exist_ok=True)
    with open(tmps[0], "wb") as f:
      np.save(f, feats)
    tmps[1].write_text("\n".join(images.index_lines()) + "\n")
    for tmp, name in zip(tmps, names):
      os.replace(tmp, out / name)
  except BaseException as e:  # a full disk, Ctrl-C: no hidden partial files left behind
    for tmp in tmps:
      if tmp.parent.is_dir():
        tmp.unlink(missing_ok=True)
    if isinstance(e, OSError):
      raise train.ConfigError(f"extract.output: cannot write {out} ({e.strerror or type(e).__name__})") from None
    raise
  if replaced:
    print(f"replaced the previous {' and '.join(replaced)} in {out}", flush=True)
  print(f"wrote {len(images.files)} features of width {feats.shape[1]} to {out / 'features.npy'}", flush=True)
  return out


def check_eval_workdir(workdir: str | os.PathLike) -> pathlib.Path:
  """Eval mode writes metrics.json: never over a training run's (its workdir holds config.json or checkpoints/)."""
  from clipreid_jax import train
  out = outputs.check_writable(workdir, "--workdir", train.ConfigError)
  if (out / "config.json").exists() or (out / "checkpoints").exists():
    raise train.ConfigError(f"--workdir: {out} holds a training run, whose metrics.json eval mode would overwrite; "
                            "expected another workdir (the default for eval is the recipe's workdir + '_eval')")
  return out


def evaluate_checkpoint(config, workdir: str, overrides: frozenset = frozenset()) -> dict:
  """--config.mode=eval: a model directory on a dataset's query/gallery; metrics.json in the workdir."""
  from clipreid_jax import train
  if not config.checkpoint:
    raise train.ConfigError("checkpoint: expected a model directory for mode=eval")
  out = check_eval_workdir(workdir)
  train.use_attention(config)
  model, variables = load_clipreid(config.checkpoint)
  check_overrides(config, model, overrides)
  dataset = train.load_dataset(config)
  train.check_sie_fits(model.config, dataset, f"checkpoint: {config.checkpoint}",
                       f"dataset {config.dataset.name} at {config.dataset.root}")
  train.check_valid_queries(dataset)
  train.check_batch("eval.batch_size", config.eval.batch_size)  # before the ValueErrors below are the checkpoint's
  mesh = train.make_mesh()
  variables = train.replicate(mesh, variables)
  try:
    result = train.evaluate_model(config, mesh, model, variables, dataset)
  except DataError:  # an image or pack that cannot be read: the data's, said as such
    raise
  except ValueError as e:  # features that are not finite: a broken checkpoint
    raise train.ConfigError(f"checkpoint: {config.checkpoint}: {e}") from None
  print(f"final: {train.format_metrics(result)}", flush=True)  # also where metrics.json cannot be written
  record = {"final": train.percent(result), "evaluated": train.evaluation_record(config, config.checkpoint)}
  try:
    with outputs.created_folder(out):
      outputs.write_atomic(out / "metrics.json", json.dumps(record, indent=1) + "\n")
  except OSError as e:  # a full disk
    raise SaveError(f"--workdir: cannot write {out / 'metrics.json'} ({describe(e)})") from None
  return result
