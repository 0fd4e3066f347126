"""CLIP-ReID model parity with the official code's outputs, through `convert clipreid`.

Data-driven over every variant folder in $CLIPREID_GOLDEN (vit/*, rn50/*, and whatever else is there):
no sizes, seeds or class counts are assumed beyond what meta.json and the arrays state.
"""

import pathlib

import chex
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipreid_jax import convert
from clipreid_jax import official_checkpoints as official
from clipreid_jax.checkpoints import CheckpointError
from clipreid_jax.models import clipreid
from golden_reid import close, convert_args, converted_loader, meta, sie_inputs, variants

VARIANTS = variants()
FWD = dict(rtol=5e-5, atol=1e-6)  # golden README section 10: forward features, logits, text features
BN = dict(rtol=1e-5, atol=1e-7)  # BN running statistics after one train forward


def test_golden_variants_present():
  assert VARIANTS, "no golden CLIP-ReID variants found"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  return converted_loader(tmp_path_factory)


def _assert_close(name, x, ref, tol):
  ok, ratio = close(x, ref, **tol)
  assert np.shape(x) == np.shape(ref), (name, np.shape(x), np.shape(ref))
  assert ok, f"{name}: error is {ratio:.2f}x the tolerance"


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v.parent.name}/{v.name}")
def test_forward_outputs(variant, converted):
  model, variables = converted(variant)
  m = meta(variant)
  cfg = model.config
  assert cfg.num_classes == m["num_classes"]
  assert tuple(cfg.clip.vision_grid) == tuple(m["grid_hw"]) and cfg.input_size == tuple(m["SIZE_TRAIN"])
  inputs, ref = np.load(variant / "inputs.npz"), np.load(variant / "outputs.npz")
  x = inputs["images"].transpose(0, 2, 3, 1)
  labels = inputs["labels"].astype(np.int32)
  cams, views = sie_inputs(variant, inputs)
  got = {
      "get_image_feature": model.apply(variables, x, method=model.stage1_feature),
      "eval_feature": model.apply(variables, x, cams, views, method=model.eval_feature),
      "text_features_all": model.apply(variables, jnp.arange(cfg.num_classes), method=model.text_features),
      "text_features_batch": model.apply(variables, labels, method=model.text_features),
  }
  train_out, updates = model.apply(variables, x, cams, views, train=True, mutable=["batch_stats"])
  got.update(train_out)
  got["train_return_img_feature_proj"] = train_out["img_feature_proj"]
  got["stage2_i2t_logits"] = train_out["img_feature_proj"] @ got["text_features_all"].T
  # Every golden output is compared here, but the losses (tests/test_losses.py) and the batch statistics (below).
  outputs = {k for k in ref.files if not k.startswith(("stage1_loss", "stage2_loss", "stage2_id_loss", "stage2_tri_",
                                                       "stage2_i2t_loss", "bn_after_train_forward/"))}
  assert outputs <= set(got), f"golden outputs not compared: {sorted(outputs - set(got))}"
  for name in outputs:
    _assert_close(name, got[name], ref[name], FWD)
  # Every running statistic a training forward updates (the BNNecks; RN50's image encoder too), found by the
  # converter's own name mapping; PyTorch's num_batches_tracked has no Flax counterpart.
  stats = {k[len("bn_after_train_forward/"):]: ref[k] for k in ref.files
           if k.startswith("bn_after_train_forward/") and not k.endswith("num_batches_tracked")}
  assert {"bottleneck.running_mean", "bottleneck_proj.running_var"} <= set(stats)
  if variant.parent.name == "rn50":
    assert sum(k.startswith("image_encoder.") for k in stats) >= 40, sorted(stats)
  wanted = traverse_util.flatten_dict(convert.convert_state_dict(stats, official.OFFICIAL_RENAMES)["batch_stats"])
  ours = traverse_util.flatten_dict(updates["batch_stats"])
  assert len(wanted) == len(stats) and set(wanted) <= set(ours), sorted(set(wanted) - set(ours))
  for path, value in wanted.items():
    _assert_close("bn_after_train_forward/" + "/".join(path), ours[path], value, BN)
  assert got["eval_feature"].shape[1] == cfg.feature_dim + cfg.clip.embed_dim


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v.parent.name}/{v.name}")
def test_text_prefix_truncation_equals_full_context(variant, converted):
  model, variables = converted(variant)
  labels = jnp.arange(model.config.num_classes)
  short = model.apply(variables, labels, method=model.text_features)
  full = model.apply(variables, labels, full_context=True, method=model.text_features)
  _assert_close("truncated text features", short, full, FWD)


