"""Bad input through the real CLI: one line on stderr naming the file, key or value and what was expected, exit
code 2, and nothing written (the workdir is not created). Every case fails before JAX compiles a training step.

The matrix (and where the cases tested elsewhere live) is in docs/reliability.md.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from clipreid_jax import convert
from clipreid_jax.data.synthetic import write_synthetic_market
from conftest import golden_root
from golden_reid import convert_args, variants

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "tiny_run_config.py"
_ENV: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  # The image cases fail in the first stage-1 batch, after the model is built; a shared persistent cache makes
  # every process after the first skip the (eager, op by op) compilation of the random CLIP's initialisation.
  _ENV.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  yield
  _ENV.clear()


def _cli(*args, module: str = "clipreid_jax.main", env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, timeout=300,
                        cwd=REPO, env={**os.environ, **_ENV, **(env or {})})


def _error(out: subprocess.CompletedProcess, *expected: str, code: int = 2) -> str:
  """The last stderr line, checked: exit code, 'error: ' prefix, every expected piece, no traceback."""
  assert out.returncode == code, (out.returncode, out.stderr[-3000:])
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  line = out.stderr.strip().splitlines()[-1]
  assert line.startswith("error: "), line
  for piece in expected:
    assert str(piece) in line, (piece, line)
  return line


@pytest.fixture(scope="module")
def market(tmp_path_factory) -> pathlib.Path:
  """A small Market-layout dataset (the synthetic writer), copied per case before it is broken."""
  return pathlib.Path(write_synthetic_market(tmp_path_factory.mktemp("market") / "m", num_train_ids=8,
                                             num_test_ids=4, imgs_per_id=4, num_cams=3, size=(64, 32), seed=0))


def _train(tmp_path, *overrides, data=None, env=None):
  """A training run of the tiny config on `data` (Market layout) or on its own synthetic data."""
  work = tmp_path / "work"
  args = ["--config", f"{CONFIG}:{tmp_path / 'synthetic'}", "--workdir", work]
  if data is not None:
    args += ["--config.dataset.name=market1501", f"--config.dataset.root={data}", "--config.dataset.check_counts=False"]
  out = _cli(*args, *overrides, env=env)
  return out, work


# --- data -----------------------------------------------------------------------------------------------------


def test_missing_dataset_root(tmp_path):
  out, work = _train(tmp_path, data=tmp_path / "nowhere")
  _error(out, tmp_path / "nowhere", "expected layout", "bounding_box_train")
  assert not work.exists()


def test_wrong_layout(tmp_path):
  (tmp_path / "data" / "images").mkdir(parents=True)
  out, work = _train(tmp_path, data=tmp_path / "data")
  _error(out, tmp_path / "data", "expected layout", "bounding_box_train")
  assert not work.exists()


def test_empty_split(tmp_path, market):
  data = shutil.copytree(market, tmp_path / "data")
  for f in (data / "query").iterdir():
    f.unlink()
  out, work = _train(tmp_path, data=data)
  _error(out, "split 'query' is empty")
  assert not work.exists()


def _break_first_train_image(data: pathlib.Path, how: str) -> pathlib.Path:
  # The first image in file order is in the first batch of the stage-1 feature bank, so the error comes at once.
  img = min((data / "bounding_box_train").iterdir())
  if how == "unreadable":
    if os.geteuid() == 0:  # root reads any mode; a directory cannot be read as a file either
      img.unlink()
      img.mkdir()
    else:
      img.chmod(0)
  elif how == "zero-byte":
    img.write_bytes(b"")
  elif how == "not an image":
    img.write_bytes(b"%PDF-1.4 this is not an image\n")
  elif how == "truncated":
    # Cut inside the header: nothing can be decoded. (A JPEG cut after its header decodes partially and is
    # loaded with a DataWarning, by design, as the official code loads it.)
    img.write_bytes(img.read_bytes()[:100])
  return img


@pytest.mark.parametrize("how,expected", [("unreadable", "cannot read image"), ("zero-byte", "is empty (0 bytes)"),
                                          ("not an image", "not an image file"),
                                          ("truncated", "cannot decode")])
def test_bad_image_file(tmp_path, market, how, expected):
  data = shutil.copytree(market, tmp_path / "data")
  img = _break_first_train_image(data, how)
  try:
    out, work = _train(tmp_path, data=data)
  finally:
    if img.is_file():
      img.chmod(0o644)
  _error(out, img.name, expected)
  assert not work.exists()  # the feature bank reads every training image before anything is written


def test_empty_gallery_image_is_refused_before_training(tmp_path, market):
  """Query and gallery images are first read by the final evaluation: a zero-byte gallery image ended a finished
  training run (hours, on MSMT17) with exit code 2 and a written workdir. One stat per test image finds it first."""
  data = shutil.copytree(market, tmp_path / "data")
  img = max((data / "bounding_box_test").iterdir())
  img.write_bytes(b"")
  out, work = _train(tmp_path, data=data)
  _error(out, img.name, "is empty (0 bytes)")
  assert not work.exists()


def test_list_file_naming_a_missing_image(tmp_path, market):
  data = tmp_path / "custom"
  shutil.copytree(market, data / "images")
  train = sorted((data / "images" / "bounding_box_train").iterdir())
  test = sorted((data / "images" / "bounding_box_test").iterdir())
  rows = lambda files: "".join(f"images/{f.parent.name}/{f.name},{f.name[:4]},{f.name[6]}\n" for f in files)
  (data / "train.csv").write_text(rows(train))
  (data / "query.csv").write_text(rows(test[:2]))
  (data / "gallery.csv").write_text(rows(test[2:4]) + "images/bounding_box_test/missing.jpg,7,1\n")
  out, work = _train(tmp_path, "--config.dataset.name=custom", f"--config.dataset.root={data}")
  _error(out, "gallery.csv:3", "missing.jpg")
  assert not work.exists()


def test_sie_camera_missing_from_train(tmp_path, market):
  """With SIE, a test camera without a row of the table (one per training camera) is refused: JAX would clamp the
  index and let it share another camera's row."""
  data = tmp_path / "custom"
  shutil.copytree(market, data / "images")
  train = sorted((data / "images" / "bounding_box_train").iterdir())
  test = sorted((data / "images" / "bounding_box_test").iterdir())
  rows = lambda files, cam=None: "".join(f"images/{f.parent.name}/{f.name},{f.name[:4]},{cam or f.name[6]}\n"
                                         for f in files)
  (data / "train.csv").write_text(rows(train))
  (data / "query.csv").write_text(rows(test[:2], cam="9"))  # the tiny data's cameras are 1..3
  (data / "gallery.csv").write_text(rows(test[2:]))
  out, work = _train(tmp_path, "--config.dataset.name=custom", f"--config.dataset.root={data}",
                     "--config.model.sie_camera=True")
  _error(out, "custom: query camera id 3 is outside the SIE table", "rows 0..2")
  assert not work.exists()


