"""Converts PyTorch checkpoints into Flax model directories, and CLIP-ReID models back.

  python -m clipreid_jax.convert clip SRC DST [--input_size H W] [--stride S] [--trust] [--overwrite]
  python -m clipreid_jax.convert clipreid SRC.pth DST [...]
  python -m clipreid_jax.convert export MODEL_DIR DST.pth [--overwrite]

`clip` reads an OpenAI CLIP file and infers the architecture from tensor shapes (as OpenAI's
`build_model` does); `clipreid` reads a released CLIP-ReID / baseline checkpoint. DST gets
`config.json` + `variables/` (see `clipreid_jax.checkpoints`). `export` writes a model directory as the
official code's state dict (what its test.py and trackers load). Errors are one line naming the file,
exit code 2, and nothing is written to DST.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import pathlib
import re
import sys
from typing import Callable, Optional

import numpy as np
from flax import traverse_util

from clipreid_jax.checkpoints import CheckpointError, save_model_dir
from clipreid_jax.data.errors import describe, warnings_as_lines
from clipreid_jax.models.clip import CLIPConfig
from clipreid_jax.outputs import atomic_file, check_writable
from clipreid_jax.state_dicts import read_state_dict

# --------------------------------------------------------------------------------------------------
# Positional-embedding resize, equal to torch's F.interpolate(bilinear, align_corners=False), no antialias.


def _bilinear_axis(in_size: int, out_size: int):
  """Source indices and weights along one axis, as torch's CPU kernel computes them.

  The scale is float32, the source coordinate is computed in double and rounded to float32.
  """
  scale = np.float64(np.float32(in_size) / np.float32(out_size))
  src = (scale * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0))
  i0 = src.astype(np.int64)
  i1 = i0 + (i0 < in_size - 1)
  l1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
  return i0, i1, np.float32(1) - l1, l1


def resize_grid(grid: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of an (H, W, C) array to out_hw (float32 arithmetic, result in the input dtype).

  Equal to torch's F.interpolate(mode='bilinear', align_corners=False) to within 1-2 float32 ulp
  (torch's vectorised kernel rounds in a slightly different order).
  """
  h, w, _ = grid.shape
  if (h, w) == tuple(out_hw):
    return grid.copy()
  g = grid.astype(np.float32)
  h0, h1, a0, a1 = _bilinear_axis(h, out_hw[0])
  w0, w1, b0, b1 = _bilinear_axis(w, out_hw[1])
  a0, a1 = a0[:, None, None], a1[:, None, None]
  b0, b1 = b0[None, :, None], b1[None, :, None]
  out = ((a0 * b0) * g[h0][:, w0] + (a0 * b1) * g[h0][:, w1]
         + (a1 * b0) * g[h1][:, w0] + (a1 * b1) * g[h1][:, w1])
  return out.astype(grid.dtype)


def resize_pos_embed(posemb: np.ndarray, out_hw: tuple[int, int], in_hw: Optional[tuple[int, int]] = None) -> np.ndarray:
  """Resizes a (1 + h*w, C) table: row 0 (class / mean token) kept, the grid resized bilinearly."""
  n, c = posemb.shape
  if in_hw is None:
    g = int(round((n - 1) ** 0.5))
    if g * g != n - 1:
      raise ValueError(f"positional embedding with {n - 1} grid rows is not square; give its grid")
    in_hw = (g, g)
  grid = posemb[1:].reshape(in_hw[0], in_hw[1], c)
  return np.concatenate([posemb[:1], resize_grid(grid, out_hw).reshape(-1, c)], axis=0)


# --------------------------------------------------------------------------------------------------
# Architecture inference.


def _count(sd: dict, pattern: str) -> int:
  rx = re.compile(pattern)
  return len({m.group(1) for k in sd for m in [rx.match(k)] if m})


