"""Evaluation of a model directory, feature extraction to files, and the `FeatureExtractor` Python API."""
from __future__ import annotations

import json
import os
import pathlib
from typing import Optional, Sequence

import jax
import numpy as np

from clipreid_jax import steps
from clipreid_jax.data import images as image_io
from clipreid_jax.models.clipreid import load_clipreid

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class FeatureExtractor:
  """ReID features of images from a trained or converted model directory.

    extractor = clipreid_jax.FeatureExtractor("workdirs/msmt17_vit/model")
    feats = extractor(["a.jpg", "b.jpg"])   # (2, 1280) float32, not normalised (L2-normalise to compare)

  Images may be paths, PIL images or uint8 HWC arrays; they are resized with PIL bilinear to the model's
  input size (the official test transform). `cams`/`views` are needed only by SIE models. `flip=True`: the mean of
  each image's features and its mirror image's (test-time flip, not in the official code).
  """

  def __init__(self, checkpoint: str | os.PathLike, batch_size: int = 64, flip: bool = False):
    self.model, variables = load_clipreid(checkpoint)
    self.variables = jax.device_put(variables)
    self.batch_size = batch_size
    self._fn = jax.jit(steps.make_feature_fn(self.model, "eval", flip=flip))

  @property
  def input_size(self) -> tuple[int, int]:
    return self.model.config.input_size

  def _load(self, item) -> np.ndarray:
    if isinstance(item, (str, os.PathLike)):
      item = image_io.read_image(item)
    return image_io.resize(item, self.input_size, image_io.BILINEAR)

  def __call__(self, images: Sequence, cams: Optional[Sequence[int]] = None,
               views: Optional[Sequence[int]] = None) -> np.ndarray:
    n = len(images)
    cams = np.zeros(n, np.int32) if cams is None else np.asarray(cams, np.int32)
    views = np.zeros(n, np.int32) if views is None else np.asarray(views, np.int32)
    out = []
    for lo in range(0, n, self.batch_size):
      chunk = [self._load(x) for x in images[lo:lo + self.batch_size]]
      pad = self.batch_size - len(chunk)  # one compiled shape for every batch
      batch = np.stack(chunk + [np.zeros_like(chunk[0])] * pad)
      b = {"image": batch, "camid": np.pad(cams[lo:lo + len(chunk)], (0, pad)),
           "viewid": np.pad(views[lo:lo + len(chunk)], (0, pad))}
      out.append(np.asarray(self._fn(self.variables, b))[:len(chunk)])
    if not out:
      return np.zeros((0, self.model.config.feature_dim + self.model.config.clip.embed_dim), np.float32)
    return np.concatenate(out)


def list_images(spec: str) -> list[str]:
  """A folder (recursively, sorted) or a text file with one image path per line (relative to the file)."""
  p = pathlib.Path(spec)
  if p.is_dir():
    files = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
  elif p.is_file():
    files = []
    for line in p.read_text().splitlines():
      line = line.strip().split(",")[0].strip()
      if line and not line.startswith("#"):
        f = pathlib.Path(line)
        files.append(str(f if f.is_absolute() else p.parent / f))
    for f in files:
      if not pathlib.Path(f).is_file():
        from clipreid_jax.data.errors import ListFileError
        raise ListFileError(f"{p}: lists {f}, which does not exist")
  else:
    from clipreid_jax.data.errors import DatasetNotFoundError
    raise DatasetNotFoundError(f"extract.input: {spec} is neither a folder of images nor a list file")
  if not files:
    from clipreid_jax.data.errors import EmptySplitError
    raise EmptySplitError(f"extract.input: {spec} holds no images ({', '.join(IMAGE_SUFFIXES)})")
  return files


def extract_to_files(config) -> pathlib.Path:
  """--config.mode=extract: features.npy + features_index.txt (one path per row) in extract.output."""
  from clipreid_jax import train
  if not config.checkpoint:
    raise train.ConfigError("checkpoint: expected a model directory for mode=extract")
  if not config.extract.input or not config.extract.output:
    raise train.ConfigError("extract.input and extract.output: both are required for mode=extract")
  files = list_images(config.extract.input)
  train.use_attention(config)
  feats = FeatureExtractor(config.checkpoint, batch_size=config.eval.batch_size, flip=config.eval.flip)(files)
  out = pathlib.Path(config.extract.output)
  out.mkdir(parents=True, exist_ok=True)
  tmp = out / ".features.npy.partial"
  with open(tmp, "wb") as f:
    np.save(f, feats)
  os.replace(tmp, out / "features.npy")
  (out / "features_index.txt").write_text("\n".join(files) + "\n")
  print(f"wrote {len(files)} features of width {feats.shape[1]} to {out / 'features.npy'}", flush=True)
  return out


def evaluate_checkpoint(config, workdir: str) -> dict:
  """--config.mode=eval: a model directory on a dataset's query/gallery; metrics.json in the workdir."""
  from clipreid_jax import train
  if not config.checkpoint:
    raise train.ConfigError("checkpoint: expected a model directory for mode=eval")
  train.use_attention(config)
  model, variables = load_clipreid(config.checkpoint)
  size = tuple(config.model.input_size)
  if config.model.get("override_input_size", False) and size != tuple(model.config.input_size):
    raise train.ConfigError(f"model.input_size {size} contradicts the checkpoint's {tuple(model.config.input_size)}")
  dataset = train.load_dataset(config)
  if model.config.sie_rows:
    need = model.config.camera_num if model.config.sie_camera else 0
    have = dataset.num_train_cams
    if model.config.sie_camera and have != need:
      raise train.ConfigError(f"checkpoint: {config.checkpoint} has an SIE table for {need} cameras, but dataset "
                              f"{config.dataset.name} at {config.dataset.root} has {have}; expected the same cameras")
    train.check_sie_ids(dataset, model.config.sie_camera, model.config.sie_view, model.config.camera_num,
                        model.config.view_num)
  mesh = train.make_mesh()
  variables = train.replicate(mesh, variables)
  result = train.evaluate_model(config, mesh, model, variables, dataset)
  out = pathlib.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "metrics.json").write_text(json.dumps({"final": train.percent(result)}, indent=1) + "\n")
  print(f"final: {train.format_metrics(result)}", flush=True)
  return result