def test_sie_on_a_subset_that_leaves_out_a_camera(tmp_path, market):
  """Market's camera ids come from the file names: a training split without c2 has a 2-row table (ids 0 and 2),
  and the error says to renumber (it said that every camera must occur in train, which they do)."""
  data = shutil.copytree(market, tmp_path / "subset")
  for f in (data / "bounding_box_train").glob("*_c2s*"):
    f.unlink()
  out, work = _train(tmp_path, "--config.model.sie_camera=True", data=data)
  _error(out, "market1501: train camera id 2 is outside the SIE table (rows 0..1",
         "the training split's camera ids are 0, 2: a subset that leaves out cameras must renumber them 0..1")
  assert not work.exists()


def test_fewer_identities_than_p(tmp_path):
  out, work = _train(tmp_path, "--config.stage2.num_ids=9")  # the tiny data has 8 training identities
  _error(out, "stage2.num_ids=9", "at least P=9", "has 8")
  assert not work.exists()


def test_batch_not_divisible_by_devices(tmp_path):
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
  out, work = _train(tmp_path, "--config.eval.batch_size=15", env=env)  # P x K = 4 x 2 = 8
  _error(out, "stage2.num_ids * stage2.num_instances", "8", "3 devices")
  assert not work.exists()
  out, _ = _train(tmp_path, env=env)  # eval.batch_size 16
  _error(out, "eval.batch_size", "16", "3 devices")
  assert not work.exists()
  # --dry_run checks them too (it said "config OK").
  _error(_train(tmp_path, "--config.eval.batch_size=15", "--dry_run", env=env)[0], "stage2.num_ids * "
         "stage2.num_instances", "8", "3 devices")
  _error(_train(tmp_path, "--dry_run", env=env)[0], "eval.batch_size", "16", "3 devices")
  assert not work.exists()


