"""The official CLIP-ReID code's checkpoints: reading them into model directories (`convert clipreid`) and writing
models back in their layout (`convert export`).

Released checkpoints are plain state dicts whose keys are already the Flax model's module names
(`models/clipreid.py`); what they do not store (input size, patch stride, SIE layout, dataset) is inferred from the
tensor shapes and the file name, or given on the command line.
"""
from __future__ import annotations

import dataclasses
import pathlib
import warnings
from typing import Optional

import numpy as np

from clipreid_jax.checkpoints import CheckpointError, save_model_dir
from clipreid_jax.convert import (check_options, check_torch_destination, check_variables, convert_state_dict,
                                  grid_for, infer_clip_config, naming_file, save_torch_state_dict, tensor_shape,
                                  torch_state_dict)
from clipreid_jax.data.published import PUBLISHED
from clipreid_jax.data.registry import canonical_name
from clipreid_jax.models.clipreid import (MAX_PROMPT_TOKENS, N_CTX, ReIDConfig, eot_index_of, expected_variables,
                                          load_clipreid, prompt_noun_for)
from clipreid_jax.state_dicts import read_state_dict


# Released checkpoints store no input size; these are the official recipes' (input size, stride) pairs.
_KNOWN_GEOMETRIES = [((256, 128), 16), ((256, 128), 12), ((256, 256), 16), ((256, 256), 12)]
# Camera/view counts of the official SIE tables (train split), used to read camera x view tables.
_SIE_TABLES = {"veri": (20, 8)}
OFFICIAL_RENAMES: dict[str, str] = {}  # official keys already use our module names


def _check_identities(sd: dict, path: str, dataset: str) -> None:
  """A released checkpoint named after a dataset must have that dataset's number of training identities."""
  counts = PUBLISHED.get(dataset) or PUBLISHED.get(f"{dataset}_800") or {}
  expected, got = counts.get("num_train_pids"), int(sd["classifier.weight"].shape[0])
  if expected is not None and got != expected:
    raise CheckpointError(f"{path}: classifier has {got} identities, but {dataset} (from the file name) trains on "
                          f"{expected}; pass --dataset to name the dataset it was trained on")