def tensor_shape(sd: dict, key: str, ndim: int, layout: str) -> tuple[int, ...]:
  """Shape of sd[key], checked to have `ndim` non-zero dims before sizes are read from it (a wrong rank would
  otherwise give an IndexError, or a model built from a data dimension: a 1-D conv1.weight asked for TiBs)."""
  shape = tuple(np.shape(sd[key]))
  if len(shape) != ndim or 0 in shape:
    raise CheckpointError(f"tensor {key!r} has shape {shape}, expected a non-empty {ndim}-D tensor {layout}")
  return shape


def _grid_rows(sd: dict, key: str, square: bool) -> int:
  """Token-grid rows of a (1 + grid, width) positional table; `square`: the grid must be g x g (OpenAI's)."""
  shape = tensor_shape(sd, key, 2, "(1 + grid tokens, width)")
  n = shape[0] - 1
  if n < 1:
    raise CheckpointError(f"tensor {key!r} has shape {shape}: a class row but no token-grid rows")
  if square and math.isqrt(n) ** 2 != n:
    raise CheckpointError(f"tensor {key!r} has shape {shape}: its {n} grid rows do not form a square token grid "
                          "(OpenAI's build_model knows only square grids)")
  return n


def infer_clip_config(sd: dict, prefix: str = "", *, vision_prefix: str = "visual.", text_prefix: Optional[str] = "",
                      token_embedding_key: str = "token_embedding.weight", square_grid: bool = True) -> CLIPConfig:
  """Sizes of a CLIP model from its state dict (OpenAI's `build_model` rules).

  `text_prefix=None`: a vision-only state dict (CLIP-ReID's baseline): the embedding width comes from the image
  projection and the text sizes keep CLIPConfig's defaults (no text tower is built from them).
  `square_grid=False`: a non-square image grid is returned as (n, 1) for the caller to reshape (a ReID checkpoint,
  whose grid follows from its input size); otherwise it is refused. Raises CheckpointError without the file name.
  """
  v = prefix + vision_prefix
  try:
    if text_prefix is None:
      common = dict(embed_dim=tensor_shape(sd, v + "proj", 2, "(width, embed_dim)")[1] if v + "proj" in sd else
                    tensor_shape(sd, v + "attnpool.c_proj.weight", 2, "(embed_dim, width)")[0])
    else:
      t = prefix + text_prefix
      text_width = tensor_shape(sd, t + "ln_final.weight", 1, "(text_width,)")[0]
      common = dict(
          embed_dim=tensor_shape(sd, t + "text_projection", 2, "(text_width, embed_dim)")[1],
          context_length=tensor_shape(sd, t + "positional_embedding", 2, "(context_length, text_width)")[0],
          vocab_size=(tensor_shape(sd, token_embedding_key, 2, "(vocab_size, text_width)")[0]
                      if token_embedding_key in sd else 49408),
          text_width=text_width, text_heads=text_width // 64,
          text_layers=_count(sd, re.escape(t) + r"transformer\.resblocks\.(\d+)\."))
    if v + "proj" in sd:
      conv = tensor_shape(sd, v + "conv1.weight", 4, "(width, 3, patch, patch)")
      n = _grid_rows(sd, v + "positional_embedding", square_grid)
      g = math.isqrt(n)
      return CLIPConfig(vision_layers=_count(sd, re.escape(v) + r"transformer\.resblocks\.(\d+)\."),
                        vision_width=conv[0], vision_patch_size=conv[-1], vision_stride=conv[-1],
                        vision_grid=(g, g) if g * g == n else (n, 1), **common)
    if v + "attnpool.positional_embedding" in sd:
      layers = tuple(_count(sd, re.escape(v) + rf"layer{b}\.(\d+)\.") for b in (1, 2, 3, 4))
      n = _grid_rows(sd, v + "attnpool.positional_embedding", square_grid)
      g = math.isqrt(n)
      return CLIPConfig(vision_layers=layers,
                        vision_width=tensor_shape(sd, v + "layer1.0.conv1.weight", 4, "(width, in, kh, kw)")[0],
                        vision_grid=(g, g) if g * g == n else (n, 1), **common)
  except KeyError as e:
    raise CheckpointError(f"unknown architecture: missing tensor {e.args[0]!r}, not a CLIP state dict") from None
  raise CheckpointError(f"no '{v}proj' (ViT) or '{v}attnpool.positional_embedding' (ResNet): unknown architecture")