# --- configuration ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override,expected", [
    ("--config.stage1.no_such_key=1", ["--config.stage1.no_such_key", "unknown config key"]),
    # A near miss of the last key: was `AttributeError: '\'base_lrr\'\nDid you mean "base_lr" instead of ...'`.
    ("--config.stage2.base_lrr=1e-4", ["--config.stage2.base_lrr: unknown config key 'base_lrr'; did you mean "
                                       '"base_lr" instead of "base_lrr"?']),
    # A missing section: was `KeyError: '\'stage3\'\nDid you mean "stage2" instead of "stage3"?'`.
    ("--config.stage3.max_epochs=1", ["--config.stage3.max_epochs: unknown config key 'stage3'; did you mean "
                                      '"stage2" instead of "stage3"?']),
    # A key below a value: was `TypeError: tuple indices must be integers or slices, not str`.
    ("--config.stage2.steps.first=1", ["--config.stage2.steps.first: stage2.steps is a value, not a section"]),
    ("--config.stage2.num_ids=four", ["--config.stage2.num_ids=four", "invalid literal for int()"]),  # wrong type
    ("--config.stage1.batch_size=0", ["stage1.batch_size", "positive integer", "got 0"]),
    ("--config.stage2.num_instances=-2", ["stage2.num_instances", "positive integer", "got -2"]),
    ("--config.stage2.max_epochs=0", ["stage2.max_epochs", "positive integer", "got 0"]),
    ("--config.stage1.max_epochs=-1", ["stage1.max_epochs", "positive integer", "got -1"]),
    ("--config.stage2.base_lr=-0.001", ["stage2.base_lr", "> 0", "-0.001"]),
    ("--config.stage1.base_lr=0", ["stage1.base_lr", "> 0", "got 0"]),
    ("--config.stage2.base_lr=nan", ["stage2.base_lr", "finite", "nan"]),
    ("--config.model.dtype=float16", ["model.dtype", "float16"]),
    # It read (and for synthetic data wrote) the current folder.
    ("--config.dataset.root=", ["dataset.root: expected a dataset folder (or dataset.packed_dir), got ''"]),
    # Read by eval and extract modes only: a training run ignored it silently.
    ("--config.checkpoint=workdirs/other/model", ["checkpoint: expected '' in train mode", "init.clip"]),
    ("--config.model.prompt_tokens=70", ["model.prompt_tokens", "[1, 69]", "got 70"]),
    # A pack named for synthetic data was ignored silently (and recorded in config.json as read).
    ("--config.dataset.packed_dir=/nonexistent/pack", ["dataset.packed_dir", "'' for synthetic data", "/nonexistent"]),
    # The synthetic data's sizes: checked on every host before process 0 writes (was "synthetic: need ..., got 9").
    ("--config.dataset.num_cams=9", ["dataset.num_cams", "[2, 6]", "got 9"]),
    ("--config.dataset.imgs_per_id=3", ["dataset.imgs_per_id", ">= 4", "got 3"]),
    ("--config.dataset.num_train_ids=5000", ["dataset.num_train_ids + dataset.num_test_ids", "at most 4999"]),
])
def test_bad_config_value(tmp_path, override, expected):
  out, work = _train(tmp_path, override)
  _error(out, *expected)
  assert not work.exists() and not (tmp_path / "synthetic").exists()  # not even the synthetic data


