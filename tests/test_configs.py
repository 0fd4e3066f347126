"""Every recipe file in configs/ loads, resolves and validates, with each of its variants."""
import importlib.util
import pathlib

import pytest

from clipreid_jax import config_defaults, train

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py"))
EXPECTED = {f"{d}_{b}" for d in ("market1501", "msmt17", "dukemtmc", "occ_duke", "veri", "vehicleid")
            for b in ("vit", "cnn")} | {"demo"}


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_one_file_per_official_recipe():
  assert {p.stem for p in CONFIGS} == EXPECTED


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_loads_and_validates(path):
  mod = _load(path)
  assert "python -m clipreid_jax.main --config configs/" in mod.__doc__  # the docstring gives the command
  variants = [None] if path.stem == "demo" else [None, "clipreid", "baseline"] + (["sie_olp"] if "vit" in path.stem else [])
  for arg in variants:
    config = mod.get_config() if arg is None else mod.get_config(arg)
    if path.stem != "demo":  # recipes start from a converted CLIP, named on the command line (their docstrings)
      with pytest.raises(train.ConfigError, match=r"^init.clip: expected a converted CLIP directory"):
        train.validate_config(config)  # was a ZeroDivisionError traceback in the model's constructor
      config.init.clip = "converted/vit"
    train.validate_config(config)
    resolved = config.copy_and_resolve_references()
    assert resolved.model.backbone in (config_defaults.VIT, config_defaults.RN50)
    if path.stem != "demo":
      dataset = path.stem.rsplit("_", 1)[0]
      assert resolved.dataset.name == dataset
      assert ("paper:" in mod.__doc__) and (arg is None or arg == "clipreid" or f":{arg}" in mod.__doc__)
      # ID loss weight: 0.25 in the official vit_clipreid.yml files, 1.0 in every vit_base.yml and cnn_*.yml.
      vit_clipreid = "vit" in path.stem and arg != "baseline"
      assert resolved.loss.id_weight == (0.25 if vit_clipreid else 1.0), (path.stem, arg)
  if "cnn" in path.stem:
    with pytest.raises(ValueError, match="ViT-only"):
      mod.get_config("sie_olp")
