"""The trainer: stage 1 (prompt tokens), stage 2 (image encoder), evaluation, checkpoints.

One readable loop in the style of big_vision: the host feeds global batches to jitted pure steps over a
`Mesh` of all devices (batch sharded on 'data', parameters replicated, state donated), metrics are
fetched only every `log_every_steps`, and orbax checkpoints at epoch ends (and on SIGTERM; `workdir.Run`) make a
restarted run with the same --workdir continue where it stopped, bit for bit (docs/reliability.md).

Everything a user can get wrong (config values, data, checkpoints, the workdir) is checked before the
workdir is written; a non-finite loss or gradient stops the run without saving the bad state.
"""
from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import math
import os
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clipreid_jax import checkpoints, losses, optim, outputs, steps
from clipreid_jax.workdir import ConfigError, Run, TrainingStopped, check_finite, record_counts
from clipreid_jax.data import pipelines, prefetch, sampler, synthetic
from clipreid_jax.data import errors
from clipreid_jax.data.errors import DataError
from clipreid_jax.models import clip as clip_lib
from clipreid_jax.models import clipreid
from clipreid_jax.models.clip import CLIP, CLIPConfig, load_clip

log = logging.getLogger("clipreid_jax")


# --------------------------------------------------------------------------------------------------
# Configuration values, checked before anything is read or written.

_DTYPES = ("auto", "float32", "bfloat16")


def _need(ok: bool, key: str, value, expected: str) -> None:
  if not ok:
    raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_warned: set = set()


def _warn_once(message: str, *args) -> None:
  """validate_config runs twice in a CLI run (before JAX starts, and in train_and_evaluate): one warning each."""
  text = message % args
  if text not in _warned:
    _warned.add(text)
    log.warning("%s", text)


def validate_config(config) -> None:
  """Raises ConfigError naming the first key whose value cannot work (types, signs, ranges).

  ml_collections already refuses unknown keys and wrongly typed overrides; this catches the values that parse
  but would fail (or silently misbehave) minutes later. Only the keys the mode uses are checked.
  """
  mode = config.get("mode", "train")
  _need(mode in ("train", "eval", "extract"), "mode", mode, "'train', 'eval' or 'extract'")
  _need(_is_int(config.eval.batch_size) and config.eval.batch_size > 0, "eval.batch_size", config.eval.batch_size,
        "a positive integer")
  m = config.model
  _need(m.get("attention", "auto") in clip_lib.ATTENTION_SETTINGS, "model.attention", m.get("attention"),
        " or ".join(map(repr, clip_lib.ATTENTION_SETTINGS)))
  if mode != "extract":  # the evaluation's keys (train mode evaluates at the end)
    for key in ("eval.k1", "eval.k2", "eval.trials"):
      v = _get(config, key)
      _need(_is_int(v) and v > 0, key, v, "a positive integer")
    _need(_is_real(config.eval.lambda_value) and 0 <= config.eval.lambda_value <= 1, "eval.lambda_value",
          config.eval.lambda_value, "a number in [0, 1]")
    _need(_is_int(config.seed) and config.seed >= 0, "seed", config.seed, "an integer >= 0")
  if mode != "extract":
    ds = config.dataset
    # An empty root would read (and, for synthetic data, write) the current folder.
    _need(bool(ds.get("packed_dir")) or (isinstance(ds.root, str) and ds.root.strip() != ""), "dataset.root",
          ds.root, "a dataset folder (or dataset.packed_dir)")
    if ds.name == "synthetic":  # checked on every host before process 0 writes
      _check_synthetic(ds)
  if mode != "train":
    return
  # A training run would ignore it: it starts from init.clip and resumes from its own --workdir.
  _need(not config.get("checkpoint"), "checkpoint", config.get("checkpoint"), "'' in train mode (it names the model "
        "eval and extract modes read; training starts from init.clip, which also takes a CLIP-ReID model directory to "
        "fine-tune, and resumes from its --workdir)")
  _need(isinstance(m.backbone, str) and m.backbone.startswith(("ViT", "RN")), "model.backbone", m.backbone,
        "a ViT-* or RN* CLIP name")
  _need(m.dtype in _DTYPES, "model.dtype", m.dtype, " or ".join(map(repr, _DTYPES)))
  size = tuple(m.input_size)
  _need(len(size) == 2 and all(_is_int(v) and v > 0 for v in size), "model.input_size", size,
        "two positive integers (height, width)")
  _need(_is_int(m.stride) and m.stride > 0, "model.stride", m.stride, "a positive integer")
  if not m.backbone.startswith("ViT"):  # as `:sie_olp` on an RN recipe: the official RN model has neither
    for key in ("sie_camera", "sie_view"):
      _need(not m[key], f"model.{key}", m[key], "False for an RN backbone (SIE is ViT-only)")
    _need(m.stride == 16, "model.stride", m.stride, "16 for an RN backbone (the patch stride, OLP, is ViT-only)")
  _need(_is_real(m.sie_coe), "model.sie_coe", m.sie_coe, "a finite number")
  positive_ints = ["stage2.num_ids", "stage2.num_instances", "stage2.max_epochs", "checkpoint_every_epochs",
                   "stage1.checkpoint_every_epochs", "log_every_steps", "prefetch_batches"]
  if not m.baseline:  # the baseline has no stage 1
    positive_ints += ["stage1.batch_size", "stage1.max_epochs", "stage1.log_every_epochs"]
  for key in positive_ints:
    v = _get(config, key)
    _need(_is_int(v) and v > 0, key, v, "a positive integer")
  for key in ("data_workers", "stage1.warmup_epochs", "stage2.warmup_iters", "eval.period"):
    v = _get(config, key)
    _need(_is_int(v) and v >= 0, key, v, "an integer >= 0")
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  if config.data_workers > cpus:
    _warn_once("data_workers %d is more than the %d CPUs this process may use: the workers share them with the "
                "trainer (each is a process holding its own decoder buffers)", config.data_workers, cpus)
  for key in ("stage1.base_lr", "stage2.base_lr", "stage2.gamma", "stage2.bias_lr_factor"):
    v = _get(config, key)
    _need(_is_real(v) and v > 0, key, v, "a finite number > 0")
  for key in ("stage1.weight_decay", "stage1.warmup_lr_init", "stage1.lr_min", "stage2.weight_decay",
              "stage2.weight_decay_bias", "stage2.warmup_factor", "loss.triplet_weight", "loss.i2t_weight",
              "loss.margin", "augment.padding"):
    v = _get(config, key)
    _need(_is_real(v) and v >= 0, key, v, "a finite number >= 0")
  _need(config.loss.id_weight is None or (_is_real(config.loss.id_weight) and config.loss.id_weight >= 0),
        "loss.id_weight", config.loss.id_weight, "None (the backbone's default) or a finite number >= 0")
  for key in ("loss.label_smoothing", "augment.flip_prob", "augment.erase_prob"):
    v = _get(config, key)
    _need(_is_real(v) and 0 <= v <= 1, key, v, "a number in [0, 1]")
  milestones = tuple(config.stage2.steps)
  _need(all(_is_int(v) and v > 0 for v in milestones) and list(milestones) == sorted(milestones), "stage2.steps",
        milestones, "increasing positive epoch numbers")
  _need(config.stage2.warmup_method in ("linear", "constant"), "stage2.warmup_method", config.stage2.warmup_method,
        "'linear' or 'constant'")
  if not m.baseline:
    _need(_is_int(m.prompt_tokens) and 1 <= m.prompt_tokens <= clipreid.MAX_PROMPT_TOKENS, "model.prompt_tokens",
          m.prompt_tokens, f"an integer in [1, {clipreid.MAX_PROMPT_TOKENS}] (the template fits CLIP's 77 tokens)")
    _need(config.stage1.lr_min <= config.stage1.base_lr, "stage1.lr_min", config.stage1.lr_min,
          f"at most stage1.base_lr ({config.stage1.base_lr:g}): the cosine falls from base_lr to lr_min")
    if config.stage1.warmup_epochs >= config.stage1.max_epochs and not config.init.stage1:  # (stage 1 skipped)
      _warn_once("stage1.warmup_epochs %d >= stage1.max_epochs %d: stage 1 never reaches its base_lr",
                  config.stage1.warmup_epochs, config.stage1.max_epochs)
  noun = m.prompt_noun  # a baseline's model is built with its prompt too (the text side unused)
  _need(isinstance(noun, str) and re.fullmatch(r"[a-z]+( [a-z]+)*", noun) is not None, "model.prompt_noun", noun,
        "'auto' or lowercase words, e.g. 'vehicle'")
  if noun != "auto" and _is_int(m.prompt_tokens):
    _need(_prompt_fits(noun, m.prompt_tokens), "model.prompt_noun", noun,
          f"words that fit CLIP's 77 tokens with model.prompt_tokens={m.prompt_tokens}")
  if config.stage2.num_instances == 1 and config.loss.triplet_weight:
    _warn_once("stage2.num_instances 1: no identity has two images in a batch, so the triplet loss has no positive "
               "pair (each anchor's hardest positive is itself)")
  late = [e for e in milestones if e > config.stage2.max_epochs]
  if late:
    _warn_once("stage2.steps %s: beyond stage2.max_epochs %d, the learning rate never decays there", late,
                config.stage2.max_epochs)
  if config.init.stage1:
    _need(not m.baseline, "init.stage1", config.init.stage1, "'' for a baseline (it has no prompts to learn)")
  if not config.init.clip:  # a random CLIP needs its sizes (the demo and tests set them; recipes leave them 0)
    _need(_random_clip_sizes(m) is not None, "init.clip", config.init.clip,
          f"a converted CLIP directory (python -m clipreid_jax.convert clip {m.backbone}.pt DIR), or "
          "model.random_clip sizes > 0 for a random CLIP")