@pytest.mark.parametrize("config,expected", [
    # ml_collections defers a file that failed to load to the first access: it was a 40-line traceback, exit 1.
    ("configs/no_such_recipe.py", ["--config: cannot load the config file", "No such file or directory"]),
    # An exception inside get_config was flattened into one 700-character line of traceback; its message is the news.
    ("configs/market1501_cnn.py:sie_olp", ["--config=configs/market1501_cnn.py:sie_olp", "SIE and OLP are ViT-only"]),
    # A recipe without the converted CLIP it starts from: was a ZeroDivisionError traceback.
    ("configs/market1501_vit.py", ["init.clip: expected a converted CLIP directory"]),
])
def test_bad_config_file(tmp_path, config, expected):
  out = _cli("--config", config, "--workdir", tmp_path / "work", "--dry_run")
  line = _error(out, *expected)
  assert "Traceback" not in line and len(line) < 300, line
  assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("make_workdir,expected", [
    # Each was a traceback (NotADirectoryError, FileExistsError, FileNotFoundError) after the data and the stage-1
    # feature bank, when the first record created the workdir; --dry_run said "config OK".
    (lambda tmp: tmp / "afile" / "run", "cannot create {w}: {tmp}/afile is not a folder"),
    (lambda tmp: tmp / "afile", "{w} exists and is not a folder"),
    (lambda tmp: pathlib.Path("/proc/clipreid_no_such_run"), "cannot create or write {w}"),  # even as root
], ids=["below-a-file", "a-file", "proc"])
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry_run"])
def test_a_workdir_that_cannot_be_created_is_refused_first(tmp_path, make_workdir, expected, dry_run):
  (tmp_path / "afile").write_text("")
  work = make_workdir(tmp_path)
  out = _cli("--config", f"{CONFIG}:{tmp_path / 'synthetic'}", "--workdir", work, *(["--dry_run"] if dry_run else []))
  _error(out, f"error: --workdir: {expected.format(w=work, tmp=tmp_path)}")
  assert "feature bank" not in out.stderr and not (tmp_path / "synthetic").exists()  # before any work


def test_overrides_without_a_config_file(tmp_path):
  """absl knows --config.KEY only once --config is given: it said `Unknown command line flag 'config.mode'`."""
  line = _error(_cli("--config.mode=eval", "--config.checkpoint=m", "--workdir", tmp_path / "w"),
                "error: --config is required for --config.KEY overrides, e.g. --config configs/demo.py")
  assert "Unknown" not in line and not (tmp_path / "w").exists()
  _error(_cli("--workdir", tmp_path / "w"), "error: --config is required, e.g. --config configs/demo.py")


@pytest.mark.parametrize("body,expected", [
    ("def get_config():\n  return recipe('x')\n", "--config: NameError: name 'recipe' is not defined"),  # 38 lines
    ("import no_such_module_xyz\n", "--config: ModuleNotFoundError: No module named 'no_such_module_xyz'"),
    ("def get_config():\n  raise ValueError('first line\\nsecond line')\n", "ValueError: first line second line"),
    ("def get_config():\n  return None\n", "get_config() returned None; expected a ConfigDict"),  # said: required
    # Neither named the file: `AttributeError: module 'config_config' has no attribute 'get_config'`, `SyntaxError: ...`.
    ("config = None\n", "mine.py: defines no get_config(); expected a function get_config() that returns a ConfigDict"),
    ("def get_config(:\n  pass\n", "mine.py: SyntaxError: invalid syntax"),
    # A misspelt key trained with the default, recorded in config.json as if used; a missing one was a traceback.
    ("from clipreid_jax.config_defaults import recipe\ndef get_config():\n  c = recipe('market1501')\n"
     "  c.stage2.base_lrr = 1e-3\n  c.loss.triplet_weigth = 0.0\n  return c\n",
     "mine.py: unknown key loss.triplet_weigth (did you mean loss.triplet_weight?) (and stage2.base_lrr); expected the "
     "keys of clipreid_jax/config_defaults.py recipe()"),
    ("from clipreid_jax.config_defaults import recipe\ndef get_config():\n  c = recipe('market1501')\n"
     "  del c.model['prompt_tokens']\n  return c\n", "mine.py: missing key model.prompt_tokens; expected every key"),
])
def test_broken_config_file(tmp_path, body, expected):
  (tmp_path / "mine.py").write_text(body)
  _error(_cli("--config", tmp_path / "mine.py", "--dry_run"), expected)


