"""`--config.mode=eval` and `--config.mode=extract` end to end through the CLI, on a converted official
checkpoint (the golden tiny ViT) and a small Market-layout dataset, against a reference computation."""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from clipreid_jax import convert, inference, train
from clipreid_jax.data import get_dataset
from clipreid_jax.data.synthetic import write_synthetic_market
from clipreid_jax.evaluation import eval_func, evaluate_reranked
from clipreid_jax.inference import FeatureExtractor
from golden_reid import convert_args, variants


def _cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "clipreid_jax.main", *args], capture_output=True, text=True,
                        timeout=600, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  variant = next(v for v in variants() if v.parent.name == "vit" and (v / "model_state.pth").is_file())
  model_dir = root / "model"
  assert convert.main(convert_args(variant, model_dir)) == 0
  data = write_synthetic_market(root / "market", num_train_ids=6, num_test_ids=6, imgs_per_id=5, num_cams=3,
                                size=(128, 64), seed=3)
  return root, model_dir, data


@pytest.fixture(scope="module")
def sie_model(setup):
  """The golden camera-SIE tiny ViT (3 cameras), converted."""
  root, _, _ = setup
  variant = next(v for v in variants() if v.parent.name == "vit" and v.name == "c_sie_cam")
  model_dir = root / "model_sie"
  assert convert.main(convert_args(variant, model_dir)) == 0
  return model_dir


@pytest.mark.parametrize("flip", [False, True], ids=["plain", "flip"])
def test_eval_mode_matches_reference(setup, flip):
  root, model_dir, data = setup
  work = root / f"work_{flip}"
  out = _cli("--config", "configs/market1501_vit.py", "--workdir", str(work), "--config.mode=eval",
             f"--config.checkpoint={model_dir}", f"--config.dataset.root={data}",
             "--config.dataset.check_counts=False", "--config.eval.batch_size=8", f"--config.eval.flip={flip}")
  assert out.returncode == 0, out.stderr[-2000:]
  final = out.stdout.strip().splitlines()[-1]
  assert final.startswith("final: mAP") and "R10" in final
  record = json.loads((work / "metrics.json").read_text())
  got = {k: v / 100 for k, v in record["final"].items() if k in ("mAP", "R1", "R5")}  # metrics.json is in percent
  # What the numbers are of (evaluations share the default workdir).
  assert record["evaluated"] == {"checkpoint": str(model_dir.resolve()), "dataset": "market1501",
                                 "data": str(pathlib.Path(data).resolve()), "flip": flip, "rerank": False}
  # Reference: features from the Python API, the official algorithm in float64 numpy on the full matrix.
  ds = get_dataset("market1501", data, check_counts=False)
  ext = FeatureExtractor(model_dir, flip=flip)
  qf = ext([ds.query.path(i) for i in range(len(ds.query))]).astype(np.float64)
  gf = ext([ds.gallery.path(i) for i in range(len(ds.gallery))]).astype(np.float64)
  qf /= np.linalg.norm(qf, axis=1, keepdims=True)
  gf /= np.linalg.norm(gf, axis=1, keepdims=True)
  dist = (qf ** 2).sum(1)[:, None] + (gf ** 2).sum(1)[None] - 2 * qf @ gf.T
  ref = eval_func(dist, ds.query.pids, ds.gallery.pids, ds.query.camids, ds.gallery.camids)
  cmc, mAP = ref.cmc, ref.mAP
  assert got["mAP"] == pytest.approx(mAP, abs=1e-6)
  assert got["R1"] == pytest.approx(cmc[0], abs=1e-6) and got["R5"] == pytest.approx(cmc[4], abs=1e-6)


def test_extract_mode_cli(setup):
  root, model_dir, data = setup
  out = _cli("--config", "configs/market1501_vit.py", "--config.mode=extract", f"--config.checkpoint={model_dir}",
             f"--config.extract.input={data}/query", f"--config.extract.output={root / 'feats'}")
  assert out.returncode == 0, out.stderr[-2000:]
  feats = np.load(root / "feats" / "features.npy")
  names = (root / "feats" / "features_index.txt").read_text().split()
  assert feats.shape == (len(names), 128 + 64)
  np.testing.assert_allclose(FeatureExtractor(model_dir)(names[:3]), feats[:3], rtol=1e-5, atol=1e-6)