def _prompt_fits(noun: str, prompt_tokens: int) -> bool:
  from clipreid_jax.tokenizer import tokenize  # pylint: disable=g-import-not-at-top
  try:
    tokenize(clipreid.prompt_template(noun, prompt_tokens))
  except ValueError:  # longer than CLIP's context
    return False
  return True


def prompt_noun(config) -> str:
  """The prompt's noun: model.prompt_noun, or for 'auto' the dataset's (clipreid.prompt_noun_for)."""
  noun = config.model.prompt_noun
  return clipreid.prompt_noun_for(config.dataset.name) if noun == "auto" else noun


def _check_synthetic(ds) -> None:
  _need(not ds.get("packed_dir"), "dataset.packed_dir", ds.get("packed_dir"), "'' for synthetic data, which is "
        "generated, not read from a pack (pack its folder as market1501 and train with dataset.name=market1501)")
  keys = ("num_train_ids", "num_test_ids", "imgs_per_id", "num_cams", "seed")
  missing = [k for k in keys if k not in ds]
  _need(not missing, "dataset.name", ds.name, f"a config from recipe('synthetic', ...) (configs/demo.py), which has "
        f"dataset.{', dataset.'.join(missing)}")
  problems = synthetic.check_settings(**{k: ds[k] for k in keys})
  if problems:
    key, value, expected = problems[0]
    _need(False, "dataset." + key.replace(" + ", " + dataset."), value, expected)


def _random_clip_sizes(m) -> dict | None:
  """The model.random_clip sizes when they describe a CLIP (all > 0), else None."""
  rc = m.get("random_clip")
  if not rc:
    return None
  sizes = {k: rc.get(k, 0) for k in ("embed_dim", "vision_layers", "vision_width", "text_width", "text_layers")}
  flat = [v for s in sizes.values() for v in (s if isinstance(s, (tuple, list)) else [s])]
  if not (flat and all(_is_int(v) and v > 0 for v in flat)):
    return None
  vit = m.backbone.startswith("ViT")
  layers = sizes["vision_layers"]
  # The shapes build_model makes of them: ViT heads are width // 64; a ResNet takes 4 stage depths (one number, from
  # the command line, is each stage's).
  if not vit and _is_int(layers):
    layers = sizes["vision_layers"] = (layers,) * 4
  _need(_is_int(layers) if vit else isinstance(layers, (tuple, list)) and len(layers) == 4,
        "model.random_clip.vision_layers", layers, "one block count for a ViT" if vit else
        "4 stage depths (or one for all four) for an RN")
  _need(not vit or sizes["vision_width"] % 64 == 0, "model.random_clip.vision_width", sizes["vision_width"],
        "a multiple of 64 for a ViT (its heads are 64 wide)")
  return sizes


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


# --------------------------------------------------------------------------------------------------
# Devices.


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("data",))


def use_attention(config) -> None:
  """Sets the attention kernel of every model built after this (`clip.ATTENTION_IMPLEMENTATION`, read when a
  function is traced). 'auto' / 'cudnn' take effect on NVIDIA GPUs with bf16/fp16 compute; elsewhere XLA's runs."""
  clip_lib.ATTENTION_IMPLEMENTATION = clip_lib.ATTENTION_SETTINGS[config.model.get("attention", "auto")]


def compute_dtype(name: str):
  if name == "auto":
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def to_global(mesh: Mesh, local: dict) -> dict:
  """This host's slice of a batch -> one global array per field, sharded over 'data'."""
  sharding = NamedSharding(mesh, P("data"))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def replicate(mesh: Mesh, tree):
  return jax.device_put(tree, NamedSharding(mesh, P()))