def test_paths_from_home_are_expanded(tmp_path):
  """`--workdir=~/runs/x` and `--config.KEY=~/...` reach the program unexpanded (the shell expands a leading ~ only):
  a run trained into a folder named `~` in the current one (which `rm -rf ~` would then "clean up")."""
  home = tmp_path / "home"
  keys = {"dataset.root": "~/data", "init.clip": "~/converted/vit", "init.stage1": "~/w/stage1",
          "checkpoint": "~/w/model", "extract.input": "~/images", "extract.output": "~/features",
          "dataset.packed_dir": "~/packed", "dataset.keypoint_dir": "~/keypoints"}
  out = _cli("--config", "configs/market1501_vit.py", "--workdir=~/runs/x", "--dry_run",
             *[f"--config.{k}={v}" for k, v in keys.items()], env={"HOME": str(home)})
  shown = json.loads(out.stdout[:out.stdout.rindex("}") + 1])
  for key, value in keys.items():
    section, name = key.split(".") if "." in key else ("", key)
    assert (shown[section][name] if section else shown[name]) == str(home / value[2:]), key
  assert shown["workdir"] == str(home / "runs" / "x")
  assert not (REPO / "~").exists()


def test_dry_run_lists_the_keys_then_checks_like_a_run(tmp_path):
  """--dry_run prints every key even when a check then fails, and refuses a workdir the real run would refuse."""
  out = _cli("--config", "configs/market1501_vit.py", "--dry_run")
  _error(out, "init.clip: expected a converted CLIP directory")
  assert '"stage2": {' in out.stdout and '"workdir": "workdirs/market1501_vit_clipreid"' in out.stdout
  work = tmp_path / "run"
  work.mkdir()
  (work / "config.json").write_text("{}\n")  # a training run's
  out = _cli("--config", "configs/market1501_vit.py", "--config.mode=eval", "--config.checkpoint=x", "--workdir", work,
             "--dry_run")
  _error(out, "holds a training run")


# --- checkpoints ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
  """A converted RN50 CLIP, a camera-SIE CLIP-ReID (3 cameras) and a copy of it with its variables cut."""
  root = tmp_path_factory.mktemp("models")
  rn50 = root / "rn50_clip"
  assert convert.main(["clip", str(golden_root() / "rn50" / "clip_openai_layout.npz"), str(rn50)]) == 0
  variant = next(v for v in variants() if v.name == "c_sie_cam")
  assert json.loads((variant / "meta.json").read_text())["camera_num"] == 3
  sie = root / "sie_cam3"
  assert convert.main(convert_args(variant, sie)) == 0
  cut = shutil.copytree(sie, root / "truncated")
  files = [f for f in (cut / "variables").rglob("*") if f.is_file() and f.stat().st_size > 64]
  assert files
  for f in files:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  return {"rn50_clip": rn50, "sie": sie, "truncated": cut}


def _eval(tmp_path, checkpoint, *overrides):
  work = tmp_path / "work"
  out = _cli("--config", f"{CONFIG}:{tmp_path / 'synthetic'}", "--workdir", work, "--config.mode=eval",
             f"--config.checkpoint={checkpoint}", *overrides)
  return out, work


def test_eval_with_a_clip_directory(tmp_path, models):
  out, work = _eval(tmp_path, models["rn50_clip"])
  _error(out, models["rn50_clip"], "kind 'clipreid'", "kind 'clip'")
  assert not work.exists()


def test_init_clip_of_another_architecture(tmp_path, models):
  out, work = _train(tmp_path, f"--config.init.clip={models['rn50_clip']}")  # the tiny config is a ViT
  _error(out, "init.clip", models["rn50_clip"], "ResNet CLIP", "'ViT-B-16'")
  assert not work.exists()


