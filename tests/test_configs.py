"""Every recipe file in configs/ loads, resolves and validates, with each of its variants."""
import importlib.util
import pathlib

import pytest

from clipreid_jax import config_defaults, train
from clipreid_jax.data import images

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
    config_defaults.check_keys(config)  # the keys of recipe(), no more, no fewer
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


# Spec section 4, transcribed from the official ymls (not from config_defaults): per recipe file,
# (input size, stage-1 batch, stage-1 epochs, stage-2 lr, stage-2 epochs, warmup factor, steps, weight decay,
#  label smoothing on in the clipreid yml, label smoothing on in the *_base.yml).
_PERSON_VIT = ((256, 128), 64, 120, 5e-6, 60, 0.1, (30, 50), 1e-4, True, True)  # person/vit_clipreid.yml, vit_base.yml
_PERSON_CNN = ((256, 128), 64, 60, 3.5e-4, 120, 0.01, (40, 70), 5e-4, True, True)  # person/cnn_clipreid.yml, cnn_base
OFFICIAL_YML = {
    "market1501_vit": _PERSON_VIT, "dukemtmc_vit": _PERSON_VIT, "occ_duke_vit": _PERSON_VIT, "msmt17_vit": _PERSON_VIT,
    "market1501_cnn": _PERSON_CNN, "dukemtmc_cnn": _PERSON_CNN, "occ_duke_cnn": _PERSON_CNN, "msmt17_cnn": _PERSON_CNN,
    "veri_vit": ((256, 256), 64, 60, 5e-6, 60, 0.1, (30, 50), 1e-4, True, True),  # veri/vit_prom.yml, vit_base.yml
    "veri_cnn": ((256, 256), 64, 60, 3.5e-4, 120, 0.01, (40, 70), 5e-4, True, True),  # veri/cnn_prom.yml, cnn_base.yml
    "vehicleid_vit": ((256, 256), 256, 60, 5e-5, 60, 0.1, (30, 50), 1e-4, True, False),  # VehicleID/vit_*.yml
    "vehicleid_cnn": ((256, 256), 256, 60, 3.5e-4, 120, 0.01, (40, 70), 5e-4, False, False),  # VehicleID/cnn_*.yml
}
_MEAN_STD = {"vit": ((0.5,) * 3, (0.5,) * 3), "cnn": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def _official_recipes():
  return [(p, arg) for p in CONFIGS if p.stem != "demo"
          for arg in ("clipreid", "baseline") + (("sie_olp",) if p.stem.endswith("_vit") else ())]


@pytest.mark.parametrize("path, arg", _official_recipes(), ids=lambda x: getattr(x, "stem", x))
def test_recipe_values_are_the_official_ymls(path, arg):
  size, s1_batch, s1_epochs, lr, epochs, warmup_factor, steps, wd, ls_clipreid, ls_base = OFFICIAL_YML[path.stem]
  vit = path.stem.endswith("_vit")
  c = _load(path).get_config(arg).copy_and_resolve_references()
  assert c.dataset.name == path.stem.rsplit("_", 1)[0] and c.seed == 1234  # SOLVER.SEED
  assert tuple(c.model.input_size) == size and c.model.baseline == (arg == "baseline")
  assert images.pixel_stats(c.model.backbone) == _MEAN_STD["vit" if vit else "cnn"]
  # Every yml: NUM_INSTANCE 4 of batch 64, flip and RE prob 0.5, PADDING 10, test batch 64, re-ranking 50/15/0.3.
  assert (c.stage2.num_ids, c.stage2.num_instances) == (16, 4)
  assert (c.augment.flip_prob, c.augment.padding, c.augment.erase_prob) == (0.5, 10, 0.5)
  assert (c.eval.batch_size, c.eval.k1, c.eval.k2, c.eval.lambda_value, c.eval.rerank) == (64, 50, 15, 0.3, False)
  # Stage 1 (CLIP-ReID ymls): Adam 3.5e-4, wd 1e-4, cosine with warmup 1e-5 over 5 epochs down to 1e-6.
  s1 = train.stage1_solver(c)
  assert c.stage1.batch_size == s1_batch
  assert (s1.base_lr, s1.weight_decay, s1.max_epochs, s1.warmup_lr_init, s1.lr_min, s1.warmup_epochs) == (
      3.5e-4, 1e-4, s1_epochs, 1e-5, 1e-6, 5)
  # Stage 2 (or the baseline's flat SOLVER): WEIGHT_DECAY_BIAS = WEIGHT_DECAY, BIAS_LR_FACTOR 2, WARMUP_ITERS 10.
  s2 = train.stage2_solver(c)
  assert (s2.base_lr, s2.max_epochs, s2.warmup_factor, s2.steps, s2.weight_decay) == (
      lr, epochs, warmup_factor, steps, wd)
  assert (s2.bias_weight_decay, s2.bias_lr_factor, s2.warmup_iters, s2.warmup_method, s2.gamma) == (
      wd, 2.0, 10, "linear", 0.1)
  # WarmupMultiStepLR at epoch start: warmup(e) x 0.1^(milestones <= e); the bias group at twice the lr.
  for e in (1, 5, 10, steps[0], steps[1], epochs):
    warm = warmup_factor * (1 - e / 10) + e / 10 if e < 10 else 1.0
    want = lr * warm * 0.1 ** sum(m <= e for m in steps)
    assert s2.schedule()(e) == pytest.approx(want, rel=1e-9), e
    assert s2.schedule("bias")(e) == pytest.approx(2 * want, rel=1e-9), e
  # Losses: ID weight 0.25 only for ViT CLIP-ReID (vit_base.yml has 1.0), triplet margin 0.3, smoothing 0.1.
  w = train.loss_weights(c)
  smooth = ls_base if arg == "baseline" else ls_clipreid
  assert (w.id, w.triplet, w.i2t, w.margin) == (0.25 if vit and arg != "baseline" else 1.0, 1.0, 1.0, 0.3)
  assert w.label_smoothing == (0.1 if smooth else 0.0)
  # SIE + OLP (README section "Recipes", spec section 4): stride 12 and SIE_COE 1.0; SIE on the camera, on camera x
  # view for VeRi (its released checkpoint), and none for VehicleID (one training camera: OLP only, the paper's row).
  dataset = c.dataset.name
  if arg == "sie_olp":
    assert (c.model.stride, c.model.sie_coe) == (12, 1.0)
    assert (c.model.sie_camera, c.model.sie_view) == (dataset != "vehicleid", dataset == "veri")
  else:
    assert (c.model.stride, c.model.sie_camera, c.model.sie_view) == (16, False, False)  # SIE off in every yml


def test_solvers_and_loss_weights_carry_every_config_value():
  # Distinct values, so a field dropped or swapped on the way to the solver shows (the ymls have wd == wd_bias).
  c = config_defaults.official("market1501", config_defaults.VIT)
  c.stage2.update(base_lr=1.5, weight_decay=0.25, weight_decay_bias=0.75, bias_lr_factor=3.0, max_epochs=7,
                  steps=(2, 5), gamma=0.5, warmup_factor=0.2, warmup_iters=3, warmup_method="constant")
  c.stage1.update(base_lr=2.5, weight_decay=0.125, max_epochs=9, warmup_lr_init=0.01, lr_min=0.001, warmup_epochs=2)
  c.loss.update(id_weight=0.4, triplet_weight=0.6, i2t_weight=0.7, label_smoothing=0.05, margin=0.9)
  s2, s1, w = train.stage2_solver(c), train.stage1_solver(c), train.loss_weights(c)
  assert (s2.base_lr, s2.weight_decay, s2.bias_weight_decay, s2.bias_lr_factor, s2.max_epochs, s2.steps, s2.gamma,
          s2.warmup_factor, s2.warmup_iters, s2.warmup_method) == (1.5, 0.25, 0.75, 3.0, 7, (2, 5), 0.5, 0.2, 3,
                                                                   "constant")
  assert (s1.base_lr, s1.weight_decay, s1.max_epochs, s1.warmup_lr_init, s1.lr_min, s1.warmup_epochs) == (
      2.5, 0.125, 9, 0.01, 0.001, 2)
  assert (w.id, w.triplet, w.i2t, w.label_smoothing, w.margin) == (0.4, 0.6, 0.7, 0.05, 0.9)


def test_check_keys_takes_a_section_set_to_none():
  """`c.model.random_clip = None` (a config that gives init.clip) stands for the section's keys; a misspelt key below
  a section is named with the nearest known one."""
  c = config_defaults.recipe("market1501")
  c.model.random_clip = None
  config_defaults.check_keys(c)
  c = config_defaults.recipe("market1501")
  c.model.random_clip.embed_dimm = 64
  with pytest.raises(ValueError, match=r"^unknown key model.random_clip.embed_dimm \(did you mean "
                     r"model.random_clip.embed_dim\?\)"):
    config_defaults.check_keys(c)


def test_check_keys_allows_a_synthetic_config_run_on_a_real_dataset():
  """The demo's synthetic-data sizes (dataset.num_train_ids, ...) stay allowed when `--config.dataset.name` points
  the config at a real dataset; a key that no recipe has is still refused."""
  c = config_defaults.recipe("synthetic")
  c.dataset.name = "market1501"
  config_defaults.check_keys(c)
  c.dataset.num_train_idz = 3
  with pytest.raises(ValueError, match=r"^unknown key dataset.num_train_idz \(did you mean dataset.num_train_ids\?\)"):
    config_defaults.check_keys(c)