def to_host(x) -> np.ndarray:
  """A (possibly multi-host) global array as a numpy array on every host."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


# --------------------------------------------------------------------------------------------------
# Data.


def load_dataset(config, everywhere: bool = True):
  """The configured dataset. `everywhere`: every process calls this together (synthetic data is written by process
  0 while the others wait); False on one process alone, once the data exists (the pictures after training)."""
  from clipreid_jax.data import get_dataset
  ds = config.dataset
  if ds.name == "synthetic":
    failed = None
    if jax.process_index() == 0 or not everywhere:
      try:
        synthetic.write_synthetic_market(ds.root, num_train_ids=ds.num_train_ids, num_test_ids=ds.num_test_ids,
                                         imgs_per_id=ds.imgs_per_id, num_cams=ds.num_cams, seed=ds.seed)
      except OSError as e:  # permissions, a full disk
        failed = DataError(f"dataset.root: cannot write synthetic data to {ds.root} ({e.strerror or e})")
      except Exception as e:  # pylint: disable=broad-except  # raised below, after the other hosts are told
        failed = e
    if everywhere and jax.process_count() > 1:  # the other hosts wait, then stop with process 0 if it failed
      if not multihost_utils.broadcast_one_to_all(np.int32(failed is None)) and failed is None:
        raise DataError(f"synthetic: process 0 could not write {ds.root} (its error is in its output)")
    if failed is not None:
      raise failed
    return get_dataset("market1501", ds.root, check_counts=False)
  from clipreid_jax.data.registry import canonical_name
  name = canonical_name(ds.name)
  opts = {} if name == "custom" else {"check_counts": ds.check_counts}  # custom data has no published counts
  if name == "vehicleid":
    opts.update(test_size=ds.test_size, gallery_seed=ds.gallery_seed)
  if name == "veri" and ds.keypoint_dir:
    opts["keypoint_dir"] = ds.keypoint_dir
  if ds.get("packed_dir"):  # the splits and the options chosen at packing time are in the pack, which checks them
    from clipreid_jax.data.packed import load_packed  # pylint: disable=g-import-not-at-top
    return load_packed(name, ds.packed_dir, **{k: v for k, v in opts.items() if k != "check_counts"})
  return get_dataset(name, ds.root, **opts)


def check_batch(name: str, global_batch: int) -> None:
  n = jax.device_count()
  if global_batch <= 0:
    raise ConfigError(f"{name}: expected a positive batch size, got {global_batch}")
  if global_batch % n:
    raise ConfigError(f"{name}: batch {global_batch} is not divisible by the {n} devices; expected a multiple of {n}")


def check_data(config, dataset) -> None:
  """Batch sizes against the devices and the PK sampler against the identities, before anything is written."""
  if not len(dataset.train):  # a custom set without train.csv: evaluation only
    raise DataError(f"{dataset.name}: {config.dataset.root} has no training split (train.csv); training needs one "
                    "(eval and extract modes do not)")
  check_batch("eval.batch_size", config.eval.batch_size)
  s = config.stage2
  check_batch("stage2.num_ids * stage2.num_instances", s.num_ids * s.num_instances)
  # Building epoch 1's plan raises NotEnoughIdentitiesError (fewer than P identities) or an uneven host split.
  try:
    pipelines.train_loader(dataset.train, image_size=tuple(config.model.input_size), num_ids=s.num_ids,
                           num_instances=s.num_instances, seed=config.seed, epoch=1,
                           process_index=jax.process_index(), process_count=jax.process_count())
  except DataError as e:
    raise type(e)(f"stage2.num_ids={s.num_ids}, stage2.num_instances={s.num_instances}: {e}") from None
  m = config.model
  if not m.baseline and config.stage1.batch_size > len(dataset.train):  # an epoch would hold no full batch
    raise ConfigError(f"stage1.batch_size: {config.stage1.batch_size} is more than the {len(dataset.train)} training "
                      f"images; expected at most {len(dataset.train)}")
  check_sie_ids(dataset, m.sie_camera, m.sie_view, dataset.num_train_cams, dataset.num_train_views)
  # The official code accepts it too: one row added to every image (SIE is ViT-only).
  if m.sie_view and m.backbone.startswith("ViT") and dataset.num_train_views <= 1:
    log.warning("model.sie_view: %s has no view labels (one view), so the view embedding is the same for every "
                "image; views are labelled in VeRi-776", dataset.name)
  check_valid_queries(dataset)
  check_test_files(dataset)


def check_test_files(dataset) -> None:
  """Query and gallery images are first read by the evaluation after training (the stage-1 bank reads the training
  images before): a missing or empty file among them is found now, with one stat per image, not after the run.
  The stats run in threads: 94k of them one after another take minutes on a network filesystem."""
  from clipreid_jax.data import images  # pylint: disable=g-import-not-at-top
  paths = [split.path(i) for split in (dataset.query, dataset.gallery)
           if split.images is None for i in range(len(split))]  # a pack holds the bytes (checked when prepared)
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    for _ in pool.map(images.check_file, paths):  # the first bad file in order raises
      pass


def check_valid_queries(dataset) -> None:
  """The protocol skips queries without a gallery match from another camera; with none left there is nothing to
  evaluate. Found before training, not after it."""
  from clipreid_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  if dataset.name == "vehicleid":  # its galleries are drawn per trial; the loader checks the identities
    return
  q, g = dataset.query, dataset.gallery
  if metrics.num_valid_queries(q.pids, g.pids, q.camids, g.camids) == 0:
    raise DataError(f"{dataset.name}: no query has a gallery image of its identity from another camera; expected "
                    "at least one (the evaluation protocol drops same-identity same-camera gallery images; in a "
                    "custom set without cameras, a query's own copy in the gallery)")


def check_sie_fits(cfg: clipreid.ReIDConfig, dataset, model_name: str, dataset_name: str,
                   error: type[Exception] = ConfigError) -> None:
  """A trained SIE model on a dataset (evaluation, pictures): the dataset must have as many cameras as its table
  (ids in range are not enough: camera 2 of another set of cameras is not the camera the row was trained on)."""
  if not cfg.sie_rows:
    return
  if cfg.sie_camera and dataset.num_train_cams != cfg.camera_num:
    raise error(f"{model_name} has an SIE table for {cfg.camera_num} cameras, but {dataset_name} has "
                f"{dataset.num_train_cams}; expected the same cameras")
  if cfg.sie_view and dataset.num_train_views != cfg.view_num:  # every image would take view row 0
    raise error(f"{model_name} has an SIE table for {cfg.view_num} views, but {dataset_name} has "
                f"{dataset.num_train_views}; expected the same views (VeRi's come from its keypoint files, "
                "dataset.keypoint_dir)")
  check_sie_ids(dataset, cfg.sie_camera, cfg.sie_view, cfg.camera_num, cfg.view_num)


def check_sie_ids(dataset, sie_camera: bool, sie_view: bool, camera_num: int, view_num: int) -> None:
  """With SIE, every camera (view) id of every split must have a row of the table, which has one per camera (view)
  of the training split, as in the official code. JAX clamps an out-of-range index instead of failing, so two
  cameras would silently share a row."""
  if (sie_camera or sie_view) and dataset.name == "vehicleid":
    raise DataError("vehicleid: SIE needs camera (view) ids, and VehicleID has none (its query/gallery camera marks "
                    "only keep the same-camera filter off); expected a model without SIE (the :sie_olp recipe uses "
                    "OLP alone on VehicleID, the paper's row)")
  for on, field, word, num in ((sie_camera, "camids", "camera", camera_num), (sie_view, "viewids", "view", view_num)):
    if not on:
      continue
    for name in ("train", "query", "gallery"):
      ids = getattr(getattr(dataset, name), field)
      bad = np.unique(ids[(ids < 0) | (ids >= num)])
      if bad.size:
        have = np.unique(getattr(dataset.train, field))
        listed = ", ".join(map(str, have[:8])) + (", ..." if have.size > 8 else "")
        gaps = (f"; the training split's {word} ids are {listed}: a subset that leaves out {word}s must renumber "
                f"them 0..{have.size - 1}" if have.size and have[-1] >= have.size else "")
        raise DataError(f"{dataset.name}: {name} {word} id {', '.join(map(str, bad[:5]))} is outside the SIE table "
                        f"(rows 0..{num - 1}, one per {word} of the training split, as in the official code); with "
                        f"SIE every {word} must occur in train, numbered 0..{num - 1}{gaps}")


# --------------------------------------------------------------------------------------------------
# Model.


def check_init_stage1(config, workdir: str) -> None:
  """init.stage1's source, unless the workdir holds its copy already: a restart goes on from that (the source may
  be gone: a sweep's run could not resume once the run it started from was deleted)."""
  source = config.init.stage1
  if not source or (pathlib.Path(workdir) / "stage1").is_dir():
    return
  expected = ("the stage1/ directory of a finished stage 1 (WORKDIR/stage1), not a trained model (WORKDIR/model) or "
              "a converted checkpoint (init.clip fine-tunes those)")
  if not pathlib.Path(source).is_dir():
    raise ConfigError(f"init.stage1: {source}: not found; expected {expected}")
  try:
    meta = checkpoints.read_config(source)
  except checkpoints.CheckpointError:
    meta = {}
  # A trained model/ or a converted checkpoint is a CLIP-ReID model too, but its image side was fine-tuned:
  # stage 2 would start from it. Directories saved before `trained` was recorded are known by their name.
  after_stage1 = meta.get("trained", "stage1" if pathlib.Path(source).name == "stage1" else None) == "stage1"
  _need(meta.get("kind") == "clipreid" and after_stage1, "init.stage1", source, expected)
  # What the settings alone decide, checked here so that --dry_run sees it too (the run compares the whole model
  # once the data is read: load_stage1).
  m, reid = config.model, meta.get("reid") or {}
  ours = {"image_size": list(m.input_size), "prompt_tokens": m.prompt_tokens, "sie_camera": m.sie_camera,
          "sie_view": m.sie_view, "prompt_noun": prompt_noun(config)}
  if m.backbone.startswith("ViT"):
    ours["clip.vision_stride"] = m.stride
  theirs = {k: (reid.get("clip") or {}).get(k[5:]) if k.startswith("clip.") else reid.get(k) for k in ours}
  diff = [f"{k}: {theirs[k]!r} there, {ours[k]!r} here" for k in ours if theirs[k] is not None and theirs[k] != ours[k]]
  if diff:
    raise ConfigError(f"init.stage1: {source}: holds a stage-1 model of another configuration (differs in "
                      f"{'; '.join(diff)}); expected the stage1/ of a run with this run's model settings")