def test_flip_is_the_mean_over_the_mirror_image(setup):
  """eval.flip: each image's feature is the mean of its own and its left-right mirror image's."""
  _, model_dir, _ = setup
  plain, flipped = FeatureExtractor(model_dir, batch_size=4), FeatureExtractor(model_dir, batch_size=4, flip=True)
  h, w = plain.input_size
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(3)]
  mirrored = [im[:, ::-1] for im in images]
  want = (plain(images).astype(np.float64) + plain(mirrored)) / 2
  np.testing.assert_allclose(flipped(images), want, rtol=1e-5, atol=1e-6)
  assert np.abs(flipped(images) - plain(images)).max() > 1e-3  # not a no-op on asymmetric images
  symmetric = [np.concatenate([im[:, :w // 2], im[:, :w // 2][:, ::-1]], axis=1) for im in images]
  np.testing.assert_allclose(flipped(symmetric), plain(symmetric), rtol=1e-5, atol=1e-6)  # the width is mirrored


@pytest.mark.parametrize("args,expected", [
    (["--config.dataset.root=/nonexistent/market"], "/nonexistent/market"),
    (["--config.checkpoint=/nonexistent/model"], "/nonexistent/model"),
    (["--config.nonexistent_key=1"], "nonexistent_key"),
    (["--config.eval.batch_size=zero"], "batch_size"),
    (["--config.eval.batch_size=0"], "eval.batch_size"),
    (["--config.eval.rerank=True", "--config.eval.k1=0"], "eval.k1: expected a positive integer, got 0"),
    (["--config.eval.trials=0"], "eval.trials"),
    (["--config.eval.lambda_value=1.5"], "eval.lambda_value"),
    (["--config.seed=-1"], "seed: expected an integer >= 0"),
    (["--config.model.attention=flash"], "model.attention"),
    # The geometry comes from the checkpoint; a different one asked for on the command line is refused.
    (["--config.model.input_size=(384, 128)"], "model.input_size: (384, 128) contradicts the checkpoint"),
    (["--config.model.stride=12"], "use the checkpoint's (convert with --input_size / --stride to change it)"),
    # So do SIE, the backbone and the baseline form (they were ignored silently).
    (["--config.model.sie_camera=True"], "model.sie_camera: True contradicts the checkpoint"),
    (["--config.model.backbone=RN50"], "model.backbone: 'RN50' contradicts the checkpoint"),
    (["--config.model.baseline=True"], "model.baseline: True contradicts the checkpoint"),
])
def test_eval_bad_input(setup, tmp_path, args, expected):
  root, model_dir, data = setup
  base = ["--config", "configs/market1501_vit.py", "--workdir", str(tmp_path / "w"), "--config.mode=eval",
          f"--config.checkpoint={model_dir}", f"--config.dataset.root={data}",
          "--config.dataset.check_counts=False"]
  out = _cli(*base, *args)
  assert out.returncode == 2, (out.returncode, out.stderr[-1500:])
  assert expected in out.stderr.strip().splitlines()[-1]
  assert not (tmp_path / "w" / "metrics.json").exists()


def test_a_pytorch_file_where_a_model_directory_goes_says_convert_it(tmp_path):
  """FeatureExtractor("model.pth") (or --config.checkpoint / init.clip = the .pth): it said "model.pth/config.json:
  not found"; it now names the conversion command."""
  from clipreid_jax.checkpoints import CheckpointError  # pylint: disable=g-import-not-at-top
  f = tmp_path / "Market1501_clipreid_ViT-B-16_60.pth"
  f.write_bytes(b"")
  with pytest.raises(CheckpointError) as e:
    FeatureExtractor(f)
  assert str(e.value) == (f"{f}: a file; expected the directory that `python -m clipreid_jax.convert clip {f} DIR` "
                          f"(OpenAI's CLIP) or `... convert clipreid {f} DIR` (a CLIP-ReID checkpoint) writes")


def test_eval_batch_not_divisible_by_the_devices_names_the_batch(setup, tmp_path):
  """It was reported as a problem of the checkpoint (`error: checkpoint: DIR: eval.batch_size: ...`)."""
  _, model_dir, data = setup
  out = _cli("--config", "configs/market1501_vit.py", "--workdir", str(tmp_path / "w"), "--config.mode=eval",
             f"--config.checkpoint={model_dir}", f"--config.dataset.root={data}", "--config.dataset.check_counts=False",
             "--config.eval.batch_size=5", env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert out.returncode == 2, out.stderr[-1500:]
  assert out.stderr.strip().splitlines()[-1] == ("error: eval.batch_size: batch 5 is not divisible by the 4 devices; "
                                                 "expected a multiple of 4")


def test_eval_refuses_a_training_workdir_and_defaults_beside_it(setup, tmp_path):
  """Eval mode writes metrics.json: never over a training run's (the recipe's workdir is the training run's)."""
  root, model_dir, data = setup
  work = tmp_path / "run"
  (work / "checkpoints").mkdir(parents=True)
  (work / "metrics.json").write_text('{"final": {"mAP": 90.0}}\n')
  base = ["--config", "configs/market1501_vit.py", "--config.mode=eval", f"--config.checkpoint={model_dir}",
          f"--config.dataset.root={data}", "--config.dataset.check_counts=False"]
  out = _cli(*base, "--workdir", str(work))
  assert out.returncode == 2 and "holds a training run" in out.stderr.strip().splitlines()[-1], out.stderr[-1500:]
  assert json.loads((work / "metrics.json").read_text()) == {"final": {"mAP": 90.0}}
  out = _cli(*base, "--dry_run")
  assert out.returncode == 0 and "workdir workdirs/market1501_vit_clipreid_eval" in out.stdout, out.stdout[-500:]


def test_eval_with_reranking_on_fewer_items_than_k1(setup, tmp_path):
  """The default k1 = 50 on 33 query + gallery images: every list holds all items, as the official slices do."""
  root, model_dir, data = setup
  out = _cli("--config", "configs/market1501_vit.py", "--workdir", str(tmp_path / "w"), "--config.mode=eval",
             f"--config.checkpoint={model_dir}", f"--config.dataset.root={data}",
             "--config.dataset.check_counts=False", "--config.eval.batch_size=8", "--config.eval.rerank=True")
  assert out.returncode == 0, out.stderr[-2000:]
  assert 0 < json.loads((tmp_path / "w" / "metrics.json").read_text())["final"]["mAP"] <= 100


def test_eval_with_reranking_follows_k1_k2_and_lambda(setup, tmp_path):
  """eval.k1, eval.k2 and eval.lambda_value all reach the re-ranking (lambda 0: the Jaccard distance alone)."""
  root, model_dir, data = setup
  out = _cli("--config", "configs/market1501_vit.py", "--workdir", str(tmp_path / "w"), "--config.mode=eval",
             f"--config.checkpoint={model_dir}", f"--config.dataset.root={data}",
             "--config.dataset.check_counts=False", "--config.eval.batch_size=8", "--config.eval.rerank=True",
             "--config.eval.k1=8", "--config.eval.k2=3", "--config.eval.lambda_value=0.0")
  assert out.returncode == 0, out.stderr[-2000:]
  got = json.loads((tmp_path / "w" / "metrics.json").read_text())["final"]
  ds = get_dataset("market1501", data, check_counts=False)
  ext = FeatureExtractor(model_dir)
  qf = ext([ds.query.path(i) for i in range(len(ds.query))])
  gf = ext([ds.gallery.path(i) for i in range(len(ds.gallery))])
  labels = (ds.query.pids, ds.gallery.pids, ds.query.camids, ds.gallery.camids)
  want = evaluate_reranked(qf, gf, *labels, k1=8, k2=3, lambda_value=0.0)
  other = evaluate_reranked(qf, gf, *labels, k1=8, k2=3, lambda_value=0.3)
  assert abs(want.mAP - other.mAP) > 1e-3  # lambda changes the numbers on this data
  assert got["mAP"] / 100 == pytest.approx(want.mAP, abs=1e-6)
  assert got["R1"] / 100 == pytest.approx(want.rank(1), abs=1e-6)


def test_eval_without_a_valid_query(setup, tmp_path):
  """Every gallery image of each query's identity from the query's own camera: nothing left to evaluate."""
  root, model_dir, data = setup
  ds = get_dataset("market1501", data, check_counts=False)
  rows = lambda split, cams: "".join(f"{split.path(i)},{split.pids[i]},{c}\n" for i, c in enumerate(cams))
  custom = tmp_path / "custom"
  custom.mkdir()
  (custom / "train.csv").write_text(rows(ds.train, np.zeros(len(ds.train), int)))
  (custom / "query.csv").write_text(rows(ds.query, np.zeros(len(ds.query), int)))
  (custom / "gallery.csv").write_text(rows(ds.gallery, np.zeros(len(ds.gallery), int)))
  out = _cli("--config", "configs/market1501_vit.py", "--workdir", str(tmp_path / "w"), "--config.mode=eval",
             f"--config.checkpoint={model_dir}", "--config.dataset.name=custom", f"--config.dataset.root={custom}")
  assert out.returncode == 2, out.stderr[-1500:]
  assert "no query has a gallery image of its identity from another camera" in out.stderr.strip().splitlines()[-1]
  assert not (tmp_path / "w").exists()


def test_extract_sie_model_needs_cameras(setup, sie_model, tmp_path):
  """An SIE model embeds each image with its camera's row: a folder gives none (refused); a list gives them."""
  root, _, data = setup
  base = ["--config", "configs/market1501_vit.py", "--config.mode=extract", f"--config.checkpoint={sie_model}"]
  out = _cli(*base, f"--config.extract.input={data}/query", f"--config.extract.output={tmp_path / 'f1'}")
  assert out.returncode == 2, out.stderr[-1500:]
  assert "path,camera[,view]" in out.stderr.strip().splitlines()[-1] and not (tmp_path / "f1").exists()
  ds = get_dataset("market1501", data, check_counts=False)
  names, cams = [ds.query.path(i) for i in range(len(ds.query))], ds.query.camids
  (tmp_path / "list.txt").write_text("".join(f"{n},{c}\n" for n, c in zip(names, cams)))
  out = _cli(*base, f"--config.extract.input={tmp_path / 'list.txt'}", f"--config.extract.output={tmp_path / 'f2'}")
  assert out.returncode == 0, out.stderr[-1500:]
  feats = np.load(tmp_path / "f2" / "features.npy")
  ext = FeatureExtractor(sie_model)
  np.testing.assert_allclose(feats, ext(names, cams=cams), rtol=1e-5, atol=1e-6)
  assert np.abs(feats - ext(names, cams=np.zeros_like(cams))).max() > 1e-3  # the camera matters
  # The index is a list file again, ids included.
  assert (tmp_path / "f2" / "features_index.txt").read_text().splitlines()[0] == f"{names[0]},{cams[0]}"
  with pytest.raises(ValueError, match="this model uses SIE"):
    ext(names[:2])
  with pytest.raises(ValueError, match="expected ids in 0..2"):
    ext(names[:2], cams=[0, 3])
  with pytest.raises(ValueError, match="expected 2 integer ids"):
    ext(names[:2], cams=[0])
  # One image, one id: a plain number (it wanted [1]); for two images a number is still refused.
  np.testing.assert_array_equal(ext(names[0], cams=int(cams[0])), ext(names[:1], cams=cams[:1]))
  with pytest.raises(ValueError, match="expected 2 integer ids"):
    ext(names[:2], cams=1)


def test_extract_blames_an_unreadable_image_not_the_sie_ids(setup, tmp_path):
  """An image that cannot be read was reported with the SIE hint (`give extract.input as a list file of
  path,camera[,view] lines`), for any model; a view-SIE model given cameras only gets the hint for its views."""
  _, model_dir, data = setup
  folder = tmp_path / "crops"
  folder.mkdir()
  shutil.copy(sorted(pathlib.Path(data, "query").glob("*.jpg"))[0], folder / "a.jpg")
  (folder / "b.jpg").write_bytes(b"not a jpeg")
  base = ["--config", "configs/market1501_vit.py", "--config.mode=extract"]
  out = _cli(*base, f"--config.checkpoint={model_dir}", f"--config.extract.input={folder}",
             f"--config.extract.output={tmp_path / 'f'}")
  line = out.stderr.strip().splitlines()[-1]
  assert out.returncode == 2 and "b.jpg is not an image file" in line and "path,camera" not in line, line
  assert not (tmp_path / "f").exists()
  camview = next(v for v in variants() if v.parent.name == "vit" and v.name == "d_sie_camview")
  assert convert.main(convert_args(camview, tmp_path / "camview")) == 0
  (tmp_path / "list.txt").write_text(f"{folder / 'a.jpg'},0\n")
  out = _cli(*base, f"--config.checkpoint={tmp_path / 'camview'}", f"--config.extract.input={tmp_path / 'list.txt'}",
             f"--config.extract.output={tmp_path / 'g'}")
  line = out.stderr.strip().splitlines()[-1]
  assert out.returncode == 2 and line.startswith("error: extract.input: ") and "views:" in line, line
  assert "path,camera[,view]" in line, line


def test_extract_inputs(setup, tmp_path):
  """One image file as the input; a path with a comma in a list; an output that is a file (refused before any
  work); PIL images of any mode and gray / RGBA uint8 arrays, as their files would be read."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root, model_dir, data = setup
  base = ["--config", "configs/market1501_vit.py", "--config.mode=extract", f"--config.checkpoint={model_dir}"]
  image = sorted(pathlib.Path(data, "query").glob("*.jpg"))[0]
  comma = tmp_path / "a,b.jpg"
  shutil.copy(image, comma)
  (tmp_path / "list.txt").write_text(f"{image}\n{comma}\n")
  out = _cli(*base, f"--config.extract.input={image}", f"--config.extract.output={tmp_path / 'one'}")
  assert out.returncode == 0 and np.load(tmp_path / "one" / "features.npy").shape[0] == 1, out.stderr[-1500:]
  out = _cli(*base, f"--config.extract.input={tmp_path / 'list.txt'}", f"--config.extract.output={tmp_path / 'two'}")
  assert out.returncode == 0, out.stderr[-1500:]
  feats = np.load(tmp_path / "two" / "features.npy")
  np.testing.assert_allclose(feats[0], feats[1], rtol=1e-6, atol=1e-7)  # the same picture
  assert (tmp_path / "two" / "features_index.txt").read_text().splitlines() == [str(image), str(comma)]
  (tmp_path / "taken").write_text("")
  out = _cli(*base, f"--config.extract.input={image}", f"--config.extract.output={tmp_path / 'taken'}")
  assert out.returncode == 2 and "exists and is not a folder" in out.stderr.strip().splitlines()[-1]

  ext = FeatureExtractor(model_dir, batch_size=3)
  rgb = Image.open(image).convert("RGB")
  for mode in ("L", "RGBA", "P", "CMYK"):
    converted = rgb.convert(mode)
    np.testing.assert_allclose(ext([converted]), ext([converted.convert("RGB")]), rtol=1e-6, atol=1e-7)
  # A 16-bit gray image in memory is converted as its file is (one rule, `images.to_rgb`), not clipped to white.
  deep = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
  deep.save(tmp_path / "deep.png")
  np.testing.assert_allclose(ext([deep]), ext([str(tmp_path / "deep.png")]), rtol=1e-6, atol=1e-7)
  gray = np.asarray(rgb.convert("L"))
  np.testing.assert_allclose(ext([gray]), ext([np.repeat(gray[..., None], 3, axis=2)]), rtol=1e-6, atol=1e-7)
  rgba = np.asarray(rgb.convert("RGBA"))
  np.testing.assert_allclose(ext([rgba]), ext([np.asarray(rgb)]), rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="expected uint8"):
    ext([np.zeros((8, 4, 3), np.float32)])
  with pytest.raises(ValueError, match="batch_size: expected a positive integer"):
    FeatureExtractor(model_dir, batch_size=0)


def test_extractor_single_images_and_batches(setup):
  """`ext(x)`: a list, tuple, iterable or (N, H, W, C) uint8 batch gives one row per image; one path, PIL image or
  (H, W, C) / (H, W) array alone gives one row, not one per character or pixel row; an ambiguous array is refused."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  _, model_dir, data = setup
  ext = FeatureExtractor(model_dir, batch_size=3)
  dim = 128 + 64
  paths = [str(p) for p in sorted(pathlib.Path(data, "query").glob("*.jpg"))[:4]]
  pils = [Image.open(p).convert("RGB") for p in paths]
  arrays = np.stack([np.asarray(im) for im in pils])  # (4, 128, 64, 3): all the same size
  grays = np.stack([np.asarray(im.convert("L")) for im in pils])
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  listed = ext(paths)
  assert listed.shape == (4, dim)
  for one in (paths[0], pathlib.Path(paths[0]), pils[0], arrays[0], np.asarray(pils[0].convert("RGBA"))):
    assert ext(one).shape == (1, dim), type(one)
    close(ext(one), listed[:1])
  close(ext(grays[0]), ext([grays[0]]))  # (H, W): one gray image
  close(ext(grays[0][..., None]), ext([grays[0]]))  # (H, W, 1)
  close(ext(arrays), listed)  # (N, H, W, 3) batch, over two batches of 3
  close(ext(tuple(paths)), listed)
  close(ext(iter(paths)), listed)
  close(ext(np.asarray(paths)), listed)  # a numpy array of paths
  close(ext(np.asarray(paths, dtype=object)[:, None]), listed)  # a column of paths (was read as one gray image)
  close(ext(np.asarray([str(p).encode() for p in paths])), listed)  # bytes paths (were refused)
  gray_rows = ext(list(grays))
  assert gray_rows.shape == (4, dim)
  close(ext(grays[..., None]), gray_rows)  # (N, H, W, 1): N gray images
  # (N, H, W) reads as N gray images or one (H, W, C) image: refused, saying how to pass either.
  with pytest.raises(ValueError, match=r"\(N, H, W, 1\) or a list of \(H, W\) arrays"):
    ext(grays)
  with pytest.raises(ValueError, match=r"got an array of shape \(128,\)"):
    ext(arrays[0, :, 0, 0])
  with pytest.raises(TypeError, match="expected a list of images"):
    ext(3)
  # As before: empty inputs, a list mixing kinds, a gray (H, W) array in a list.
  assert ext([]).shape == (0, dim) and ext([]).dtype == np.float32
  assert ext(arrays[:0]).shape == (0, dim)
  mixed = ext([paths[0], arrays[1], pils[2], grays[3]])
  close(mixed[:3], listed[:3])
  close(mixed[3:], gray_rows[3:])


def test_data_warnings_are_one_line_each(setup, tmp_path):
  """A data warning (here: a file whose name is not a Market name, skipped) reads like the errors, not as Python's
  `file.py:LINE: DataWarning:` pair of lines with the source line."""
  root, model_dir, data = setup
  copy = shutil.copytree(data, tmp_path / "data")
  shutil.copy(next((copy / "query").iterdir()), copy / "query" / "notes_c1.jpg")
  out = _cli("--config", "configs/market1501_vit.py", "--workdir", str(tmp_path / "w"), "--config.mode=eval",
             f"--config.checkpoint={model_dir}", f"--config.dataset.root={copy}", "--config.eval.batch_size=8",
             "--config.dataset.check_counts=False")
  assert out.returncode == 0, out.stderr[-2000:]
  warned = [l for l in out.stderr.splitlines() if "notes_c1.jpg" in l]
  assert warned and all(l.startswith("warning: market1501: skipped 1 files") for l in warned), out.stderr[-2000:]
  assert "DataWarning" not in out.stderr, out.stderr[-2000:]


def test_extract_again_replaces_the_pair_and_a_failed_write_keeps_the_old_one(setup, tmp_path, monkeypatch, capsys):
  """A second extract into the same folder says it replaced the previous files; one whose index cannot be written
  leaves the previous features.npy and index together (it used to replace features.npy first)."""
  from clipreid_jax import train  # pylint: disable=g-import-not-at-top
  from clipreid_jax.config_defaults import recipe  # pylint: disable=g-import-not-at-top
  _, model_dir, data = setup
  images = sorted(str(p) for p in pathlib.Path(data, "query").glob("*.jpg"))
  (tmp_path / "two.txt").write_text("".join(f"{p}\n" for p in images[:2]))
  (tmp_path / "three.txt").write_text("".join(f"{p}\n" for p in images[:3]))
  config = recipe("market1501")
  config.mode, config.checkpoint, config.extract.output = "extract", str(model_dir), str(tmp_path / "out")
  config.extract.input = str(tmp_path / "two.txt")
  inference.extract_to_files(config)
  assert "replaced" not in capsys.readouterr().out
  config.extract.input = str(tmp_path / "three.txt")
  inference.extract_to_files(config)
  assert "replaced the previous features.npy and features_index.txt" in capsys.readouterr().out
  assert np.load(tmp_path / "out" / "features.npy").shape[0] == 3
  config.extract.input = str(tmp_path / "two.txt")
  real_write_text = pathlib.Path.write_text

  def full_disk(self, *args, **kwargs):
    if self.name.startswith(".features_index"):
      raise OSError(28, "No space left on device")
    return real_write_text(self, *args, **kwargs)

  monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
  with pytest.raises(train.ConfigError, match=r"extract.output: cannot write .* \(No space left on device\)"):
    inference.extract_to_files(config)
  assert np.load(tmp_path / "out" / "features.npy").shape[0] == 3  # the previous pair, together
  assert len((tmp_path / "out" / "features_index.txt").read_text().splitlines()) == 3
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["features.npy", "features_index.txt"]


def test_extract_camera_and_view_ids_per_image(setup, tmp_path):
  """A camera+view SIE model (3 cameras x 2 views): each image is embedded with its own ids in every batch, views
  are checked against the view table, and a `path,camera,view` list (here with a header) reads its columns in that
  order."""
  root, _, data = setup
  variant = next(v for v in variants() if v.parent.name == "vit" and v.name == "d_sie_camview")
  model_dir = root / "model_camview"
  if not model_dir.exists():
    assert convert.main(convert_args(variant, model_dir)) == 0
  # Eval on a dataset without views (every image would take view row 0): refused, as other cameras are.
  out = _cli("--config", "configs/market1501_vit.py", "--workdir", str(tmp_path / "views"), "--config.mode=eval",
             f"--config.checkpoint={model_dir}", f"--config.dataset.root={data}", "--config.dataset.check_counts=False")
  assert out.returncode == 2 and not (tmp_path / "views").exists(), out.stderr[-1500:]
  assert out.stderr.strip().splitlines()[-1].startswith(f"error: checkpoint: {model_dir} has an SIE table for 2 views, "
                                                        "but dataset market1501 at "), out.stderr[-500:]
  names = sorted(str(p) for p in pathlib.Path(data, "query").glob("*.jpg"))[:5]
  cams, views = np.array([0, 2, 1, 2, 0]), np.array([1, 0, 1, 1, 0])
  ext = FeatureExtractor(model_dir, batch_size=2)  # three batches: 2, 2, 1
  feats = ext(names, cams=cams, views=views)
  one_by_one = np.concatenate([ext([n], cams=[c], views=[v]) for n, c, v in zip(names, cams, views)])
  np.testing.assert_allclose(feats, one_by_one, rtol=1e-5, atol=1e-6)
  assert np.abs(feats - ext(names, cams=cams, views=1 - views)).max() > 1e-3  # the view matters
  with pytest.raises(ValueError, match=r"views: expected ids in 0..1 \(the model's SIE table\), got 2"):
    ext(names[:1], cams=[0], views=[2])  # a valid camera id, past the 2 views
  with pytest.raises(ValueError, match=r"cams: expected ids in 0..2 \(the model's SIE table\), got 3"):
    ext(names[:1], cams=[3], views=[0])  # past the 3 cameras, though inside the 6-row camera x view table
  rows = "".join(f"{n},{c},{v}\n" for n, c, v in zip(names, cams, views))
  (tmp_path / "list.txt").write_text("path,cam,view\n" + rows)  # a header row, in the custom lists' spellings
  (tmp_path / "bad.txt").write_text("path,identity\n" + rows)
  with pytest.raises(ValueError, match=r"bad.txt:1: header 'path,identity': expected 'path', 'path,camera' or"):
    inference.list_images(str(tmp_path / "bad.txt"))
  # Ids that are not integers are named as such (they used to read as part of a path that does not exist).
  (tmp_path / "text_ids.txt").write_text(f"path,camera,view\n{names[0]},0,1\n{names[1]},cam3,1\n")
  with pytest.raises(ValueError, match=r"text_ids.txt:3: 'cam3,1' after the image .*: expected integer camera"):
    inference.list_images(str(tmp_path / "text_ids.txt"))
  (tmp_path / "missing.txt").write_text(f"{names[0]}.gone,0\n")
  with pytest.raises(ValueError, match=r"missing.txt:1: lists .*\.jpg\.gone, which does not exist"):
    inference.list_images(str(tmp_path / "missing.txt"))
  out = _cli("--config", "configs/market1501_vit.py", "--config.mode=extract", f"--config.checkpoint={model_dir}",
             f"--config.extract.input={tmp_path / 'list.txt'}", f"--config.extract.output={tmp_path / 'f'}")
  assert out.returncode == 0, out.stderr[-1500:]
  np.testing.assert_allclose(np.load(tmp_path / "f" / "features.npy"), feats, rtol=1e-5, atol=1e-6)


def test_extract_folder_skips_hidden_entries(tmp_path):
  """A folder copied from macOS holds `._NAME.jpg` resource forks beside the images (and a tool may keep
  `.thumbnails/`): extraction stopped at the first with `is not an image file`; the dataset readers skip them."""
  (tmp_path / "crops" / "sub").mkdir(parents=True)
  (tmp_path / "crops" / ".thumbnails").mkdir()
  for name in ("a.jpg", "sub/b.png", "._a.jpg", ".thumbnails/a.jpg", "sub/._b.png"):
    (tmp_path / "crops" / name).write_bytes(b"x")
  listed = inference.list_images(str(tmp_path / "crops"))
  assert listed.files == [str(tmp_path / "crops" / "a.jpg"), str(tmp_path / "crops" / "sub" / "b.png")]
  hidden = tmp_path / ".cache" / "crops"  # a hidden folder above the input is the user's choice, not skipped
  hidden.mkdir(parents=True)
  (hidden / "c.jpg").write_bytes(b"x")
  assert inference.list_images(str(hidden)).files == [str(hidden / "c.jpg")]


def test_list_file_lines_take_at_most_two_ids(tmp_path):
  """A list line is `path`, `path,camera` or `path,camera,view`: a third id column is refused, not read as a
  camera and a view with one column dropped."""
  (tmp_path / "a.jpg").write_bytes(b"x")
  (tmp_path / "two.txt").write_text("a.jpg,1,0\n")
  listed = inference.list_images(str(tmp_path / "two.txt"))
  assert listed.files == [str(tmp_path / "a.jpg")] and listed.cams.tolist() == [1] and listed.views.tolist() == [0]
  (tmp_path / "three.txt").write_text("a.jpg,1,0,2\n")
  with pytest.raises(ValueError, match=rf"three.txt:1: 3 ids after the image {tmp_path / 'a.jpg'}: expected at most "
                     r"two \(camera, view\)$"):
    inference.list_images(str(tmp_path / "three.txt"))


def test_extract_folder_follows_symlinked_folders(tmp_path):
  """Crops gathered with `ln -s` (a camera's folder linked into the input): Path.rglob does not enter a symlinked
  folder, so its images were left out of features.npy without a word. A link back up the tree is walked once."""
  (tmp_path / "cam1").mkdir()
  (tmp_path / "cam1" / "a.jpg").write_bytes(b"x")
  (tmp_path / "crops").mkdir()
  (tmp_path / "crops" / "b.jpg").write_bytes(b"x")
  (tmp_path / "crops" / "cam1").symlink_to(tmp_path / "cam1", target_is_directory=True)
  (tmp_path / "crops" / "loop").symlink_to(tmp_path / "crops", target_is_directory=True)
  listed = inference.list_images(str(tmp_path / "crops"))
  assert listed.files == [str(tmp_path / "crops" / "b.jpg"), str(tmp_path / "crops" / "cam1" / "a.jpg")]


def test_eval_on_a_test_only_custom_set(setup, tmp_path):
  """Cross-domain evaluation on a set that has only query and gallery (a custom dataset without train.csv): the
  numbers equal those of the same images read as Market-1501; training on it is refused in one line."""
  root, model_dir, data = setup
  ds = get_dataset("market1501", data, check_counts=False)
  custom = tmp_path / "target"
  custom.mkdir()
  for name in ("query", "gallery"):
    split = getattr(ds, name)
    (custom / f"{name}.csv").write_text("path,identity,camera\n" + "".join(
        f"{split.path(i)},{split.pids[i]},{split.camids[i]}\n" for i in range(len(split))))
  common = ["--config", "configs/market1501_vit.py", "--config.mode=eval", f"--config.checkpoint={model_dir}",
            "--config.dataset.check_counts=False"]
  out = _cli(*common, "--workdir", str(tmp_path / "custom"), "--config.dataset.name=custom",
             f"--config.dataset.root={custom}")
  assert out.returncode == 0, out.stderr[-1500:]
  ref = _cli(*common, "--workdir", str(tmp_path / "market"), f"--config.dataset.root={data}")
  assert ref.returncode == 0, ref.stderr[-1500:]
  got, want = (json.loads((tmp_path / w / "metrics.json").read_text()) for w in ("custom", "market"))
  assert got["final"] == want["final"] and got["final"]["mAP"] > 0
  assert (got["evaluated"]["dataset"], want["evaluated"]["dataset"]) == ("custom", "market1501")
  out = _cli("--config", "tests/tiny_run_config.py:" + str(tmp_path / "unused"), "--workdir", str(tmp_path / "t"),
             "--config.dataset.name=custom", f"--config.dataset.root={custom}")
  assert out.returncode == 2 and not (tmp_path / "t").exists()
  assert out.stderr.strip().splitlines()[-1] == (f"error: custom: {custom} has no training split (train.csv); "
                                                 "training needs one (eval and extract modes do not)")


def test_eval_blames_an_unreadable_image_not_the_checkpoint(setup, tmp_path):
  """A gallery image that cannot be decoded during evaluation was reported as `checkpoint: DIR: cannot decode ...`."""
  _, model_dir, data = setup
  copy = tmp_path / "data"
  shutil.copytree(data, copy)
  broken = [p for p in sorted((copy / "bounding_box_test").glob("*.jpg")) if p.name[:4] not in ("-1_c", "0000")][0]
  broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
  out = _cli("--config", "configs/market1501_vit.py", "--workdir", str(tmp_path / "w"), "--config.mode=eval",
             f"--config.checkpoint={model_dir}", f"--config.dataset.root={copy}", "--config.dataset.check_counts=False")
  assert out.returncode == 2, out.stderr[-1500:]
  line = out.stderr.strip().splitlines()[-1]
  assert line.startswith("error: ") and broken.name in line and "checkpoint" not in line, line
  assert not (tmp_path / "w" / "metrics.json").exists()


def test_extractor_refuses_an_empty_image(setup):
  """A tracker's crop of a box outside the frame is (0, W) or (H, 0): it was resized to a black image and given a
  feature, which then matched other empty crops; now it is refused, naming its position."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  _, model_dir, _ = setup
  ext = FeatureExtractor(model_dir, batch_size=2)
  crop = np.zeros((8, 4, 3), np.uint8)
  empties = [(np.zeros((0, 4, 3), np.uint8), 2), (np.zeros((8, 0), np.uint8), 2), (Image.new("RGB", (0, 5)), 2),
             (np.zeros((3, 0, 0, 3), np.uint8), 0)]  # the last: a batch of empty crops
  for empty, at in empties:
    images = [crop, crop, empty] if at else empty
    with pytest.raises(ValueError, match=rf"images\[{at}\]: empty image of \d+x\d+ pixels"):
      ext(images)
  assert ext([crop]).shape[0] == 1 and ext(np.zeros((0, 8, 4, 3), np.uint8)).shape[0] == 0


def test_evaluation_record_names_what_vehicleid_numbers_depend_on(tmp_path):
  """VehicleID's numbers depend on the test list, the trials and the seed that draws them; re-ranking on its
  parameters; all are kept beside the numbers, as are the checkpoint and the data read (the pack where one is)."""
  from clipreid_jax import config_defaults  # pylint: disable=g-import-not-at-top
  c = config_defaults.recipe("vehicleid", vehicle=True)
  c.checkpoint, c.dataset.packed_dir, c.dataset.test_size, c.eval.rerank, c.eval.k1 = "m", str(tmp_path), 1600, True, 20
  assert train.evaluation_record(c, c.checkpoint) == {
      "checkpoint": str(pathlib.Path("m").resolve()), "dataset": "vehicleid", "data": str(tmp_path.resolve()),
      "flip": False, "rerank": {"k1": 20, "k2": 15, "lambda_value": 0.3}, "test_size": 1600, "trials": 10,
      "seed": 1234}


def test_extractor_names_the_bad_image_and_reads_bytes_paths(setup):
  """An element that is not an image is named by its position (a tracker's list of crops); a path given as bytes
  (os.fsencode) is read as the same path, not iterated byte by byte."""
  root, model_dir, data = setup
  ext = FeatureExtractor(model_dir, batch_size=2)
  crop = np.zeros((8, 4, 3), np.uint8)
  for bad, expected in ((None, "got NoneType"), (crop.astype(np.float32), "got dtype float32"),
                        (np.zeros((8, 4, 2), np.uint8), "expected an (H, W, 3), (H, W) or (H, W, 4) array, got shape "
                         "(8, 4, 2)")):
    with pytest.raises(ValueError, match=r"^images\[2\]: .*" + re.escape(expected)):
      ext([crop, crop, bad])
  path = sorted(pathlib.Path(data, "query").glob("*.jpg"))[0]
  np.testing.assert_array_equal(ext(os.fsencode(path)), ext(str(path)))
  np.testing.assert_array_equal(ext([os.fsencode(path), crop]), ext([str(path), crop]))