# --------------------------------------------------------------------------------------------------
# Name mapping: OpenAI / official CLIP-ReID state-dict keys -> (collection, Flax path, layout transform).

Transform = Callable[[np.ndarray], np.ndarray]
_IDENT: Transform = lambda a: a
_LINEAR: Transform = lambda a: a.T  # torch (out, in) -> flax (in, out)
_CONV: Transform = lambda a: a.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)


def _leaf(name: str, arr: np.ndarray) -> tuple[str, str, Transform]:
  """Maps the last part of a torch key to (collection, flax leaf, transform)."""
  if name == "weight":
    if arr.ndim == 4:
      return "params", "kernel", _CONV
    if arr.ndim == 2:
      return "params", "kernel", _LINEAR
    return "params", "scale", _IDENT  # LayerNorm / BatchNorm weight
  if name == "bias":
    return "params", "bias", _IDENT
  if name == "running_mean":
    return "batch_stats", "mean", _IDENT
  if name == "running_var":
    return "batch_stats", "var", _IDENT
  return "params", name, _IDENT


_MODULE_RENAMES = [
    (re.compile(r"resblocks\.(\d+)"), r"resblocks_\1"),
    (re.compile(r"layer(\d)\.(\d+)"), r"layer\1_\2"),
    (re.compile(r"downsample\.0"), "downsample_conv"),
    (re.compile(r"downsample\.1"), "downsample_bn"),
]


def map_key(key: str, arr: np.ndarray, top_renames: dict[str, str]) -> Optional[tuple[str, tuple[str, ...], Transform]]:
  """(collection, path, transform) for a torch key, or None for entries that carry no state."""
  if key.endswith("num_batches_tracked"):
    return None
  for src, dst in top_renames.items():
    if key == src or key.startswith(src + "."):
      key = dst + key[len(src):]
      break
  if key.endswith("attn.in_proj_weight"):
    key = key[:-len("in_proj_weight")] + "in_proj.weight"
  elif key.endswith("attn.in_proj_bias"):
    key = key[:-len("in_proj_bias")] + "in_proj.bias"
  for rx, repl in _MODULE_RENAMES:
    key = rx.sub(repl, key)
  *modules, last = key.split(".")
  if modules and modules[-1] == "token_embedding" and last == "weight":
    return "params", (*modules, "embedding"), _IDENT
  collection, leaf, fn = _leaf(last, arr)
  return collection, (*modules, leaf), fn


_MODULE_NAMES_BACK = [
    (re.compile(r"resblocks_(\d+)"), r"resblocks.\1"),
    (re.compile(r"layer(\d)_(\d+)"), r"layer\1.\2"),
    (re.compile(r"downsample_conv"), "downsample.0"),
    (re.compile(r"downsample_bn"), "downsample.1"),
]


def torch_entry(collection: str, path: tuple[str, ...], value: np.ndarray) -> tuple[str, np.ndarray]:
  """The inverse of `map_key` (no top-level renames): a Flax leaf as a torch state-dict (key, tensor)."""
  *modules, leaf = path
  module = ".".join(modules)
  for rx, repl in _MODULE_NAMES_BACK:
    module = rx.sub(repl, module)
  if collection == "batch_stats":
    leaf = {"mean": "running_mean", "var": "running_var"}[leaf]
  elif leaf == "kernel":
    leaf, value = "weight", (value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T)
  elif leaf in ("scale", "embedding"):
    leaf = "weight"
  key = f"{module}.{leaf}" if module else leaf
  if module.endswith("attn.in_proj"):  # nn.MultiheadAttention keeps its packed q,k,v projection as two tensors
    key = f"{module}_{leaf}"
  return key, np.array(value, order="C")