def check_init_clip(config) -> str:
  """The kind of model init.clip holds ('clip', or 'clipreid' to fine-tune), checked against model.backbone from its
  config.json alone, before any weight is read."""
  try:
    found = checkpoints.read_config(config.init.clip)
  except checkpoints.CheckpointError as e:
    raise ConfigError(f"init.clip: {e}") from None
  kind = found.get("kind")
  if kind not in ("clip", "clipreid"):
    raise ConfigError(f"init.clip: {config.init.clip} holds a model of kind {kind!r}; expected a converted CLIP "
                      "directory (kind 'clip', from python -m clipreid_jax.convert clip) or a CLIP-ReID model "
                      "directory (kind 'clipreid')")
  try:
    clip_cfg = CLIPConfig.from_dict(found["clip"] if kind == "clip" else found["reid"]["clip"])
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise ConfigError(f"init.clip: {config.init.clip}/config.json: not a usable {kind} configuration "
                      f"({type(e).__name__})") from None
  if clip_cfg.is_vit != config.model.backbone.startswith("ViT"):
    what = "CLIP" if kind == "clip" else "CLIP-ReID model"
    raise ConfigError(f"init.clip: {config.init.clip} holds a {'ViT' if clip_cfg.is_vit else 'ResNet'} {what}, "
                      f"but model.backbone is {config.model.backbone!r}")
  return kind


@functools.partial(jax.jit, static_argnums=0)
def _random_clip(cfg: CLIPConfig, rng) -> dict:
  """A random CLIP's variables, compiled once per configuration (see clipreid.init_variables)."""
  h, w = cfg.input_size()
  return CLIP(cfg).init(rng, jnp.zeros((1, h, w, 3)), jnp.zeros((1, 4), jnp.int32))


