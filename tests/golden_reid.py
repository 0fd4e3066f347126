"""Helpers for the CLIP-ReID golden cases: discovery, conversion through the CLI, official-name lookup."""
import json
import pathlib

import numpy as np

from conftest import golden_root


def variants() -> list[pathlib.Path]:
  """Every golden model variant: a folder with meta.json + model_state.* under any architecture dir."""
  root = golden_root()
  out = []
  for arch in sorted(p for p in root.iterdir() if p.is_dir()):
    for v in sorted(p for p in arch.iterdir() if p.is_dir() and (p / "meta.json").is_file()):
      out.append(v)
  return out


def meta(variant: pathlib.Path) -> dict:
  return json.loads((variant / "meta.json").read_text())


def convert_args(variant: pathlib.Path, dst) -> list[str]:
  """CLI arguments that convert the variant's official state dict (the .pth where shipped, else .npz)."""
  m = meta(variant)
  src = variant / "model_state.pth"
  if not src.is_file():
    src = variant / "model_state.npz"
  args = ["clipreid", str(src), str(dst), "--input_size", *map(str, m["SIZE_TRAIN"]),
          "--stride", str(m["STRIDE_SIZE"][0]), "--dataset", m["DATASETS.NAMES"], "--sie_coe", str(m["SIE_COE"])]
  if m["SIE_CAMERA"] or m["SIE_VIEW"]:
    mode = "camera_view" if (m["SIE_CAMERA"] and m["SIE_VIEW"]) else ("camera" if m["SIE_CAMERA"] else "view")
    args += ["--sie", mode, "--camera_num", str(m["camera_num"]), "--view_num", str(m["view_num"])]
  return args


def sie_inputs(variant: pathlib.Path, inputs) -> tuple:
  m = meta(variant)
  cams = np.asarray(inputs["cam_ids"], np.int32) if m["SIE_CAMERA"] else None
  views = np.asarray(inputs["view_ids"], np.int32) if m["SIE_VIEW"] else None
  return cams, views


def close(x, ref, rtol, atol) -> tuple[bool, float]:
  """|x - ref| <= rtol * max|ref| + atol over the whole array (the golden README's rule)."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  err = float(np.max(np.abs(x - ref))) if ref.size else 0.0
  bound = rtol * float(np.max(np.abs(ref))) + atol if ref.size else atol
  return err <= bound, err / max(bound, 1e-300)


def converted_loader(tmp_path_factory):
  """`get(variant) -> (model, variables)`: each variant converted once through `convert clipreid`, then cached."""
  from clipreid_jax import convert
  from clipreid_jax.models import clipreid
  cache = {}

  def get(variant):
    if variant not in cache:
      dst = tmp_path_factory.mktemp(variant.name) / "model"
      assert convert.main(convert_args(variant, dst)) == 0
      cache[variant] = clipreid.load_clipreid(dst)
    return cache[variant]
  return get