def torch_state_dict(variables: dict) -> dict[str, np.ndarray]:
  """A state dict as PyTorch modules of the same names hold it: every tensor of `variables` under its torch key,
  plus each BatchNorm's `num_batches_tracked` (0: Flax keeps no count; it matters only for momentum None)."""
  sd = {}
  for (collection, *path), value in traverse_util.flatten_dict(variables).items():
    key, array = torch_entry(collection, tuple(path), np.asarray(value))
    sd[key] = array
    if collection == "batch_stats" and path[-1] == "mean":
      sd[key[:-len("running_mean")] + "num_batches_tracked"] = np.zeros((), np.int64)
  return sd


def check_torch_destination(dst: str | os.PathLike, overwrite: bool = False) -> pathlib.Path:
  """`dst` resolved, where a state dict may be written there (checked before the work that makes it)."""
  dst = pathlib.Path(dst).resolve()
  if dst.suffix.lower() not in (".pth", ".pt"):
    raise CheckpointError(f"{dst}: expected a .pth or .pt file name (torch.save's state dict)")
  if dst.is_dir():
    raise CheckpointError(f"{dst}: is a folder; expected a .pth file name")
  if dst.exists() and not overwrite:
    raise CheckpointError(f"{dst}: already exists; choose a new file name or pass --overwrite")
  check_writable(dst.parent, str(dst), CheckpointError)
  return dst


def save_torch_state_dict(dst: str | os.PathLike, sd: dict[str, np.ndarray], overwrite: bool = False) -> pathlib.Path:
  """Writes `sd` with torch.save as a .pth/.pt file, atomically (a partial file never takes `dst`'s name)."""
  dst = check_torch_destination(dst, overwrite)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError(f"{dst}: writing a .pth needs PyTorch: pip install -e '.[convert]'") from None
  try:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(dst) as stage:
      torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, str(stage))
  except (OSError, RuntimeError) as e:  # a full disk; torch.save reports failed writes as RuntimeError
    raise CheckpointError(f"{dst}: cannot write ({describe(e)})") from None
  return dst


def convert_state_dict(sd: dict[str, np.ndarray], top_renames: dict[str, str]) -> dict:
  """Builds the Flax variables {collection: nested dict} from a state dict, casting floats to float32."""
  variables: dict = {}
  for key, arr in sd.items():
    mapped = map_key(key, arr, top_renames)
    if mapped is None:
      continue
    collection, path, fn = mapped
    value = fn(np.asarray(arr))
    if np.issubdtype(value.dtype, np.floating):
      value = value.astype(np.float32)
    node = variables.setdefault(collection, {})
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.array(value, order="C")  # ascontiguousarray would make 0-d arrays 1-d
  return variables


CLIP_RENAMES = {"transformer": "text.transformer", "positional_embedding": "text.positional_embedding",
                "ln_final": "text.ln_final", "text_projection": "text.text_projection"}


def clip_variables(sd: dict[str, np.ndarray], cfg: CLIPConfig, *, grid: Optional[tuple[int, int]] = None) -> tuple[CLIPConfig, dict]:
  """Flax variables of `CLIP(cfg)` from an OpenAI state dict; resizes the image positional table to `grid`."""
  import dataclasses
  sd = dict(sd)
  if grid is not None and tuple(grid) != tuple(cfg.vision_grid):
    key = "visual.positional_embedding" if cfg.is_vit else "visual.attnpool.positional_embedding"
    # In float32, as the trainer resizes the converted (float32) table: OpenAI's float16 table would otherwise be
    # rounded to float16 after the resize, and differ from the table of a conversion without --input_size.
    sd[key] = resize_pos_embed(np.asarray(sd[key], np.float32), tuple(grid), tuple(cfg.vision_grid))
    cfg = dataclasses.replace(cfg, vision_grid=tuple(grid), vision_grid_source=tuple(cfg.vision_grid))
  return cfg, convert_state_dict(sd, CLIP_RENAMES)