def build_model(config, dataset) -> tuple[clipreid.CLIPReID, dict]:
  """CLIP-ReID initialised from a converted CLIP directory, from a CLIP-ReID model's encoders (fine-tuning it on
  this dataset), or from a random CLIP (demo, tests)."""
  m = config.model
  if config.init.clip:
    if check_init_clip(config) == "clipreid":  # its encoders, fine-tuned on this dataset
      try:
        source, source_vars = clipreid.load_clipreid(config.init.clip)
      except checkpoints.CheckpointError as e:
        raise ConfigError(f"init.clip: {e}") from None
      clip_cfg = source.config.clip
      make = functools.partial(clipreid.from_clipreid, source.config, source_vars)
    else:
      clip_model, clip_vars = load_clip(config.init.clip)
      clip_cfg = clip_model.config
      make = functools.partial(clipreid.from_clip, clip_cfg, clip_vars)
    if clip_cfg.name != m.backbone:  # the name only picks the family (loss weights, normalisation); say which ran
      log.warning("model.backbone is %r but init.clip %s holds %s: training %s", m.backbone, config.init.clip,
                  clip_cfg.name, clip_cfg.name)
  elif rc := _random_clip_sizes(m):
    vit = m.backbone.startswith("ViT")
    patch = re.fullmatch(r"ViT-\w+-(\d+)", m.backbone)  # ViT-L-14: patch 14
    patch = int(patch.group(1)) if patch else 16
    clip_cfg = CLIPConfig(embed_dim=rc["embed_dim"], vision_layers=rc["vision_layers"] if vit else
                          tuple(rc["vision_layers"]), vision_width=rc["vision_width"], vision_patch_size=patch,
                          vision_stride=patch, text_width=rc["text_width"], text_heads=max(1, rc["text_width"] // 64),
                          text_layers=rc["text_layers"], vision_grid=(4, 4) if vit else (2, 2))
    clip_vars = _random_clip(clip_cfg, jax.random.PRNGKey(config.seed + 1))
    make = functools.partial(clipreid.from_clip, clip_cfg, jax.tree.map(np.asarray, clip_vars))
  else:
    raise ConfigError("init.clip: expected a converted CLIP directory (python -m clipreid_jax.convert clip ...)")
  try:
    return make(num_classes=dataset.num_train_pids, input_size=tuple(m.input_size), stride=m.stride,
                sie_camera=m.sie_camera, sie_view=m.sie_view, camera_num=max(dataset.num_train_cams, 1),
                view_num=max(dataset.num_train_views, 1), sie_coe=m.sie_coe, dataset=config.dataset.name,
                with_text=not m.baseline, prompt_tokens=m.prompt_tokens, rng=jax.random.PRNGKey(config.seed),
                dtype=compute_dtype(m.dtype), prompt_noun=prompt_noun(config))
  except clipreid.GeometryError as e:  # its message starts with the argument, a model.* key here
    raise ConfigError(f"model.{e}") from None
  except checkpoints.CheckpointError as e:
    raise ConfigError(f"init.clip: {config.init.clip}: {e}") from None


# --------------------------------------------------------------------------------------------------
# Feature extraction over a loader (stage-1 bank, evaluation).


def extract_features(mesh, feature_fn, variables, loader) -> tuple[np.ndarray, np.ndarray]:
  """Features of every valid plan entry, in plan order: (features, record indices).

  `feature_fn` is a jitted `steps.make_feature_fn`; callers keep one per model so repeated evaluations
  (periodic, final, untrained) compile it once.
  """
  feats, idx, valid = [], [], []
  for batch in iter(loader):
    # Each row's record index and mask travel with its image: where the mesh does not order the devices by host,
    # a global row is not at the plan's position (the rows of host h are where its devices sit).
    g = to_global(mesh, {"image": batch["image"], "camid": batch["camid"], "viewid": batch["viewid"],
                         "index": batch["index"].astype(np.int32), "mask": batch["mask"]})
    feats.append(feature_fn(variables, g))
    idx.append(g["index"])
    valid.append(g["mask"])
  feats, idx, valid = (np.concatenate([to_host(x) for x in xs]) for xs in (feats, idx, valid))
  return feats[valid], idx[valid].astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Stages.


def stage1_solver(config) -> optim.Stage1Solver:
  s = config.stage1
  return optim.Stage1Solver(base_lr=s.base_lr, weight_decay=s.weight_decay, max_epochs=s.max_epochs,
                            warmup_lr_init=s.warmup_lr_init, lr_min=s.lr_min, warmup_epochs=s.warmup_epochs)


def stage2_solver(config) -> optim.Stage2Solver:
  s = config.stage2
  return optim.Stage2Solver(base_lr=s.base_lr, weight_decay=s.weight_decay, steps=tuple(s.steps),
                            warmup_factor=s.warmup_factor, weight_decay_bias=s.weight_decay_bias,
                            bias_lr_factor=s.bias_lr_factor, warmup_iters=s.warmup_iters,
                            warmup_method=s.warmup_method, gamma=s.gamma, max_epochs=s.max_epochs)


def loss_weights(config) -> losses.LossWeights:
  lw = config.loss
  default = losses.LossWeights.for_config(config.model.backbone)
  return losses.LossWeights(id=default.id if lw.id_weight is None else lw.id_weight, triplet=lw.triplet_weight,
                            i2t=lw.i2t_weight, label_smoothing=lw.label_smoothing, margin=lw.margin)


def stage2_optimizer(config, model, steps_per_epoch):
  """The stage-2 optimizer of `config` (the baseline's for a model without a text side)."""
  make = optim.stage2_optimizer if model.config.with_text else optim.baseline_optimizer
  return make(stage2_solver(config), steps_per_epoch)


def stage2_step(config, model, tx):
  """`step(state, batch, rng)` of stage 2 with the config's losses and augmentation (not yet jitted)."""
  a = config.augment
  return steps.make_stage2_step(model, tx, loss_weights(config), erase_prob=a.erase_prob, flip_prob=a.flip_prob,
                                padding=a.padding)


def run_stage1(config, run: Run, mesh, model, variables, dataset, meta: dict) -> dict:
  """Prompt learning on the cached image-feature bank. Returns the updated parameters."""
  s = config.stage1
  n = len(dataset.train)
  steps_per_epoch = -(-n // s.batch_size)
  solver = stage1_solver(config)
  tx = optim.stage1_optimizer(solver, steps_per_epoch)
  t0 = time.time()
  # The bank is built in batches of stage 1's size, as the official code does (its stage-1 loader), rounded up to the
  # devices: eval.batch_size may change between restarts, and with it the features' float rounding.
  devices = jax.device_count()
  loader = pipelines.stage1_loader(dataset.train, image_size=model.config.input_size,
                                   batch_size=-(-s.batch_size // devices) * devices,
                                   process_index=jax.process_index(), process_count=jax.process_count())
  feats, idx = extract_features(mesh, jax.jit(steps.make_feature_fn(model, "stage1")), variables, loader)
  labels = np.asarray(dataset.train.pids)[idx].astype(np.int32)
  bank = replicate(mesh, {"feature": jnp.asarray(feats), "label": jnp.asarray(labels)})
  log.info("stage 1: feature bank of %d images in %.1fs", n, time.time() - t0)

  state = steps.create_state(variables["params"], variables["batch_stats"], tx)
  start = 1
  if meta.get("stage") == 1:
    state = run.restore_state(state, mesh)
    start = meta["epoch"] + 1
  state = replicate(mesh, state)
  epoch_fn = jax.jit(steps.make_stage1_epoch(model, tx, s.batch_size), donate_argnums=0)
  key = jax.random.PRNGKey(config.seed)
  lr = solver.schedule()
  for epoch in range(start, s.max_epochs + 1):
    t = time.time()
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), n)
    state, metrics = epoch_fn(state, bank["feature"], bank["label"], perm)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    # One compiled call per epoch: a bad step shows in the epoch means (nan and inf propagate).
    check_finite(f"stage 1 epoch {epoch} (steps {(epoch - 1) * steps_per_epoch + 1}-{epoch * steps_per_epoch})",
                 metrics, run)
    run.log_metrics({"stage": 1, "epoch": epoch, "lr": float(lr(epoch)), "time_s": time.time() - t, **metrics})
    if epoch % s.log_every_epochs == 0 or epoch == s.max_epochs:
      log.info("stage 1 epoch %d/%d: loss %.4f lr %.2e", epoch, s.max_epochs, metrics["loss"], lr(epoch))
    stop = run.stop_agreed()
    if epoch % s.checkpoint_every_epochs == 0 or epoch == s.max_epochs or stop:
      run.save(epoch, state, {"stage": 1, "epoch": epoch})
    if stop:
      run.exit_preempted(f"stage 1 epoch {epoch}")
  run.wait()  # a stage's last checkpoint is on disk before the next stage starts
  params = jax.device_get(state.params)
  return {"params": params, "batch_stats": variables["batch_stats"]}


def mid_epoch_position(meta: dict) -> int | None:
  """Batches of the interrupted epoch that a pre-empted stage-2 run had consumed (None: it stopped between epochs).

  A checkpoint records the number (`next_batch`). Those of earlier versions recorded grain's iterator state,
  whose form depends on the number of worker processes: `{"next_index": n}` without workers, and per-worker
  positions (their sum is n) with them; they resume too.
  """
  if meta.get("next_batch") is not None:
    return int(meta["next_batch"])
  state = meta.get("iterator")
  if state is None:
    return None
  if "next_index" in state:
    return int(state["next_index"])
  return sum(int(s["next_index"]) for s in state["iterators_in_use_states"])


def run_stage2(config, run: Run, mesh, model, variables, dataset, meta: dict, evaluate_fn) -> dict:
  """The image side with ID + triplet (+ i2t) losses on PK batches. Returns the final variables."""
  s = config.stage2
  # PK epochs differ in length; the plan of every epoch is known in advance, so the lr schedule changes
  # exactly at each epoch's first step, as the official per-epoch scheduler does.
  epoch_lengths = [sampler.pk_epoch_plan(dataset.train.pids, num_ids=s.num_ids,
                                         num_instances=s.num_instances, seed=config.seed,
                                         epoch=e).shape[0] for e in range(1, s.max_epochs + 1)]
  baseline = not model.config.with_text
  solver = stage2_solver(config)
  tx = stage2_optimizer(config, model, epoch_lengths)
  text = None if baseline else steps.text_features_all(model, variables["params"])
  state = steps.create_state(variables["params"], variables["batch_stats"], tx, text)
  # Checkpoint counters grow through both stages: stage-1 epochs first, then stage-2 steps.
  offset = config.stage1.max_epochs if not baseline else 0
  start, resume_at, resume_sums = 1, None, None
  if meta.get("stage") == 2:
    state = run.restore_state(state, mesh)
    start = meta["epoch"] + 1
    resume_at = mid_epoch_position(meta)  # stopped mid-epoch (pre-emption): continue that epoch
    resume_sums = meta.get("sums")
  state = replicate(mesh, state)
  done = int(jax.device_get(state.step))  # optimizer steps so far, counted on the host (no sync per step)
  # The loop holds the state's leaves, not the state: a step call then rebuilds no pytree (steps.loop_step).
  treedef, leaves = jax.tree.structure(state), jax.tree.leaves(state)
  del state
  current = lambda: jax.tree.unflatten(treedef, leaves)
  step = steps.loop_step(stage2_step(config, model, tx), treedef)
  # The step's randomness is fold_in(key, optimizer step) (steps.loop_step), so a resumed run draws the same. (Not
  # epoch * steps_per_epoch + count: PK epochs differ in length, and two steps would share their draws.)
  key = jax.random.PRNGKey(config.seed + 2)
  lr = solver.schedule()
  counter = lambda: offset + 1 + done
  unchecked = []  # (epoch, step in epoch, optimizer step, metrics) not yet checked for non-finite values

  def check_steps():
    for e, c, g, m in jax.device_get(unchecked):
      check_finite(f"stage 2 epoch {e} step {c} (optimizer step {g})", m, run)
    unchecked.clear()

  # The process's first step call compiles the step (synchronously): images/s leaves that time out, time_s not.
  compiled, epoch_compile_s = False, 0.0
  for epoch in range(start, s.max_epochs + 1):
    t = time.time()
    loader = pipelines.train_loader(dataset.train, image_size=model.config.input_size, num_ids=s.num_ids,
                                    num_instances=s.num_instances, seed=config.seed, epoch=epoch,
                                    process_index=jax.process_index(), process_count=jax.process_count(),
                                    worker_count=config.data_workers)
    sums, count = None, 0
    if resume_at is not None:
      count = resume_at
      sums = None if resume_sums is None else {k: jnp.asarray(v, jnp.float32) for k, v in resume_sums.items()}
      resume_at = None
    first = count
    batches = prefetch.prefetch(loader.iterator(start=count),
                                lambda b: to_global(mesh, {k: b[k] for k in ("image", "pid", "camid", "viewid")}),
                                depth=config.prefetch_batches)
    bar = tqdm.tqdm(batches, total=len(loader), initial=count, desc=f"stage 2 epoch {epoch}", unit="step",
                    leave=False, disable=jax.process_index() != 0 or not sys.stderr.isatty())
    for g in bar:
      t_call = time.time()
      leaves, metrics = step(leaves, g, key)
      if not compiled:
        compiled, epoch_compile_s = True, time.time() - t_call
      sums = metrics if sums is None else steps.add_metrics(sums, metrics)
      count += 1
      done += 1
      unchecked.append((epoch, count, done, metrics))
      if count % config.log_every_steps == 0:
        check_steps()
        m = {k: float(v) / count for k, v in jax.device_get(sums).items()}
        log.info("stage 2 epoch %d step %d/%d: loss %.4f", epoch, count, len(loader), m["loss"])
      # One host stops at the next step; several agree on it every log_every_steps steps (a collective).
      check_stop = jax.process_count() == 1 or count % config.log_every_steps == 0
      # PK epochs differ in length: compare with this epoch's own (`len(loader)`).
      if check_stop and run.stop_agreed() and count < len(loader):
        check_steps()  # never save a non-finite state
        # The batches consumed, not the loader's position: it runs ahead by the prefetch depth.
        run.save(counter(), current(), {"stage": 2, "epoch": epoch - 1, "next_batch": count,
                                    "sums": {k: float(v) for k, v in jax.device_get(sums).items()}})
        run.exit_preempted(f"stage 2 epoch {epoch} at step {count}")
    check_steps()
    m = {k: float(v) / max(count, 1) for k, v in jax.device_get(sums).items()}
    elapsed = time.time() - t
    record = {"stage": 2, "epoch": epoch, "lr": float(lr(epoch)), "time_s": elapsed,  # compilation included
              "images_per_s": (count - first) * s.num_ids * s.num_instances / max(elapsed - epoch_compile_s, 1e-9),
              **m}
    epoch_compile_s = 0.0
    log.info("stage 2 epoch %d/%d: loss %.4f (id %.3f+%.3f tri %.3f+%.3f+%.3f%s) acc %.3f lr %.2e, %.0f img/s",
             epoch, s.max_epochs, m["loss"], m["id_cls"], m["id_proj"], m["tri_last"], m["tri_feat"], m["tri_proj"],
             f" i2t {m['i2t']:.3f}" if "i2t" in m else "", m["accuracy"], lr(epoch), record["images_per_s"])
    if config.eval.period and epoch % config.eval.period == 0 and epoch != s.max_epochs:
      state = current()
      res = evaluate_fn({"params": state.params, "batch_stats": state.batch_stats})
      record.update({f"eval_{k}": v for k, v in res.items()})
      log.info("stage 2 epoch %d/%d evaluation: %s", epoch, s.max_epochs, format_metrics(res))
    run.log_metrics(record)
    stop = run.stop_agreed()
    if epoch % config.checkpoint_every_epochs == 0 or epoch == s.max_epochs or stop:
      run.save(counter(), current(), {"stage": 2, "epoch": epoch})
    if stop:
      run.exit_preempted(f"stage 2 epoch {epoch}")
  run.wait()
  state = current()
  return {"params": jax.device_get(state.params), "batch_stats": jax.device_get(state.batch_stats)}


# --------------------------------------------------------------------------------------------------
# Evaluation.


def evaluate_model(config, mesh, model, variables, dataset, feature_fn=None) -> dict:
  """mAP / CMC (and mINP) of `variables` on the dataset's query and gallery, official protocol.

  `feature_fn`: a jitted `steps.make_feature_fn(model, "eval", flip=config.eval.flip)` to reuse across calls
  (default: a new one).
  """
  from clipreid_jax import evaluation
  check_batch("eval.batch_size", config.eval.batch_size)
  loader = pipelines.eval_loader(dataset.query, dataset.gallery, image_size=model.config.input_size,
                                 batch_size=config.eval.batch_size, process_index=jax.process_index(),
                                 process_count=jax.process_count(), worker_count=config.data_workers)
  feature_fn = feature_fn or jax.jit(steps.make_feature_fn(model, "eval", flip=config.eval.flip))
  feats, idx = extract_features(mesh, feature_fn, variables, loader)
  order = np.argsort(idx, kind="stable")
  feats = feats[order]
  nq = len(dataset.query)
  q, g = dataset.query, dataset.gallery
  e = config.eval
  rerank_args = dict(k1=e.k1, k2=e.k2, lambda_value=e.lambda_value) if e.rerank else None
  if dataset.name == "vehicleid":
    # VehicleID: 10 seeded draws of a one-image-per-identity gallery over all test images; mean (and std). The
    # images in path order: the loader's own query/gallery split (dataset.gallery_seed) must not change the draws.
    by_path = np.argsort(np.concatenate([q.relpaths, g.relpaths]), kind="stable")
    trials = evaluation.vehicleid_trials(feats[by_path], np.concatenate([q.pids, g.pids])[by_path],
                                         num_trials=e.trials, seed=config.seed, rerank_args=rerank_args)
    ms = trials.mean_std()
    return {"mAP": ms["mAP"][0], "R1": ms["r1"][0], "R5": ms["r5"][0], "R10": ms["r10"][0],
            "mAP_std": ms["mAP"][1], "R1_std": ms["r1"][1], "R5_std": ms["r5"][1], "R10_std": ms["r10"][1],
            "trials": int(e.trials)}
  if rerank_args:
    res = evaluation.evaluate_reranked(feats[:nq], feats[nq:], q.pids, g.pids, q.camids, g.camids, **rerank_args)
  else:
    res = evaluation.evaluate(feats[:nq], feats[nq:], q.pids, g.pids, q.camids, g.camids)
  return {"mAP": float(res.mAP), "mINP": float(res.mINP), "R1": res.rank(1), "R5": res.rank(5), "R10": res.rank(10),
          "num_valid_queries": int(res.num_valid_queries)}


def evaluation_record(config, model_dir: str) -> dict:
  """What an evaluation's numbers are of, kept beside them in metrics.json (eval mode's and a training run's): the
  model, the dataset (its configured name: the reader's would call synthetic data market1501, whose layout it is
  written in), the data, test-time flip and re-ranking (a rerun of a finished run may evaluate with others); for
  VehicleID the test list, trials and seed."""
  from clipreid_jax.data.registry import canonical_name  # pylint: disable=g-import-not-at-top
  d, e = config.dataset, config.eval
  dataset = canonical_name(d.name)
  record = {"checkpoint": str(pathlib.Path(model_dir).resolve()), "dataset": dataset,
            "data": str(pathlib.Path(d.get("packed_dir") or d.root).resolve()), "flip": bool(e.flip),
            "rerank": {"k1": e.k1, "k2": e.k2, "lambda_value": e.lambda_value} if e.rerank else False}
  if dataset == "vehicleid":
    record.update(test_size=d.test_size, trials=e.trials, seed=config.seed)
  return record


def percent(m: dict) -> dict:
  """metrics.json's form of a result: rates in percent (mAP, mINP, R1, R5, R10 and their spreads), counts as they are."""
  rates = {"mAP", "mINP", "R1", "R5", "R10"}
  # Rounded: a float32 rate read as a double would print 20.000000298023224.
  return {k: (round(100 * v, 4) if k in rates or k[:-4] in rates and k.endswith("_std") else v) for k, v in m.items()}


def format_metrics(m: dict) -> str:
  parts = [f"{k} {100 * m[k]:.1f}" + (f" ± {100 * m[k + '_std']:.1f}" if k + "_std" in m else "")
           for k in ("mAP", "R1", "R5", "R10") if np.isfinite(m.get(k, float("nan")))]
  return "  ".join(parts)


# --------------------------------------------------------------------------------------------------
# Entry.


def train_and_evaluate(config, workdir: str) -> dict:
  # Every input is checked before the workdir is touched: values, the workdir's owner, data, batches, the CLIP.
  validate_config(config)
  check_init_stage1(config, workdir)
  use_attention(config)
  run = Run(workdir, config)
  run.catch_signals()
  try:
    run.claim()  # a workdir in use by another run: refused before its data and CLIP are read
    return _train_and_evaluate(config, run)
  except BaseException:
    run.settle()  # a checkpoint still being written lands (or its failure is logged) whatever stopped the run
    raise
  finally:
    run.release_signals()
    run.unlock()


def save_model(path: pathlib.Path, variables, model, trained: str, overwrite: bool = False) -> None:
  """stage1/ or model/ (`trained`: 'stage1' or 'stage2', recorded for init.stage1's check): written by process 0
  alone (atomically), then every process goes on together."""
  if jax.process_index() == 0:
    try:
      checkpoints.save_model_dir(path, variables, {"kind": "clipreid", "trained": trained,
                                                   "reid": model.config.to_dict()}, overwrite=overwrite)
    except (OSError, checkpoints.CheckpointError) as e:  # a full disk, a vanished mount: the checkpoints are kept
      cause = errors.describe(e) if isinstance(e, OSError) else str(e)
      raise TrainingStopped(f"{path}: cannot save ({cause}); the training checkpoints are kept, "
                            "rerun the same command once it can be written") from None
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"{path.name}/ written")