def test_from_clip_matches_official_construction(tmp_path):
  """Building from the golden tiny CLIP reproduces the official model's converted CLIP parts."""
  for variant in VARIANTS:
    m = meta(variant)
    clip_dir = tmp_path / f"clip_{variant.parent.name}"
    if not clip_dir.exists():
      assert convert.main(["clip", str(variant.parent / "clip_openai_layout.npz"), str(clip_dir)]) == 0
    from clipreid_jax.models.clip import load_clip
    clip_model, clip_vars = load_clip(clip_dir)
    model, variables = clipreid.from_clip(
        clip_model.config, clip_vars, num_classes=m["num_classes"], input_size=tuple(m["SIZE_TRAIN"]),
        stride=m["STRIDE_SIZE"][0], sie_camera=m["SIE_CAMERA"], sie_view=m["SIE_VIEW"],
        camera_num=m["camera_num"], view_num=m["view_num"], sie_coe=m["SIE_COE"], dataset=m["DATASETS.NAMES"])
    state = np.load(variant / "model_state.npz")
    params = variables["params"]
    pos = params["image_encoder"]["positional_embedding"] if model.config.clip.is_vit else \
        params["image_encoder"]["attnpool"]["positional_embedding"]
    key = ("image_encoder.positional_embedding" if model.config.clip.is_vit
           else "image_encoder.attnpool.positional_embedding")
    np.testing.assert_allclose(pos, state[key], rtol=0, atol=2 * np.finfo(np.float32).eps * np.abs(state[key]).max())
    np.testing.assert_array_equal(params["prompt_learner"]["token_prefix"], state["prompt_learner.token_prefix"])
    np.testing.assert_array_equal(params["prompt_learner"]["token_suffix"], state["prompt_learner.token_suffix"])
    np.testing.assert_array_equal(params["text_encoder"]["text_projection"], state["text_encoder.text_projection"])
    assert params["prompt_learner"]["cls_ctx"].shape == state["prompt_learner.cls_ctx"].shape
    assert np.all(params["bottleneck"]["bias"] == 0) and np.all(params["bottleneck"]["scale"] == 1)
    assert abs(float(np.std(params["classifier"]["kernel"])) - 0.001) < 0.0005
    if "cv_embed" in params:  # timm's trunc_normal_(std=.02) cuts at +-2, i.e. 100 std: in effect N(0, 0.02^2)
      sie = np.asarray(params["cv_embed"])
      assert sie.shape == state["cv_embed"].shape and abs(float(np.std(sie)) - 0.02) < 0.003
      assert np.abs(sie).max() > 0.045  # flax's truncated_normal(0.02) stops at 2 std, 0.04
    assert model.config.eot_index == 11
    # the configuration alone (what benchmarks/aot_report.py compiles from, without weights) is the built model's
    assert clipreid.reid_config(
        clip_model.config, num_classes=m["num_classes"], input_size=tuple(m["SIZE_TRAIN"]),
        stride=m["STRIDE_SIZE"][0], sie_camera=m["SIE_CAMERA"], sie_view=m["SIE_VIEW"], camera_num=m["camera_num"],
        view_num=m["view_num"], sie_coe=m["SIE_COE"], dataset=m["DATASETS.NAMES"]) == model.config
    assert jax.tree.map(lambda x: (x.shape, x.dtype), clipreid.expected_variables(model.config)) == jax.tree.map(
        lambda x: (x.shape, x.dtype), variables)


def test_inference_from_tensors_official_names(tmp_path):
  """Released checkpoints: geometry, SIE table, classes and text width come from the tensors alone."""
  variant = next(v for v in VARIANTS if (v / "model_state.npz").is_file())
  sd = dict(np.load(variant / "model_state.npz"))
  m = meta(variant)
  with pytest.warns(UserWarning, match="x.pth: its name starts with none of the official datasets' names"):
    cfg = official.infer_reid_config(sd, "x.pth", input_size=tuple(m["SIZE_TRAIN"]), stride=m["STRIDE_SIZE"][0])
  assert cfg.num_classes == sd["classifier.weight"].shape[0]
  assert cfg.clip.text_width == sd["text_encoder.ln_final.weight"].shape[0]
  # A full-size ViT-B/16 person checkpoint with a 15-row camera table (MSMT17 SIE+OLP), built from shapes.
  shapes = {"image_encoder.proj": (768, 512), "image_encoder.conv1.weight": (768, 3, 16, 16),
            "image_encoder.positional_embedding": (211, 768), "classifier.weight": (1041, 768),
            "cv_embed": (15, 768), "image_encoder.transformer.resblocks.0.attn.in_proj_weight": (2304, 768),
            "text_encoder.ln_final.weight": (512,), "text_encoder.text_projection": (512, 512),
            "text_encoder.positional_embedding": (77, 512), "text_encoder.transformer.resblocks.0.ln_1.weight": (512,)}
  fake = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  cfg = official.infer_reid_config(fake, "MSMT17_clipreid_12x12sie_ViT-B-16_60.pth")
  assert cfg.input_size == (256, 128) and tuple(cfg.clip.vision_grid) == (21, 10)
  assert cfg.clip.vision_stride == 12 and cfg.num_classes == 1041 and cfg.sie_camera and cfg.camera_num == 15
  assert cfg.prompt_noun == "person"
  fake["image_encoder.positional_embedding"] = np.zeros((442, 768), np.float32)
  fake["cv_embed"] = np.zeros((160, 768), np.float32)
  fake["classifier.weight"] = np.zeros((576, 768), np.float32)
  cfg = official.infer_reid_config(fake, "VeRi_clipreid_12x12sie_ViT-B-16_60.pth")
  assert tuple(cfg.clip.vision_grid) == (21, 21) and cfg.prompt_noun == "vehicle"
  assert (cfg.sie_camera, cfg.sie_view, cfg.camera_num, cfg.view_num) == (True, True, 20, 8)
  # A name the registry does not know is refused: a misspelt vehicle set would get person prompts.
  with pytest.raises(CheckpointError, match=r"--dataset: unknown dataset 'vehcileid'; known: .*vehicleid"):
    official.infer_reid_config(fake, "trained.pth", dataset="vehcileid", input_size=(256, 256), stride=12)
  # --dataset as the official DATASETS.NAMES spells it: the camera x view table is still recognised.
  cfg = official.infer_reid_config(fake, "trained.pth", dataset="VeRi", input_size=(256, 256), stride=12)
  assert (cfg.sie_camera, cfg.sie_view, cfg.camera_num, cfg.view_num) == (True, True, 20, 8)
  # A file named after a dataset whose identity count it contradicts: one line naming both numbers.
  fake["classifier.weight"] = np.zeros((751, 768), np.float32)
  with pytest.raises(CheckpointError, match="751 identities.*veri.*576"):
    official.infer_reid_config(fake, "VeRi_clipreid_12x12sie_ViT-B-16_60.pth")
  assert official.infer_reid_config(fake, "VeRi_clipreid_12x12sie_ViT-B-16_60.pth", dataset="veri").num_classes == 751


