"""`--config.mode=eval` and `--config.mode=extract` end to end through the CLI, on a converted official
checkpoint (the golden tiny ViT) and a small Market-layout dataset, against a reference computation."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from clipreid_jax import convert
from clipreid_jax.data import get_dataset
from clipreid_jax.data.synthetic import write_synthetic_market
from clipreid_jax.evaluation import eval_func
from clipreid_jax.inference import FeatureExtractor
from golden_reid import convert_args, variants


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "clipreid_jax.main", *args], capture_output=True, text=True,
                        timeout=600, env=dict(os.environ))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  variant = next(v for v in variants() if v.parent.name == "vit" and (v / "model_state.pth").is_file())
  model_dir = root / "model"
  assert convert.main(convert_args(variant, model_dir)) == 0
  data = write_synthetic_market(root / "market", num_train_ids=6, num_test_ids=6, imgs_per_id=5, num_cams=3,
                                size=(128, 64), seed=3)
  return root, model_dir, data


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
  got = {k: v / 100 for k, v in json.loads((work / "metrics.json").read_text())["final"].items()
         if k in ("mAP", "R1", "R5")}  # metrics.json is in percent
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