def load_stage1(path: pathlib.Path, model, data: dict | None = None) -> dict:
  """A stage1/ directory (the prompts learnt), refused in one line where it holds another model (a folder copied
  from another run: its shapes would fail deep inside flax, or match and be trained on silently) or, given this
  run's data fingerprint (`init.stage1`: another run's), where the workdir around it recorded other training
  records."""
  # Its own stage1/ (a restart) or another run's (init.stage1): the way out differs.
  key, way_out = (("init.stage1: ", "expected the stage1/ of a run with this run's model settings") if data is not None
                  else ("", "expected this run's (move it away to learn the prompts again)"))
  variables = _load_matching(path, model, f"{key}{path}: holds a stage-1 model", way_out)
  run_config = pathlib.Path(path).resolve().parent / "config.json"
  if data is not None and run_config.is_file():
    try:
      then = json.loads(run_config.read_text()).get("data", {}).get("train")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
      then = None
    if then is not None and then != data["train"]:
      then, now = record_counts(then), record_counts(data["train"])
      same = " (as many, but other file names or labels)" if then == now else ""
      raise ConfigError(f"{key}{path}: its prompts were learnt on other training records ({run_config} recorded "
                        f"{then}; this dataset has {now}{same}); expected a stage 1 of this training set")
  return variables