def check_variables(path: str, variables: dict, expected: dict) -> None:
  """Raises CheckpointError unless `variables` has exactly the structure and shapes of `expected`."""
  import jax
  got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(variables)}
  want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  if missing or extra:
    raise CheckpointError(f"{path}: tensors do not fit the inferred architecture (missing {missing[:3]}, unexpected {extra[:3]})")
  for k in want:
    if got[k] != want[k]:
      raise CheckpointError(f"{path}: {k} has shape {got[k]}, the inferred architecture needs {want[k]}")


def grid_for(cfg: CLIPConfig, input_size: tuple[int, int], stride: Optional[int]) -> tuple[int, int]:
  """Token grid for an input size: (L - patch) // stride + 1 for a ViT (CLIP-ReID's OLP formula)."""
  h, w = input_size
  if cfg.is_vit:
    s, p = stride or cfg.vision_patch_size, cfg.vision_patch_size
    return ((h - p) // s + 1, (w - p) // s + 1)
  down = grid_unit(cfg)
  return (h // down, w // down)


_EXPECTED = {"input_size": "a positive height and width, at least one patch", "stride": "a positive stride",
             "camera_num": "a positive count", "view_num": "a positive count"}


def check_options(**options) -> None:
  """Raises ValueError naming the command-line option of a given input size, stride or count below 1.

  Checked up front because 0 would otherwise read as "not given" or divide by zero in `grid_for`.
  """
  for name, value in options.items():
    values = () if value is None else tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if any(x < 1 for x in values):
      raise ValueError(f"--{name} {' '.join(map(str, values))}: expected {_EXPECTED[name]}")


def grid_unit(cfg: CLIPConfig) -> int:
  """The pixels of one token: a ViT's patch, or a cell of the ResNet's output grid (its total downsampling)."""
  return cfg.vision_patch_size if cfg.is_vit else (32 if cfg.resnet_last_stride == 2 else 16)


def check_grid(src, cfg: CLIPConfig, input_size: tuple[int, int], grid: tuple[int, int]) -> None:
  """Refuses an input size below one patch (ResNet: one output cell), which would give a model with no tokens."""
  if min(grid) >= 1:
    return
  unit = grid_unit(cfg)
  what = "patch" if cfg.is_vit else "cell of the ResNet's output grid"
  raise CheckpointError(f"{src}: --input_size {input_size[0]} {input_size[1]} is smaller than one {unit}x{unit} {what} "
                        f"(it would give a {grid[0]}x{grid[1]} token grid); expected H and W >= {unit}")


@contextlib.contextmanager
def naming_file(path):
  """Last resort for malformed files that the shape checks do not anticipate: an unexpected error while reading
  or inferring becomes one CheckpointError naming the file instead of a traceback."""
  try:
    yield
  except CheckpointError:
    raise
  except Exception as e:  # numpy, jax and torch raise many types for malformed data
    raise CheckpointError(f"{path}: not a usable checkpoint ({describe(e)})") from None


def convert_clip(src: str, dst: str, *, input_size=None, stride=None, resnet_last_stride: int = 2,
                 trust: bool = False, overwrite: bool = False) -> str:
  import dataclasses
  import jax
  from clipreid_jax.models.clip import CLIP
  check_options(input_size=input_size, stride=stride)
  with naming_file(src):
    sd = read_state_dict(src, trust=trust)
    try:
      cfg = infer_clip_config(sd)
    except CheckpointError as e:
      raise CheckpointError(f"{src}: {e}") from None
    if not cfg.is_vit:
      cfg = dataclasses.replace(cfg, resnet_last_stride=resnet_last_stride)
    if stride is not None:
      if not cfg.is_vit:
        raise CheckpointError(f"{src}: --stride applies to ViT checkpoints only; this is a ResNet")
      if stride > cfg.vision_patch_size:  # the trainer refuses it too: the patches would skip pixels
        raise CheckpointError(f"{src}: --stride {stride} is more than the CLIP's {cfg.vision_patch_size}-pixel patch, "
                              f"which would skip pixels; expected 1..{cfg.vision_patch_size}")
      cfg = dataclasses.replace(cfg, vision_stride=stride)
    grid = None
    if input_size:
      grid = grid_for(cfg, input_size, stride)
      check_grid(src, cfg, input_size, grid)
    cfg, variables = clip_variables(sd, cfg, grid=grid)
    model = CLIP(cfg)
    h, w = cfg.input_size()
    expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, h, w, 3), np.float32),
                                                 np.zeros((1, 4), np.int32)))
    check_variables(src, variables, expected)
  save_model_dir(dst, variables, {"kind": "clip", "clip": json_config(cfg), "source": str(src)}, overwrite=overwrite)
  return dst