def infer_reid_config(sd: dict, path: str, *, input_size=None, stride=None, dataset: Optional[str] = None,
                      sie: Optional[str] = None, camera_num: Optional[int] = None, view_num: Optional[int] = None,
                      sie_coe: float = 1.0) -> ReIDConfig:
  """Infers a ReIDConfig from an official CLIP-ReID / baseline state dict (tensor shapes + file name)."""
  check_options(input_size=input_size, stride=stride, camera_num=camera_num, view_num=view_num)
  with_text = "text_encoder.ln_final.weight" in sd
  if "classifier.weight" not in sd or not any(k.startswith("image_encoder.") for k in sd):
    raise CheckpointError(f"{path}: no 'classifier.weight' / 'image_encoder.*' tensors; not a CLIP-ReID or baseline checkpoint")
  try:
    # The ReID grid is not square; it is recomputed below from the input size and stride.
    clip_cfg = infer_clip_config(sd, vision_prefix="image_encoder.", text_prefix="text_encoder." if with_text else None,
                                 token_embedding_key="", square_grid=False)  # baseline: no text side
    num_classes = tensor_shape(sd, "classifier.weight", 2, "(identities, feature width)")[0]
    n_rows = tensor_shape(sd, "cv_embed", 2, "(SIE rows, width)")[0] if "cv_embed" in sd else 0
    ctx_key = "prompt_learner.cls_ctx"
    tokens = (tensor_shape(sd, ctx_key, 3, "(identities, prompt tokens, text width)")[1]
              if with_text and ctx_key in sd else N_CTX)
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from None
  clip_cfg = dataclasses.replace(clip_cfg, vision_stride=clip_cfg.vision_patch_size, resnet_last_stride=1)
  pos_key = "image_encoder.positional_embedding" if clip_cfg.is_vit else "image_encoder.attnpool.positional_embedding"
  rows = sd[pos_key].shape[0]
  name = pathlib.Path(path).name.lower()
  if dataset is not None:  # 'VeRi' as the official DATASETS.NAMES spells it: the SIE table lookup is by lower case
    try:
      dataset = canonical_name(dataset)
    except ValueError as e:  # a misspelt 'vehicleid' would silently give person prompts
      raise CheckpointError(f"--dataset: {e} (a dataset of your own: 'custom', person prompts)") from None
  if dataset is None:
    for cand in ("msmt17", "market1501", "occ_duke", "duke", "veri", "vehicleid"):
      if name.startswith(cand.replace("_", "")) or name.startswith(cand):
        dataset = {"duke": "dukemtmc"}.get(cand, cand)
        _check_identities(sd, path, dataset)
        break
  if input_size is None:
    geometries = [(s, st) for s, st in _KNOWN_GEOMETRIES if clip_cfg.is_vit or st == 16]
    if stride is not None:
      geometries = [(s, st) for s, st in geometries if st == stride]
    matches = [(s, st) for s, st in geometries
               if np.prod(grid_for(dataclasses.replace(clip_cfg, vision_stride=st), s, st)) + 1 == rows]
    if not matches:
      raise CheckpointError(f"{path}: {pos_key} has {rows} rows, which fits none of the official input sizes; "
                            "pass --input_size H W (and --stride)")
    input_size, stride = matches[0]
  if stride is None:  # an input size given alone: the stride whose grid fits the table (16, or OLP's 12)
    fits = [st for st in ((16, 12) if clip_cfg.is_vit else (16,)) if np.prod(grid_for(
        dataclasses.replace(clip_cfg, vision_stride=st), tuple(input_size), st if clip_cfg.is_vit else None)) + 1 == rows]
    stride = fits[0] if fits else 16
  cfg_s = dataclasses.replace(clip_cfg, vision_stride=stride if clip_cfg.is_vit else 16)
  grid = grid_for(cfg_s, tuple(input_size), stride if clip_cfg.is_vit else None)
  if int(np.prod(grid)) + 1 != rows:
    raise CheckpointError(f"{path}: {pos_key} has {rows} rows, but input {tuple(input_size)} with stride {stride} "
                          f"gives a {grid[0]}x{grid[1]} grid ({int(np.prod(grid)) + 1} rows)")
  clip_cfg = dataclasses.replace(cfg_s, vision_grid=grid)
  sie_camera = sie_view = False
  cams, views = 1, 1
  if "cv_embed" in sd:
    mode = sie or ("camera_view" if (dataset in _SIE_TABLES and n_rows == np.prod(_SIE_TABLES[dataset])) else "camera")
    sie_camera, sie_view = mode in ("camera", "camera_view"), mode in ("view", "camera_view")
    if mode == "camera_view":
      default_cams, default_views = _SIE_TABLES.get(dataset, (None, None))
      cams = default_cams if camera_num is None else camera_num
      views = default_views if view_num is None else view_num
      if cams is None or views is None:
        raise CheckpointError(f"{path}: a camera x view SIE table needs --camera_num and --view_num")
    elif mode == "camera":
      cams, views = camera_num or n_rows, view_num or 1
    else:
      cams, views = camera_num or 1, view_num or n_rows
    expected = cams * views if mode == "camera_view" else (cams if mode == "camera" else views)
    if expected != n_rows:
      raise CheckpointError(f"{path}: cv_embed has {n_rows} rows, but SIE '{mode}' with {cams} cameras and "
                            f"{views} views needs {expected}")
  elif sie in ("camera", "view", "camera_view"):
    raise CheckpointError(f"{path}: SIE '{sie}' requested, but the checkpoint has no cv_embed table")
  noun = prompt_noun_for(dataset or "")
  if tokens > MAX_PROMPT_TOKENS:
    raise CheckpointError(f"{path}: prompt_learner.cls_ctx has {tokens} tokens per identity; expected 1.."
                          f"{MAX_PROMPT_TOKENS}")
  if dataset is None:  # a renamed file: what the dataset decides was guessed (VeRi's: person prompts, 160 cameras)
    guessed = (["person prompts"] if with_text else []) + (
        [f"an SIE table of {n_rows} cameras"] if "cv_embed" in sd and sie is None else [])
    if guessed:
      warnings.warn(f"{path}: its name starts with none of the official datasets' names: read as a model of "
                    f"{' and '.join(guessed)}; pass --dataset NAME (veri or vehicleid for a vehicle "
                    "model; custom for data of your own, as guessed)", stacklevel=3)
  return ReIDConfig(clip=clip_cfg, num_classes=int(num_classes), sie_camera=sie_camera,
                    sie_view=sie_view, camera_num=int(cams), view_num=int(views), sie_coe=float(sie_coe),
                    prompt_noun=noun, with_text=with_text, eot_index=eot_index_of(noun, tokens),
                    image_size=tuple(input_size), prompt_tokens=tokens)