def _load_matching(path: pathlib.Path, model, what: str, way_out: str) -> dict:
  """The variables of a model directory, refused (ConfigError: "{what} of another configuration (differs in ...);
  {way_out}") where its model is not `model`."""
  found, variables = clipreid.load_clipreid(path)
  ours, theirs = (traverse_util.flatten_dict(c.config.to_dict(), sep=".") for c in (model, found))
  diff = [f"{k}: {theirs.get(k)!r} there, {ours[k]!r} here" for k in sorted(ours)
          if json.dumps(ours[k], default=str) != json.dumps(theirs.get(k), default=str)]
  if diff:
    raise ConfigError(f"{what} of another configuration (differs in {'; '.join(diff[:3])}); {way_out}")
  return variables


def _train(config, run: Run, mesh, model, variables, dataset, meta: dict, evaluate_fn) -> dict:
  """Stage 1 (or its stage1/), then stage 2, from where `meta` (the latest checkpoint's) says; writes model/ and
  returns its variables."""
  if meta.get("stage") == 2 and meta.get("epoch") == config.stage2.max_epochs and "next_batch" not in meta:
    log.info("the run in %s trained to its end before: its model is written and evaluated again", run.dir)
  stage1_dir = run.dir / "stage1"
  if model.config.with_text and meta.get("stage", 1) == 1:
    if stage1_dir.is_dir():
      variables = load_stage1(stage1_dir, model)
      if not meta:  # its checkpoints deleted: stage 1's records stay with its prompts
        run.resumed_at(1, config.stage1.max_epochs)
    elif config.init.stage1:  # another run's prompts: stage 2 alone (a sweep over stage-2 settings)
      variables = load_stage1(pathlib.Path(config.init.stage1), model, run.config["data"])
      log.info("stage 1: the prompts of %s (init.stage1), copied to %s", config.init.stage1, stage1_dir)
      run.create()
      save_model(stage1_dir, variables, model, "stage1")
      meta = {}
    else:
      variables = run_stage1(config, run, mesh, model, variables, dataset, meta)
      save_model(stage1_dir, variables, model, "stage1")
      meta = {}
  elif model.config.with_text and stage1_dir.is_dir():
    variables = load_stage1(stage1_dir, model)  # stage 2 resumes from its own checkpoint below
  variables = run_stage2(config, run, mesh, model, variables, dataset, meta, evaluate_fn)
  # Its last checkpoint is on disk: model/ is written atomically, and a rerun stopped by a signal from here saves it
  # and evaluates again from that checkpoint.
  run.end_training()
  save_model(run.dir / "model", variables, model, "stage2", overwrite=True)
  return variables