def json_config(cfg: CLIPConfig) -> dict:
  import json
  return json.loads(cfg.to_json())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m clipreid_jax.convert", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="kind", required=True)
  p = sub.add_parser("clip", help="an OpenAI CLIP checkpoint (TorchScript .pt, state dict .pt/.pth, .safetensors, .npz)")
  p.add_argument("src")
  p.add_argument("dst")
  p.add_argument("--input_size", type=int, nargs=2, metavar=("H", "W"),
                 help="resize the image positional embedding for this input size (default: keep the checkpoint grid)")
  p.add_argument("--stride", type=int, help="ViT patch stride (12 = overlapping patches)")
  p.add_argument("--resnet_last_stride", type=int, default=2, choices=(1, 2))
  p.add_argument("--trust", action="store_true", help="load a TorchScript archive whose hash is not OpenAI's")
  p.add_argument("--overwrite", action="store_true", help="replace DST if it is a model directory (or an empty folder)")
  r = sub.add_parser("clipreid", help="a released CLIP-ReID or baseline checkpoint (.pth)")
  r.add_argument("src")
  r.add_argument("dst")
  r.add_argument("--overwrite", action="store_true", help="replace DST if it is a model directory (or an empty folder)")
  r.add_argument("--dataset", help="dataset the checkpoint was trained on (default: from the file name); "
                 "sets the prompt noun and the SIE table layout")
  r.add_argument("--input_size", type=int, nargs=2, metavar=("H", "W"),
                 help="training input size (default: inferred from the positional embedding)")
  r.add_argument("--stride", type=int, help="ViT patch stride (default: inferred)")
  r.add_argument("--sie", choices=("camera", "view", "camera_view"), help="SIE mode of the cv_embed table")
  r.add_argument("--camera_num", type=int, help="cameras in the training split (SIE)")
  r.add_argument("--view_num", type=int, help="views in the training split (SIE)")
  r.add_argument("--sie_coe", type=float, default=1.0, help="SIE scale (the official SIE recipe uses 1.0)")
  x = sub.add_parser("export", help="a model directory (trained or converted) as an official CLIP-ReID .pth")
  x.add_argument("src", help="a model directory: WORKDIR/model, or one written by `convert clipreid`")
  x.add_argument("dst", help="the .pth file to write")
  x.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
  args = parser.parse_args(argv)
  try:
    with warnings_as_lines():
      note = _convert(args)
  except (CheckpointError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.dst}" + (f"; the official code loads it with {note}" if note else ""))
  return 0


def _convert(args: argparse.Namespace) -> str:
  """Does the subcommand; returns what the user must know beyond the destination (export: the official settings)."""
  from clipreid_jax import official_checkpoints as official  # pylint: disable=g-import-not-at-top
  if args.kind == "clip":
    convert_clip(args.src, args.dst, input_size=args.input_size, stride=args.stride,
                 resnet_last_stride=args.resnet_last_stride, trust=args.trust, overwrite=args.overwrite)
  elif args.kind == "export":
    return official.official_settings(official.export_clipreid(args.src, args.dst, overwrite=args.overwrite))
  else:
    official.convert_clipreid(args.src, args.dst, dataset=args.dataset, input_size=args.input_size,
                              stride=args.stride, sie=args.sie, camera_num=args.camera_num,
                              view_num=args.view_num, sie_coe=args.sie_coe, overwrite=args.overwrite)
  return ""


if __name__ == "__main__":
  sys.exit(main())