def test_convert_bad_inputs(tmp_path, capsys):
  variant = next(v for v in VARIANTS if (v / "model_state.npz").is_file())
  sd = dict(np.load(variant / "model_state.npz"))
  m = meta(variant)
  size = [str(s) for s in m["SIZE_TRAIN"]]
  clip_file = variant.parent / "clip_openai_layout.npz"
  # Another architecture: an OpenAI CLIP file is not a CLIP-ReID checkpoint.
  assert convert.main(["clipreid", str(clip_file), str(tmp_path / "a")]) == 2
  assert "not a CLIP-ReID" in capsys.readouterr().err
  # A geometry that contradicts the tensors names both values.
  src = tmp_path / "state.npz"
  np.savez(src, **sd)
  assert convert.main(["clipreid", str(src), str(tmp_path / "b"), "--input_size", "512", "512", "--stride", "16"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "rows" in err and "512" in err
  # An SIE table that contradicts the requested cameras (a ViT's: RN50 never reads the table, see below).
  variant = next(v for v in VARIANTS if v.parent.name == "vit" and (v / "model_state.npz").is_file())
  sd, m = dict(np.load(variant / "model_state.npz")), meta(variant)
  size = [str(s) for s in m["SIZE_TRAIN"]]
  sd_sie = dict(sd, cv_embed=np.zeros((6, sd["classifier.weight"].shape[1]), np.float32))
  np.savez(tmp_path / "sie.npz", **sd_sie)
  assert convert.main(["clipreid", str(tmp_path / "sie.npz"), str(tmp_path / "c"), "--input_size", *size,
                       "--stride", str(m["STRIDE_SIZE"][0]), "--sie", "camera", "--camera_num", "4"]) == 2
  err = capsys.readouterr().err
  assert "6 rows" in err and "4 cameras" in err
  for d in "abc":
    assert not (tmp_path / d).exists()


# (command, options, words the error must contain): sizes, strides and counts below 1 are refused by name,
# not read as "not given" (0) or turned into a model without image tokens.
BAD_OPTIONS = [
    ("clip", ["--input_size", "0", "0"], "--input_size 0 0: expected a positive height and width, at least one patch"),
    ("clip", ["--input_size", "8", "8"], "--input_size 8 8 is smaller than one"),  # patch (ViT) / output cell (ResNet)
    ("clip", ["--input_size", "-16", "64"], "--input_size -16 64: expected a positive"),
    ("clip", ["--stride", "0"], "--stride 0: expected a positive stride"),
    ("clip", ["--stride", "-4"], "--stride -4: expected a positive stride"),
    ("clipreid", ["--input_size", "64", "32", "--stride", "0"], "--stride 0: expected a positive stride"),
    ("clipreid", ["--input_size", "64", "32", "--sie", "camera_view", "--camera_num", "0", "--view_num", "0"],
     "--camera_num 0: expected a positive count"),
]


@pytest.mark.parametrize("kind,options,expected", BAD_OPTIONS, ids=[f"{k} {' '.join(o)}" for k, o, _ in BAD_OPTIONS])
def test_convert_bad_options(tmp_path, capsys, kind, options, expected):
  variant = next(v for v in VARIANTS if (v / "model_state.npz").is_file())
  src = variant / "model_state.npz" if kind == "clipreid" else variant.parent / "clip_openai_layout.npz"
  assert convert.main([kind, str(src), str(tmp_path / "out"), *options]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
  assert not (tmp_path / "out").exists()


def test_loading_wrong_kind_fails(tmp_path):
  variant = VARIANTS[0]
  assert convert.main(["clip", str(variant.parent / "clip_openai_layout.npz"), str(tmp_path / "clip")]) == 0
  with pytest.raises(CheckpointError, match="kind 'clip'"):
    clipreid.load_clipreid(tmp_path / "clip")


@pytest.mark.parametrize("edit,expected", [
    (lambda meta: [1, 2], "expected a JSON object, got list"),
    (lambda meta: {k: v for k, v in meta.items() if k != "reid"}, "not a usable CLIP-ReID configuration"),
    (lambda meta: {**meta, "reid": {**meta["reid"], "foo": 1}}, "not a usable CLIP-ReID configuration"),
    (lambda meta: {**meta, "reid": {**meta["reid"], "image_size": [128, 64]}}, "gives a 8x4 token grid"),
    (lambda meta: {**meta, "reid": {**meta["reid"], "clip": {**meta["reid"]["clip"], "vision_width": 256}}},
     "has shape"),
])
def test_loading_a_config_that_does_not_fit_fails(tmp_path, edit, expected):
  """A model directory whose config.json is valid JSON but not a configuration, or not the saved tensors' (it used
  to fail with a traceback, some only inside the first forward pass)."""
  import json  # pylint: disable=g-import-not-at-top
  variant = next(v for v in VARIANTS if v.parent.name == "vit")
  model_dir = tmp_path / "model"
  assert convert.main(convert_args(variant, model_dir)) == 0
  meta = json.loads((model_dir / "config.json").read_text())
  (model_dir / "config.json").write_text(json.dumps(edit(meta)))
  with pytest.raises(CheckpointError, match=expected) as err:
    clipreid.load_clipreid(model_dir)
  assert str(model_dir) in str(err.value) and "\n" not in str(err.value)


def test_from_clip_refuses_a_grid_resized_for_another_geometry(tmp_path):
  """The official code resizes OpenAI's square positional table once. A CLIP converted with --input_size for one
  geometry and trained at another would be resized twice (silently different): refused, naming both grids."""
  from clipreid_jax.models.clip import load_clip  # pylint: disable=g-import-not-at-top
  variant = next(v for v in VARIANTS if v.parent.name == "vit")
  src = str(variant.parent / "clip_openai_layout.npz")
  assert convert.main(["clip", src, str(tmp_path / "c"), "--input_size", "64", "32"]) == 0
  clip_model, clip_vars = load_clip(tmp_path / "c")
  kw = dict(num_classes=5, input_size=(64, 32), dataset="market1501")
  clipreid.from_clip(clip_model.config, clip_vars, stride=16, **kw)  # the geometry it was converted for
  with pytest.raises(CheckpointError, match="4x2 token grid .* needs 5x2"):
    clipreid.from_clip(clip_model.config, clip_vars, stride=12, **kw)
  # A square grid resized for another geometry (a vehicle conversion reused for persons) is refused as well: the
  # conversion records OpenAI's grid it came from.
  assert convert.main(["clip", src, str(tmp_path / "sq"), "--input_size", "96", "96"]) == 0
  sq_model, sq_vars = load_clip(tmp_path / "sq")
  assert sq_model.config.vision_grid == (6, 6) and sq_model.config.vision_grid_source == (4, 4)
  clipreid.from_clip(sq_model.config, sq_vars, stride=16, **{**kw, "input_size": (96, 96)})
  with pytest.raises(CheckpointError, match="6x6 token grid .* needs 4x2"):
    clipreid.from_clip(sq_model.config, sq_vars, stride=16, **kw)
  # OpenAI's own table (converted without --input_size) is resized to any geometry, once.
  assert convert.main(["clip", src, str(tmp_path / "own")]) == 0
  own_model, own_vars = load_clip(tmp_path / "own")
  assert own_model.config.vision_grid_source == ()
  model, _ = clipreid.from_clip(own_model.config, own_vars, stride=12, **kw)
  assert model.config.clip.vision_grid == (5, 2) and model.config.clip.vision_grid_source == ()


def test_prompt_noun_follows_the_registry_aliases():
  """The prompt's noun is the official one for every spelling the dataset registry reads: 'VeRi-776' loads VeRi and
  must learn vehicle prompts (the official code uses 'vehicle' for VeRi and VehicleID only)."""
  for name in ("veri", "VeRi", "veri776", "VeRi-776", "vehicleid", "VehicleID"):
    assert clipreid.prompt_noun_for(name) == "vehicle", name
  for name in ("market1501", "Market-1501", "msmt17", "dukemtmc", "occ_duke", "custom", "synthetic", "my_data"):
    assert clipreid.prompt_noun_for(name) == "person", name


def test_evaluation_features_are_float32_with_bfloat16_compute(converted):
  """Training computes in bfloat16 on accelerators; its evaluations, like the official (no autocast) and eval mode
  (which loads float32), compute the test feature in float32."""
  from clipreid_jax import steps  # pylint: disable=g-import-not-at-top
  variant = next(v for v in VARIANTS if v.parent.name == "vit")
  model, variables = converted(variant)
  h, w = model.config.input_size
  batch = {"image": np.random.default_rng(0).integers(0, 256, (2, h, w, 3), dtype=np.uint8),
           "camid": np.zeros(2, np.int32), "viewid": np.zeros(2, np.int32)}
  bf16 = steps.make_feature_fn(model.clone(dtype=jnp.bfloat16), "eval")(variables, batch)
  fp32 = steps.make_feature_fn(model, "eval")(variables, batch)
  assert bf16.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(bf16), np.asarray(fp32))


def _product_precisions(fn, *args) -> list:
  """The precision of every matmul and convolution `fn` traces, nested calls (custom_vjp, jit) included."""
  import jax  # pylint: disable=g-import-not-at-top

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
        yield eqn.params["precision"]
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
          if hasattr(sub, "eqns"):
            yield from walk(sub)

  return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


@pytest.mark.parametrize("backbone", ["vit", "rn50"])
def test_evaluation_features_use_full_float32_products(converted, backbone):
  """JAX computes float32 products in TF32 on Ampere+ GPUs and in one bfloat16 pass on TPU by default; the test
  feature asks for full float32 (the official evaluation ran in float32), the stage-1 bank keeps the default."""
  import jax  # pylint: disable=g-import-not-at-top
  from clipreid_jax import steps  # pylint: disable=g-import-not-at-top
  model, variables = converted(next(v for v in VARIANTS if v.parent.name == backbone))
  h, w = model.config.input_size
  batch = {"image": np.zeros((2, h, w, 3), np.uint8), "camid": np.zeros(2, np.int32),
           "viewid": np.zeros(2, np.int32)}
  for flip in (False, True):
    found = _product_precisions(steps.make_feature_fn(model, "eval", flip=flip), variables, batch)
    assert len(found) > 10, found
    assert set(found) == {(jax.lax.Precision.HIGHEST,) * 2}, set(found)
  bank = _product_precisions(steps.make_feature_fn(model, "stage1"), variables, batch)
  assert len(bank) > 10 and set(bank) == {None}, set(bank)


def test_convert_rn50_drops_the_sie_table_the_official_model_never_reads(tmp_path, capsys):
  """The official model builds cv_embed for RN50 too (SIE flags on) but only ViT reads it: dropped, with a warning."""
  variant = next(v for v in VARIANTS if v.parent.name == "rn50")
  sd = dict(np.load(variant / "model_state.npz"))
  np.savez(tmp_path / "sie.npz", cv_embed=np.ones((6, sd["classifier.weight"].shape[1]), np.float32), **sd)
  plain = convert_args(variant, tmp_path / "plain")
  assert convert.main(plain) == 0
  capsys.readouterr()
  assert convert.main([plain[0], str(tmp_path / "sie.npz"), str(tmp_path / "sie"), *plain[3:]]) == 0
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("warning: ") and "cv_embed dropped" in err[0], err
  (_, a), (_, b) = clipreid.load_clipreid(tmp_path / "plain"), clipreid.load_clipreid(tmp_path / "sie")
  chex.assert_trees_all_equal(a, b)
  assert convert.main([plain[0], str(tmp_path / "sie.npz"), str(tmp_path / "c"), *plain[3:], "--sie", "camera"]) == 2
  assert "SIE is ViT-only" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_convert_warns_when_the_file_name_names_no_dataset(tmp_path, capsys):
  """A released checkpoint renamed (my_model.pth): its prompt noun and SIE layout were guessed silently (a VeRi
  camera x view model read as person prompts and 160 cameras); now one warning line says what was guessed."""
  variant = next(v for v in VARIANTS if v.name == "c_sie_cam")
  src = variant / "model_state.pth" if (variant / "model_state.pth").is_file() else variant / "model_state.npz"
  renamed = tmp_path / ("my_model" + src.suffix)
  renamed.write_bytes(src.read_bytes())
  m = meta(variant)
  assert convert.main(["clipreid", str(renamed), str(tmp_path / "a"), "--input_size", *map(str, m["SIZE_TRAIN"]),
                       "--stride", str(m["STRIDE_SIZE"][0]), "--sie_coe", str(m["SIE_COE"])]) == 0
  err = capsys.readouterr().err.strip().splitlines()
  rows = m["camera_num"]
  assert err == [f"warning: {renamed}: its name starts with none of the official datasets' names: read as a model of "
                 f"person prompts and an SIE table of {rows} cameras; pass --dataset NAME (veri or vehicleid for a "
                 "vehicle model; custom for data of your own, as guessed)"], err
  assert convert.main(convert_args(variant, tmp_path / "named")) == 0  # --dataset given: nothing guessed or said
  assert capsys.readouterr().err.strip() == ""


def test_convert_a_checkpoint_saved_from_data_parallel(tmp_path):
  """A CLIP-ReID model trained under DataParallel saves every key under `module.`: it converts as the plain one."""
  variant = next(v for v in VARIANTS if (v / "model_state.npz").is_file())
  sd = dict(np.load(variant / "model_state.npz"))
  np.savez(tmp_path / "dp.npz", **{"module." + k: v for k, v in sd.items()})
  args = convert_args(variant, tmp_path / "plain")
  assert convert.main(args) == 0
  assert convert.main([args[0], str(tmp_path / "dp.npz"), str(tmp_path / "dp"), *args[3:]]) == 0
  (_, a), (_, b) = clipreid.load_clipreid(tmp_path / "plain"), clipreid.load_clipreid(tmp_path / "dp")
  chex.assert_trees_all_equal(a, b)


def test_convert_infers_the_olp_stride_from_an_input_size_given_alone(tmp_path):
  """`--input_size` without `--stride` on an OLP checkpoint: the stride whose grid fits the table (was: 16, refused)."""
  variant = next(v for v in VARIANTS if meta(v)["STRIDE_SIZE"][0] == 12)
  args = convert_args(variant, tmp_path / "given")
  assert convert.main(args) == 0
  i = args.index("--stride")
  assert convert.main([args[0], args[1], str(tmp_path / "inferred"), *args[3:i], *args[i + 2:]]) == 0
  (ma, a), (mb, b) = clipreid.load_clipreid(tmp_path / "given"), clipreid.load_clipreid(tmp_path / "inferred")
  assert mb.config == ma.config and mb.config.clip.vision_stride == 12
  chex.assert_trees_all_equal(a, b)


def test_sie_coefficient_scales_the_camera_embedding(converted):
  """sie_coe multiplies the SIE row (the golden variants all use 1.0, the official default is 3.0)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  variant = next(v for v in VARIANTS if v.parent.name == "vit" and v.name == "c_sie_cam")
  model, variables = converted(variant)
  assert model.config.sie_coe == 1.0
  inputs = np.load(variant / "inputs.npz")
  x, (cams, views) = inputs["images"].transpose(0, 2, 3, 1), sie_inputs(variant, inputs)
  tripled = clipreid.CLIPReID(dataclasses.replace(model.config, sie_coe=3.0), model.dtype)
  scaled = jax.tree.map(lambda a: a, variables)
  scaled["params"] = dict(scaled["params"], cv_embed=3.0 * np.asarray(variables["params"]["cv_embed"]))
  a = tripled.apply(variables, x, cams, views, method=tripled.eval_feature)
  b = model.apply(scaled, x, cams, views, method=model.eval_feature)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  once = model.apply(variables, x, cams, views, method=model.eval_feature)
  assert np.abs(np.asarray(a) - np.asarray(once)).max() > 1e-3


def test_test_feature_is_taken_before_the_bn_necks(converted):
  """The 1280-d test feature concatenates the pre-BN features: the golden BN necks are at their initial values (an
  identity), so the BN statistics and affine parameters are drawn here and must not change it."""
  variant = next(v for v in VARIANTS if v.parent.name == "vit" and v.name == "a_plain")
  model, variables = converted(variant)
  x = np.load(variant / "inputs.npz")["images"].transpose(0, 2, 3, 1)
  rng = np.random.default_rng(0)
  drawn = {"params": dict(variables["params"]), "batch_stats": dict(variables["batch_stats"])}
  for neck in ("bottleneck", "bottleneck_proj"):
    drawn["params"][neck] = {k: rng.uniform(0.5, 2.0, np.shape(v)).astype(np.float32)
                             for k, v in variables["params"][neck].items()}
    drawn["batch_stats"][neck] = {k: rng.uniform(0.5, 2.0, np.shape(v)).astype(np.float32)
                                  for k, v in variables["batch_stats"][neck].items()}
  np.testing.assert_array_equal(model.apply(drawn, x, method=model.eval_feature),
                                model.apply(variables, x, method=model.eval_feature))
  out = model.apply(drawn, x)  # the drawn necks do act on the training outputs' classifier scores
  assert np.abs(np.asarray(out["cls_score"]) - np.asarray(model.apply(variables, x)["cls_score"])).max() > 1e-3


def test_prompt_tokens_other_than_four(tmp_path):
  """model.prompt_tokens = n: "A photo of a X..X person." with n learned tokens; the prompt is the template's
  token embeddings with the X rows replaced by the identity's tokens, and the text feature is read at its end token
  (the truncated text pass still equals the full 77-token one)."""
  from clipreid_jax.models.clip import load_clip
  from clipreid_jax.tokenizer import tokenize
  variant = next(v for v in VARIANTS if meta(v)["DATASETS.NAMES"] != "veri")
  m = meta(variant)
  clip_dir = tmp_path / "clip"
  assert convert.main(["clip", str(variant.parent / "clip_openai_layout.npz"), str(clip_dir)]) == 0
  clip_model, clip_vars = load_clip(clip_dir)
  for n in (1, 2, 7):
    model, variables = clipreid.from_clip(clip_model.config, clip_vars, num_classes=3,
                                          input_size=tuple(m["SIZE_TRAIN"]), stride=m["STRIDE_SIZE"][0],
                                          prompt_tokens=n)
    cfg = model.config
    assert cfg.prompt_tokens == n and cfg.template == f"A photo of a {' '.join('X' * n)} person."
    assert cfg.eot_index == 7 + n
    labels = jnp.asarray([2, 0])
    prompts = model.apply(variables, labels, 77, method=lambda mod, l, k: mod.prompt_learner(l, k))
    ctx = np.asarray(variables["params"]["prompt_learner"]["cls_ctx"])
    assert ctx.shape[:2] == (3, n)
    want = np.asarray(clip_vars["params"]["token_embedding"]["embedding"])[tokenize(cfg.template)[0]]
    want = np.repeat(want[None], 2, axis=0)
    want[:, 5:5 + n] = ctx[np.asarray(labels)]
    np.testing.assert_array_equal(np.asarray(prompts), want)
    short = model.apply(variables, labels, method=model.text_features)
    full = model.apply(variables, labels, full_context=True, method=model.text_features)
    _assert_close(f"truncated text features, {n} tokens", short, full, FWD)
  # A converted checkpoint says how many tokens it learnt.
  sd = dict(np.load(variant / "model_state.npz"))
  sd["prompt_learner.cls_ctx"] = sd["prompt_learner.cls_ctx"][:, :2]
  with pytest.warns(UserWarning, match="x.pth: its name starts with none of the official datasets' names"):
    cfg = official.infer_reid_config(sd, "x.pth", input_size=tuple(m["SIZE_TRAIN"]), stride=m["STRIDE_SIZE"][0])
  assert (cfg.prompt_tokens, cfg.eot_index) == (2, 9)
  sd["prompt_learner.cls_ctx"] = np.zeros((3, 70, 8), np.float32)
  with pytest.raises(CheckpointError, match=r"x.pth: prompt_learner.cls_ctx has 70 tokens per identity; expected "
                     r"1..69"):
    official.infer_reid_config(sd, "x.pth", input_size=tuple(m["SIZE_TRAIN"]), stride=m["STRIDE_SIZE"][0])


def test_a_checkpoint_may_learn_the_longest_prompt_that_fits():
  """clipreid.MAX_PROMPT_TOKENS learned tokens fill CLIP's 77 with the template's other 8: a checkpoint that learnt
  that many is read (its end token is the last one); one token more is refused."""
  variant = next(v for v in VARIANTS if meta(v)["DATASETS.NAMES"] != "veri")
  m = meta(variant)
  sd = dict(np.load(variant / "model_state.npz"))
  sd["prompt_learner.cls_ctx"] = np.zeros((3, clipreid.MAX_PROMPT_TOKENS, 8), np.float32)
  with pytest.warns(UserWarning, match="x.pth: its name starts with none"):
    cfg = official.infer_reid_config(sd, "x.pth", input_size=tuple(m["SIZE_TRAIN"]), stride=m["STRIDE_SIZE"][0])
  assert (cfg.prompt_tokens, cfg.eot_index) == (clipreid.MAX_PROMPT_TOKENS, 76)
  sd["prompt_learner.cls_ctx"] = np.zeros((3, clipreid.MAX_PROMPT_TOKENS + 1, 8), np.float32)
  with pytest.raises(CheckpointError, match=r"prompt_learner.cls_ctx has 70 tokens per identity; expected 1..69"):
    official.infer_reid_config(sd, "x.pth", input_size=tuple(m["SIZE_TRAIN"]), stride=m["STRIDE_SIZE"][0])


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v.parent.name}/{v.name}")
def test_export_writes_the_official_state_dict(variant, tmp_path, capsys):
  """`convert export` writes what the official code's model.state_dict() holds: every key, dtype and value of the
  golden state dict (BatchNorm counters included), and converting the file back gives the same model."""
  import torch
  model_dir, out = tmp_path / "model", tmp_path / "out" / "model.pth"
  assert convert.main(convert_args(variant, model_dir)) == 0
  capsys.readouterr()
  assert convert.main(["export", str(model_dir), str(out)]) == 0
  m = meta(variant)
  line = capsys.readouterr().out.strip()
  h, w = m["SIZE_TRAIN"]
  assert line.startswith(f"wrote {out}; the official code loads it with MODEL.NAME ") and (
      f"INPUT.SIZE_TEST [{h}, {w}], MODEL.STRIDE_SIZE [{m['STRIDE_SIZE'][0]}, {m['STRIDE_SIZE'][0]}]" in line), line
  assert ("MODEL.SIE_CAMERA" in line) == bool(m["SIE_CAMERA"] or m["SIE_VIEW"]) and "\n" not in line
  want = dict(np.load(variant / "model_state.npz"))
  got = {k: v.numpy() for k, v in torch.load(out, map_location="cpu", weights_only=True).items()}
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert list(out.parent.iterdir()) == [out]  # no staging file left
  args = convert_args(variant, tmp_path / "back")
  args[1] = str(out)
  assert convert.main(args) == 0
  chex.assert_trees_all_equal(clipreid.load_clipreid(tmp_path / "back")[1], clipreid.load_clipreid(model_dir)[1])


def test_export_bad_inputs(tmp_path, capsys, monkeypatch):
  """One line, exit 2, nothing written: an existing file, another extension, a folder, a workdir, a model with
  prompts the official code cannot build, a failed write."""
  import torch
  from clipreid_jax import checkpoints
  from clipreid_jax.models.clip import load_clip
  variant = VARIANTS[0]
  model_dir = tmp_path / "model"
  assert convert.main(convert_args(variant, model_dir)) == 0
  (tmp_path / "old.pth").write_bytes(b"keep")
  (tmp_path / "dir.pth").mkdir()
  (tmp_path / "work" / "model").mkdir(parents=True)
  (tmp_path / "work" / "model" / "config.json").write_text("{}")
  (tmp_path / "work" / "config.json").write_text('{"mode": "train"}')  # a workdir's record of its training config
  # Prompts of 2 tokens: the official PromptLearner builds 4.
  assert convert.main(["clip", str(variant.parent / "clip_openai_layout.npz"), str(tmp_path / "clip")]) == 0
  clip_model, clip_vars = load_clip(tmp_path / "clip")
  m = meta(variant)
  two, two_vars = clipreid.from_clip(clip_model.config, clip_vars, num_classes=3, input_size=tuple(m["SIZE_TRAIN"]),
                                     stride=m["STRIDE_SIZE"][0], prompt_tokens=2)
  checkpoints.save_model_dir(tmp_path / "two", two_vars, {"kind": "clipreid", "reid": two.config.to_dict()})
  cases = [
      (["old.pth"], "old.pth: already exists; choose a new file name or pass --overwrite"),
      (["m.npz"], "m.npz: expected a .pth or .pt file name (torch.save's state dict)"),
      (["dir.pth", "--overwrite"], "dir.pth: is a folder; expected a .pth file name"),
      (["w.pth"], "expected a CLIP-ReID model directory (config.json kind 'clipreid'), got kind None (a training "
       "workdir: its trained model is "),
      (["two.pth"], "two: its prompts have 2 learned tokens per identity; the official code builds 4"),
  ]
  sources = {"w.pth": tmp_path / "work", "two.pth": tmp_path / "two"}
  for (name, *flags), expected in cases:
    capsys.readouterr()
    code = convert.main(["export", str(sources.get(name, model_dir)), str(tmp_path / name), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and expected in err and "\n" not in err, err
  assert (tmp_path / "old.pth").read_bytes() == b"keep" and list((tmp_path / "dir.pth").iterdir()) == []
  assert not any((tmp_path / n).exists() for n in ("m.npz", "w.pth", "two.pth"))
  # A write that fails half-way: no file under the name, no staging file, one line.
  def failing_save(obj, f):
    pathlib.Path(f).write_bytes(b"partial")
    raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64\nmore")
  monkeypatch.setattr(torch, "save", failing_save)
  (tmp_path / "fail").mkdir()
  assert convert.main(["export", str(model_dir), str(tmp_path / "fail" / "m.pth")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.endswith("m.pth: cannot write (RuntimeError: [enforce fail at inline_container.cc:603] . unexpected "
                      "pos 64)"), err
  assert list((tmp_path / "fail").iterdir()) == []


def test_export_of_a_baseline_model(tmp_path, capsys):
  """The paper's baseline (make_model.py: image side only) exports to its own state dict: no text or prompt keys."""
  import torch
  variant = VARIANTS[0]
  sd = {k: v for k, v in np.load(variant / "model_state.npz").items()
        if not k.startswith(("text_encoder.", "prompt_learner."))}
  np.savez(tmp_path / "baseline.npz", **sd)
  args = convert_args(variant, tmp_path / "model")
  args[1] = str(tmp_path / "baseline.npz")
  assert convert.main(args) == 0
  assert not clipreid.load_clipreid(tmp_path / "model")[0].config.with_text
  capsys.readouterr()
  assert convert.main(["export", str(tmp_path / "model"), str(tmp_path / "b.pth")]) == 0
  assert "the baseline (processor.py, make_model.py)" in capsys.readouterr().out
  got = torch.load(tmp_path / "b.pth", map_location="cpu", weights_only=True)
  assert sorted(got) == sorted(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(got[k].numpy(), v, err_msg=k)


def test_init_is_compiled_once_per_configuration_and_draws_what_flax_draws():
  """init_variables runs flax's init as one compiled program (eagerly it compiles every op of the forward pass: 9.8 s
  of the demo's start-up on the CPU): the same draws as the eager init (to float rounding), one compilation per
  model configuration, none for a second, equal configuration (also one written with lists, as JSON gives them)."""
  import jax  # pylint: disable=g-import-not-at-top
  from clipreid_jax.models.clip import CLIPConfig  # pylint: disable=g-import-not-at-top
  clip_cfg = CLIPConfig(embed_dim=32, vision_layers=1, vision_width=64, vision_patch_size=16, vision_stride=16,
                        text_width=64, text_heads=1, text_layers=1, vision_grid=(4, 2))
  cfg = clipreid.ReIDConfig(clip=clip_cfg, num_classes=3, image_size=(64, 32), eot_index=12)
  rng = jax.random.PRNGKey(3)
  equal = clipreid.ReIDConfig(clip=CLIPConfig(embed_dim=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                                              vision_stride=16, text_width=64, text_heads=1, text_layers=1,
                                              vision_grid=[4, 2]),
                              num_classes=3, image_size=[64, 32], eot_index=12)
  assert equal == cfg and equal is not cfg
  before = clipreid._compiled_init._cache_size()  # pylint: disable=protected-access
  got = clipreid.init_variables(clipreid.CLIPReID(cfg), rng)
  again = clipreid.init_variables(clipreid.CLIPReID(equal), rng)
  assert clipreid._compiled_init._cache_size() == before + 1  # pylint: disable=protected-access
  zeros = jnp.zeros((2,), jnp.int32)
  eager = clipreid.CLIPReID(cfg).init(rng, jnp.zeros((2, 64, 32, 3)), zeros, zeros, zeros,
                                      method=clipreid.CLIPReID.init_all)
  chex.assert_trees_all_equal(got, again)
  chex.assert_trees_all_close(got, eager, rtol=1e-6, atol=1e-7)
  assert len(jax.tree.leaves(got["params"])) > 20  # the whole model, not a part of it