def _train_and_evaluate(config, run: Run) -> dict:
  dataset = load_dataset(config)
  run.use_data(dataset)
  check_data(config, dataset)
  mesh = make_mesh()
  model, variables = build_model(config, dataset)
  initial_variables = variables
  log.info("model %s, %d identities, input %s, grid %s, SIE %s/%s, %d devices", model.config.backbone,
           model.config.num_classes, model.config.input_size, model.config.clip.vision_grid, model.config.sie_camera,
           model.config.sie_view, jax.device_count())
  meta = run.resume()
  # Compiled once for every evaluation below.
  eval_features = jax.jit(steps.make_feature_fn(model, "eval", flip=config.eval.flip))
  evaluate_fn = lambda v: evaluate_model(config, mesh, model, v, dataset, eval_features)
  model_dir = run.dir / "model"
  if not meta and (model_dir / "config.json").is_file():
    # Its checkpoints were deleted after it finished (to free the disk): training again would replace its model.
    log.info("the run in %s trained to its end before and its checkpoints are gone: its model/ is evaluated again "
             "(to train again, use a new --workdir)", run.dir)
    variables = _load_matching(model_dir, model, f"{model_dir}: holds a model",
                               "expected this run's (move it away to train again)")
    run.resumed_at(2, config.stage2.max_epochs)
    run.end_training()  # nothing to train: a SIGTERM since the start stops the run now
  else:
    variables = _train(config, run, mesh, model, variables, dataset, meta, evaluate_fn)
  try:
    result = evaluate_fn(variables)
    if config.eval.untrained:  # the model as built, before stage 1 (deterministic: rebuilt from the seed)
      untrained = evaluate_fn(initial_variables)
  except errors.ImageReadError as e:  # an unreadable test image: the trained model is kept, a rerun evaluates it
    raise type(e)(f"{e} (training is finished and its model is in {model_dir}: fix the image and run the same "
                  "command again to evaluate it)") from None
  summary = {"final": percent(result), "evaluated": evaluation_record(config, model_dir)}
  if config.eval.untrained:
    summary["untrained"] = percent(untrained)
    print(f"untrained: {format_metrics(untrained)}", flush=True)
  if jax.process_index() == 0:
    outputs.write_atomic(run.dir / "metrics.json", json.dumps(summary, indent=1) + "\n")
  run.log_metrics({"final": True, "epoch": config.stage2.max_epochs, **result})
  run.close()
  print(f"final: {format_metrics(result)}", flush=True)
  return result