def convert_clipreid(src: str, dst: str, *, dataset=None, input_size=None, stride=None, sie=None,
                     camera_num=None, view_num=None, sie_coe: float = 1.0, overwrite: bool = False) -> ReIDConfig:
  """Converts an official CLIP-ReID / baseline `.pth` (or `.npz`) into a model directory."""
  check_options(input_size=input_size, stride=stride, camera_num=camera_num, view_num=view_num)
  with naming_file(src):
    sd = read_state_dict(src)
    if "cv_embed" in sd and "image_encoder.attnpool.positional_embedding" in sd:
      # The official model builds the SIE table for RN50 too but reads it only for ViT: the table changes nothing.
      if sie is not None:
        raise CheckpointError(f"{src}: --sie {sie}: SIE is ViT-only; the official RN50 model never reads cv_embed")
      warnings.warn(f"{src}: cv_embed dropped; the official RN50 model never reads it (SIE is ViT-only)", stacklevel=2)
      sd = {k: v for k, v in sd.items() if k != "cv_embed"}
    cfg = infer_reid_config(sd, src, input_size=input_size, stride=stride, dataset=dataset, sie=sie,
                            camera_num=camera_num, view_num=view_num, sie_coe=sie_coe)
    variables = convert_state_dict(sd, OFFICIAL_RENAMES)
    check_variables(src, variables, expected_variables(cfg))
  save_model_dir(dst, variables, {"kind": "clipreid", "reid": cfg.to_dict(), "source": str(src)}, overwrite=overwrite)
  return cfg


def export_clipreid(src: str | pathlib.Path, dst: str | pathlib.Path, *, overwrite: bool = False) -> ReIDConfig:
  """Writes a model directory (trained or converted) as the official code's state dict, `.pth`: the file its
  test.py (`load_param`) and the trackers built on it load. The inverse of `convert_clipreid`."""
  check_torch_destination(dst, overwrite)
  model, variables = load_clipreid(src)
  cfg = model.config
  if cfg.with_text and cfg.prompt_tokens != N_CTX:
    raise CheckpointError(f"{src}: its prompts have {cfg.prompt_tokens} learned tokens per identity; the official "
                          f"code builds {N_CTX} (model.prompt_tokens), so it could not load this model")
  save_torch_state_dict(dst, torch_state_dict(variables), overwrite=overwrite)
  return cfg


def official_settings(cfg: ReIDConfig) -> str:
  """The official config values (and dataset sizes) under which its code builds the model a state dict fits."""
  h, w = cfg.input_size
  stride = cfg.clip.vision_stride if cfg.clip.is_vit else 16
  sie = (f"MODEL.SIE_CAMERA {cfg.sie_camera}, MODEL.SIE_VIEW {cfg.sie_view}, MODEL.SIE_COE {cfg.sie_coe}, "
         if cfg.sie_rows else "")
  sizes = f"{cfg.num_classes} training identities"
  if cfg.sie_rows:
    plural = lambda n, what: f"{n} {what}" + "s" * (n != 1)
    sizes += f", {plural(cfg.camera_num, 'camera')}, {plural(cfg.view_num, 'view')}"
  return (f"MODEL.NAME {cfg.backbone}, INPUT.SIZE_TEST [{h}, {w}], MODEL.STRIDE_SIZE [{stride}, {stride}], {sie}"
          f"{'the baseline (processor.py, make_model.py)' if not cfg.with_text else 'CLIP-ReID (make_model_clipreid.py)'}"
          f", and a dataset of {sizes}")