def test_init_clip_that_is_neither_a_clip_nor_a_clipreid_model(tmp_path):
  other = tmp_path / "other_model"
  other.mkdir()
  (other / "config.json").write_text('{"kind": "detector"}')
  out, work = _train(tmp_path, f"--config.init.clip={other}")
  _error(out, "init.clip", str(other), "kind 'detector'", "expected a converted CLIP directory",
         "or a CLIP-ReID model directory")
  assert not work.exists()


def test_sie_table_contradicts_the_dataset(tmp_path, models):
  out, work = _eval(tmp_path, models["sie"], "--config.dataset.num_cams=4")
  _error(out, models["sie"], "3 cameras", "4")
  assert not work.exists()


def test_truncated_model_directory(tmp_path, models):
  out, work = _eval(tmp_path, models["truncated"])
  _error(out, models["truncated"] / "variables", "cannot restore")
  assert not work.exists()
  # One array file cut short while the others read: the reads still in flight printed "Event loop is closed"
  # tracebacks after the error line (here in every run; with a larger model in 1 run of 3-5).
  cut = shutil.copytree(models["sie"], tmp_path / "one_cut")
  victim = max((f for f in (cut / "variables").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
  victim.write_bytes(victim.read_bytes()[:100])
  out, _ = _eval(tmp_path / "one_cut_run", cut)
  _error(out, cut / "variables", "cannot restore")


# The converter's cases (a pickle that is not a plain state dict, an OpenAI archive whose SHA-256 does not match,
# truncated and unknown files) run through `python -m clipreid_jax.convert` in
# tests/test_clip.py::test_bad_inputs_exit_2_and_write_nothing; a workdir holding another configuration's run in
# tests/test_reliability_resume.py::test_workdir_of_another_configuration.


def test_missing_init_clip_directory(tmp_path):
  missing = tmp_path / "no_such_clip"
  out, work = _train(tmp_path, f"--config.init.clip={missing}")
  _error(out, missing, "not found")
  assert not work.exists()


@pytest.mark.parametrize("override,expected", [
    # Values that ran to exit 0 doing the wrong thing, or crashed after minutes (found by a config fuzz):
    ("--config.model.input_size=(8, 8)", ["model.input_size", "no image token", "at least 16 pixels"]),  # collapsed
    ("--config.model.stride=32", ["model.stride: 32 is more than the CLIP's 16-pixel patch"]),  # half the image unseen
    ("--config.stage1.batch_size=1000", ["stage1.batch_size: 1000 is more than the", "training images"]),  # traceback
    ("--config.stage1.lr_min=0.01", ["stage1.lr_min", "at most stage1.base_lr"]),  # the cosine climbed to 0.01
    ("--config.model.random_clip.vision_width=32", ["model.random_clip.vision_width", "multiple of 64"]),  # traceback
])
def test_config_values_that_misbehaved(tmp_path, override, expected):
  out, work = _train(tmp_path, override)
  _error(out, *expected)
  assert not work.exists()


def test_extract_output_that_cannot_be_written(tmp_path, models):
  """root passes os.access everywhere: check_writable tries a folder there, so the output is refused before the
  work, in one line (was a traceback after it)."""
  images = tmp_path / "images"
  images.mkdir()
  from PIL import Image
  Image.new("RGB", (32, 64)).save(images / "a.jpg")
  (images / "list.txt").write_text("a.jpg,0\n")  # an SIE model: the camera of each image
  out = _cli("--config", f"{CONFIG}:{tmp_path / 'synthetic'}", "--config.mode=extract",
             f"--config.checkpoint={models['sie']}", f"--config.extract.input={images / 'list.txt'}",
             "--config.extract.output=/proc/clipreid_features")
  _error(out, "extract.output: cannot create or write /proc/clipreid_features")


def test_an_output_below_a_file_is_refused_before_the_work(tmp_path):
  """--out / extract.output under a file: refused up front naming the key (the work would fail at its end)."""
  from clipreid_jax import outputs  # pylint: disable=g-import-not-at-top
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match=r"^extract.output: cannot create .*file/a/b: .*file is not a folder$"):
    outputs.check_writable(tmp_path / "file" / "a" / "b", "extract.output")
  with pytest.raises(ValueError, match=r"^--out: .*file exists and is not a folder"):
    outputs.output_anchor(tmp_path / "file", "--out")
  assert outputs.output_anchor(tmp_path / "new" / "deeper", "--out") == tmp_path.resolve()
  assert outputs.check_writable(tmp_path / "new", "--out") == tmp_path / "new" and not (tmp_path / "new").exists()


_RAISE_IN_TRAINING = """
import sys
from absl import app
from clipreid_jax import main, train
from clipreid_jax.data.errors import DataError

def stop(config, workdir):
  raise {exception}

train.train_and_evaluate = stop
app.run(lambda argv: sys.exit(main.main(argv)), flags_parser=main.parse_flags)
"""


@pytest.mark.parametrize("exception,code,expected", [
    ("train.TrainingStopped('stage 2 epoch 1 step 3: non-finite loss; kept')", 1,
     "error: stage 2 epoch 1 step 3: non-finite loss; kept"),
    ("KeyboardInterrupt()", 130, "error: interrupted (Ctrl-C); rerun the same command to resume a training run"),
    ("DataError('market1501: no query')", 2, "error: market1501: no query"),
], ids=["stopped", "ctrl-c", "data"])
def test_exit_code_of_each_way_a_run_ends(tmp_path, exception, code, expected):
  """1: stopped on a condition met while training; 130: a second Ctrl-C; 2: bad input. One line each."""
  out = subprocess.run([sys.executable, "-c", _RAISE_IN_TRAINING.format(exception=exception), "--config",
                        f"{CONFIG}:{tmp_path / 'synthetic'}", "--workdir", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, **_ENV})
  assert _error(out, code=code) == expected


def test_a_stray_argument_is_refused(tmp_path):
  out = _cli("--config", f"{CONFIG}:{tmp_path / 'synthetic'}", "--workdir", tmp_path / "work", "extra")
  assert _error(out) == "error: unexpected arguments ['extra']"
  assert not (tmp_path / "work").exists()


def test_atomic_file_keeps_the_old_file_when_a_write_fails(tmp_path):
  """metrics.json, config.json, pictures and exported .pth files go through one staging file: a write that fails
  half-way leaves the previous file whole and no staging file beside it."""
  from clipreid_jax import outputs  # pylint: disable=g-import-not-at-top
  target = tmp_path / "metrics.json"
  outputs.write_atomic(target, "old\n")
  with pytest.raises(OSError, match="disk full"):
    with outputs.atomic_file(target) as tmp:
      tmp.write_text("half")
      raise OSError("disk full")
  assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
  outputs.write_atomic(target, "new\n")
  assert target.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_orbax_failure_logs_keep_their_line_not_their_traceback():
  """On a full disk orbax logs every failed writer thread with its traceback (60 lines each) before the run reports
  the failure in one line: main's log filter keeps orbax's lines and drops their tracebacks, nobody else's."""
  import logging  # pylint: disable=g-import-not-at-top
  from clipreid_jax import main  # pylint: disable=g-import-not-at-top
  from clipreid_jax.data import errors  # pylint: disable=g-import-not-at-top
  try:
    raise ValueError("RESOURCE_EXHAUSTED: Error writing ...: No space left on device [os_error_code='28']")
  except ValueError as e:
    info, cause = sys.exc_info(), e
  orbax = logging.LogRecord("absl", logging.ERROR, "/x/site-packages/orbax/checkpoint/_src/futures/future.py", 387,
                            "thread raised an exception: %s", ("RESOURCE_EXHAUSTED",), info)
  ours = logging.LogRecord("absl", logging.ERROR, "/x/clipreid_jax/train.py", 1, "failed", (), info)
  assert main._orbax_without_traceback(orbax) and orbax.exc_info is None
  assert "RESOURCE_EXHAUSTED" in orbax.getMessage()
  assert main._orbax_without_traceback(ours) and ours.exc_info is info
  # The error itself, said as the OS says it (its first line is paths for 300 characters).
  assert errors.io_cause(cause) == "[Errno 28] No space left on device"
  assert errors.io_cause(OSError(28, "No space left on device")) == "OSError: [Errno 28] No space left on device"
