"""Packed (tfds array_record) datasets give exactly the records and pixels of the folder source."""
import json

import numpy as np
import pytest
from PIL import Image

from clipreid_jax import data

packed = pytest.importorskip("clipreid_jax.data.packed")


@pytest.fixture(scope="module")
def market(tmp_path_factory):
  root = tmp_path_factory.mktemp("market")
  data.write_synthetic_market(root, num_train_ids=6, num_test_ids=3, imgs_per_id=4, num_cams=2, size=(32, 16), seed=1)
  out = tmp_path_factory.mktemp("tfds")
  assert packed.prepare("market1501", root, out) == "reid_packed/market1501"
  return root, out


def _same_batches(a, b):
  return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                  for x, y in zip(a, b))


def test_packed_records_and_pixels_equal_the_folder(market):
  root, out = market
  folder, pack = data.get_dataset("market1501", root), packed.load_packed("market1501", out)
  assert pack.name == "market1501" and pack.stats() == folder.stats()
  for s in ("train", "query", "gallery"):
    a, b = getattr(pack, s), getattr(folder, s)
    assert a.same_records(b)
    for i in range(len(a)):
      np.testing.assert_array_equal(np.asarray(a.images[i]), np.asarray(data.read_image(b.path(i))))


def test_packed_source_feeds_the_same_pipeline(market):
  root, out = market
  folder, pack = data.get_dataset("market1501", root), packed.load_packed("market1501", out)
  kw = dict(image_size=(32, 16), num_ids=3, num_instances=2, seed=4, epoch=1)
  assert _same_batches(list(data.train_loader(pack.train, **kw)), list(data.train_loader(folder.train, **kw)))
  kw = dict(image_size=(32, 16), batch_size=8, process_index=1, process_count=2)
  assert _same_batches(list(data.eval_loader(pack.query, pack.gallery, **kw)),
                       list(data.eval_loader(folder.query, folder.gallery, **kw)))


def test_custom_with_png_and_grayscale(tmp_path):
  (tmp_path / "im").mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (20, 10, 3), dtype=np.uint8)).save(tmp_path / "im" / "a.png")
  Image.fromarray(rng.integers(0, 255, (20, 10), dtype=np.uint8)).save(tmp_path / "im" / "b.jpg")
  Image.fromarray(rng.integers(0, 255, (20, 10, 3), dtype=np.uint8)).convert("CMYK").save(tmp_path / "im" / "c.jpg")
  (tmp_path / "train.csv").write_text("im/a.png,x,1\nim/b.jpg,y,2\n")
  (tmp_path / "query.csv").write_text("im/c.jpg,x,1\n")
  (tmp_path / "gallery.csv").write_text("im/a.png,x,2\nim/b.jpg,y,1\n")
  from clipreid_jax.data import prepare
  assert prepare.main(["custom", "--manual_dir", str(tmp_path), "--data_dir", str(tmp_path / "out")]) == 0
  folder, pack = data.get_dataset("custom", tmp_path), packed.load_packed("custom", tmp_path / "out")
  for s in ("train", "query", "gallery"):
    a, b = getattr(pack, s), getattr(folder, s)
    assert a.same_records(b)
    for i in range(len(a)):
      np.testing.assert_array_equal(np.asarray(a.images[i]), np.asarray(data.read_image(b.path(i))))


def test_missing_packed_dataset(tmp_path):
  with pytest.raises(data.DatasetNotFoundError, match="python -m clipreid_jax.data.prepare vehicleid_1600"):
    packed.load_packed("vehicleid", tmp_path, test_size=1600)


def test_prepare_cli_reports_data_errors(tmp_path, capsys):
  from clipreid_jax.data import prepare
  assert prepare.main(["market1501", "--manual_dir", str(tmp_path / "none"), "--data_dir", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "expected layout" in err[0]


def test_prepare_cli_prints_stats(market, capsys):
  from clipreid_jax.data import prepare
  root, out = market
  assert prepare.main(["market1501", "--manual_dir", str(root), "--data_dir", str(out)]) == 0  # already prepared
  stats = json.loads(capsys.readouterr().out)
  assert stats["tfds_name"] == "reid_packed/market1501" and stats["num_train_pids"] == 6


def test_trainer_reads_the_packed_copy(market):
  """--config.dataset.packed_dir: training and evaluation read the pack (no folder needed on the hosts)."""
  from clipreid_jax import config_defaults, train  # pylint: disable=g-import-not-at-top
  root, out = market
  config = config_defaults.official("market1501", config_defaults.VIT)
  config.dataset.root, config.dataset.packed_dir = "/nonexistent", str(out)
  pack, folder = train.load_dataset(config), data.get_dataset("market1501", root)
  assert all(getattr(pack, s).same_records(getattr(folder, s)) for s in ("train", "query", "gallery"))
  assert pack.fingerprint() == folder.fingerprint()  # so a run may switch between the two when it restarts
  assert pack.train.images is not None  # images come from the array_record files


def test_prepare_cli_unknown_test_size(tmp_path, capsys):
  from clipreid_jax.data import prepare
  argv = ["vehicleid", "--manual_dir", str(tmp_path), "--data_dir", str(tmp_path), "--opt", "test_size=1200"]
  assert prepare.main(argv) == 2  # was a KeyError traceback
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no packed configuration 'vehicleid_1200'" in err[0]


def test_prepare_refuses_a_stale_pack(tmp_path):
  """tfds keeps an existing pack: packing a changed folder again must not report the old pack as this one."""
  root = tmp_path / "m"
  data.write_synthetic_market(root, num_train_ids=4, num_test_ids=2, imgs_per_id=4, num_cams=2, size=(32, 16), seed=2)
  packed.prepare("market1501", root, tmp_path / "tfds")
  victim = sorted((root / "bounding_box_train").iterdir())[0]
  victim.unlink()
  with pytest.raises(data.DataError, match="holds other records than .* in split train .*delete it to pack again"):
    packed.prepare("market1501", root, tmp_path / "tfds")


@pytest.mark.parametrize("split_dir", ["query", "bounding_box_test"])
def test_prepare_refuses_a_pack_stale_in_the_test_splits(tmp_path, split_dir):
  """The query and gallery records are checked too: an old pack must not be reported as this folder's."""
  root = tmp_path / "m"
  data.write_synthetic_market(root, num_train_ids=4, num_test_ids=2, imgs_per_id=4, num_cams=2, size=(32, 16), seed=2)
  packed.prepare("market1501", root, tmp_path / "tfds")
  sorted((root / split_dir).glob("*.jpg"))[-1].unlink()  # not the junk (-1) image the reader skips
  split = "query" if split_dir == "query" else "gallery"
  with pytest.raises(data.DataError, match=f"holds other records than .* in split {split} "):
    packed.prepare("market1501", root, tmp_path / "tfds")


def test_prepare_names_an_image_that_does_not_decode(tmp_path):
  """A broken image fails at packing time, naming the file, not in the middle of a training run."""
  root = tmp_path / "m"
  data.write_synthetic_market(root, num_train_ids=4, num_test_ids=2, imgs_per_id=4, num_cams=2, size=(32, 16), seed=2)
  victim = sorted((root / "bounding_box_train").glob("*.jpg"))[3]
  victim.write_bytes(b"not a picture at all")
  with pytest.raises(data.ImageReadError, match=f"{victim.name} is not an image file"):
    packed.prepare("market1501", root, tmp_path / "tfds")
  with pytest.raises(data.DatasetNotFoundError, match="not prepared"):
    packed.load_packed("market1501", tmp_path / "tfds")


def test_config_names_of_vehicleid_test_sizes():
  assert packed.config_name("VehicleID") == packed.config_name("vehicleid", test_size=800) == "vehicleid"
  assert packed.config_name("vehicleid", test_size=2400) == "vehicleid_2400"
  assert packed.config_name("vehicleid_1600") == "vehicleid_1600"
  # A size without a config is named as such (and refused by prepare), never packed as the 800 one.
  assert packed.config_name("vehicleid", test_size=400) == "vehicleid_400"


_SLOW_PREPARE = """
import sys, time
from clipreid_jax.data import images, prepare
read = images.read_bytes
images.read_bytes = lambda path: (time.sleep(0.2), read(path))[1]  # slow enough to be killed mid-pack
sys.exit(prepare.main(sys.argv[1:]))
"""


def test_prepare_killed_removes_its_partial_pack(tmp_path):
  """SIGTERM mid-pack: exit 143, one line, no `incomplete.*` folder left (a SIGKILL'ed one is named next time)."""
  import signal
  import subprocess
  import sys
  import time
  root, out = tmp_path / "m", tmp_path / "tfds"
  data.write_synthetic_market(root, num_train_ids=4, num_test_ids=2, imgs_per_id=4, num_cams=2, size=(32, 16), seed=2)
  proc = subprocess.Popen([sys.executable, "-c", _SLOW_PREPARE, "market1501", "--manual_dir", str(root),
                           "--data_dir", str(out)], stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while not list(out.glob("reid_packed/market1501/incomplete.*")) and time.time() < deadline:
    time.sleep(0.1)
  time.sleep(0.5)  # inside the split generators
  proc.send_signal(signal.SIGTERM)
  err = proc.communicate(timeout=120)[1]
  assert proc.returncode == 143, err
  assert err.strip().splitlines()[-1].startswith("error: interrupted; no partial pack is left under")
  assert not list(out.glob("reid_packed/market1501/incomplete.*"))
  with pytest.raises(data.DatasetNotFoundError, match="not prepared"):
    packed.load_packed("market1501", out)
  # A folder left by a kill that could not clean up (SIGKILL) is named, not deleted: another host may own it.
  left = out / "reid_packed" / "market1501" / "incomplete.ABC123_1.0.0"
  left.mkdir(parents=True)
  with pytest.warns(data.DataWarning, match=r"incomplete.ABC123_1.0.0: left by an interrupted prepare"):
    packed.prepare("market1501", root, out)
  assert left.is_dir() and packed.load_packed("market1501", out).stats() == data.get_dataset("market1501", root).stats()


def test_a_truncated_pack_is_one_line(market, tmp_path):
  """A pack cut short (a copy that stopped, a full disk): one line naming the pack and what to do, not
  array_record's RuntimeError traceback."""
  import shutil  # pylint: disable=g-import-not-at-top
  _, out = market
  copy = tmp_path / "tfds"
  shutil.copytree(out, copy)
  gallery = next(copy.rglob("reid_packed-gallery.array_record-*"))
  gallery.write_bytes(gallery.read_bytes()[: gallery.stat().st_size // 3])
  try:
    pack = packed.load_packed("market1501", copy)
    for i in range(len(pack.gallery)):
      pack.gallery.images[i]
  except data.DataError as e:
    message = str(e)
  else:
    raise AssertionError("a truncated pack read without error")
  assert "\n" not in message and "corrupt or truncated: delete it and prepare it again" in message, message
  assert message.startswith("packed market1501")


def test_prepare_that_fails_leaves_nothing(tmp_path, capsys):
  """A failed prepare (a bad image) left tfds' downloads/ and metadata folders and an empty pack folder behind; a
  test-only custom set crashed in tfds ("No examples were yielded"); a file as --data_dir was a traceback."""
  from clipreid_jax.data import prepare
  root, out = tmp_path / "m", tmp_path / "tfds"
  data.write_synthetic_market(root, num_train_ids=4, num_test_ids=2, imgs_per_id=4, num_cams=2, size=(32, 16), seed=2)
  sorted((root / "bounding_box_train").glob("*.jpg"))[1].write_bytes(b"not an image")
  assert prepare.main(["market1501", "--manual_dir", str(root), "--data_dir", str(out)]) == 2
  assert "is not an image file" in capsys.readouterr().err and not out.exists()
  custom = tmp_path / "c"
  custom.mkdir()
  image = sorted((root / "query").glob("*.jpg"))[0]
  for split in ("query", "gallery"):
    (custom / f"{split}.csv").write_text(f"{image},1,{split}\n")
  assert prepare.main(["custom", "--manual_dir", str(custom), "--data_dir", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == (f"error: packed custom: {custom} has no training split; a pack holds all three splits (evaluate "
                     "a test-only set from its folder)") and not out.exists()
  out.write_text("a file")
  data.write_synthetic_market(root / "ok", num_train_ids=4, num_test_ids=2, imgs_per_id=4, num_cams=2, size=(32, 16))
  assert prepare.main(["market1501", "--manual_dir", str(root / "ok"), "--data_dir", str(out)]) == 2
  assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: --data_dir: {out} is a file; expected a folder " \
      "for the pack"


def test_a_folder_inside_the_pack_names_the_packs_root(market):
  """packed_dir = .../reid_packed/market1501/1.0.0 told the user to prepare a pack inside the pack."""
  _, out = market
  for inner in (out / "reid_packed", out / "reid_packed" / "market1501" / "1.0.0"):
    with pytest.raises(data.DatasetNotFoundError, match=f"is a folder inside a pack; expected the folder given to "
                       f"prepare --data_dir, which holds reid_packed/ \\({out}\\)"):
      packed.load_packed("market1501", inner)


def test_same_records_compares_every_label():
  """`Split.same_records` (prepare's check that an existing pack holds the folder's records) compares the camera and
  view ids too: a VeRi pack made without keypoint files (every view 0) is not the records asked for with them. The
  root may differ (a moved folder)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from clipreid_jax.data.records import Split  # pylint: disable=g-import-not-at-top
  ids = lambda *v: np.asarray(v, np.int32)
  split = Split("/a", np.asarray(["x.jpg", "y.jpg"]), ids(0, 1), ids(0, 0), ids(0, 0))
  assert split.same_records(dataclasses.replace(split, root="/moved"))
  for field in ("pids", "camids", "viewids"):
    assert not split.same_records(dataclasses.replace(split, **{field: ids(0, 2)})), field
  assert not split.same_records(dataclasses.replace(split, relpaths=np.asarray(["x.jpg", "z.jpg"])))


def test_a_pack_refuses_reader_options_it_was_not_prepared_with(tmp_path):
  """gallery_seed (VehicleID) and keypoint_dir (VeRi) are baked into a pack's records at prepare time: a run asking
  for others is refused in one line naming the key, not served the pack's silently."""
  import warnings  # pylint: disable=g-import-not-at-top
  from clipreid_jax import config_defaults, train  # pylint: disable=g-import-not-at-top
  from test_data_readers import make_vehicleid, make_veri  # pylint: disable=g-import-not-at-top
  make_vehicleid(tmp_path / "vid")
  make_veri(tmp_path / "veri_plain", keypoints=False)
  make_veri(tmp_path / "veri_kp", keypoints=True)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", data.DataWarning)  # the tiny sets' counts differ from the published ones
    packed.prepare("vehicleid", tmp_path / "vid", tmp_path / "p_vid", gallery_seed=2)
    packed.prepare("veri", tmp_path / "veri_plain", tmp_path / "p_plain")
    packed.prepare("veri", tmp_path / "veri_kp", tmp_path / "p_kp", keypoint_dir=str(tmp_path / "veri_kp" / "VeRi"))
    assert len(packed.load_packed("vehicleid", tmp_path / "p_vid", gallery_seed=2).query)
    with pytest.raises(data.DataError, match=r"^dataset.gallery_seed: 0, but the pack under .* was prepared with "
                       r"gallery_seed 2; expected 2"):
      packed.load_packed("vehicleid", tmp_path / "p_vid", gallery_seed=0)
    with pytest.raises(data.DataError, match=r"^dataset.keypoint_dir: .* given, but the pack under .* was prepared "
                       r"without keypoint files"):
      packed.load_packed("veri", tmp_path / "p_plain", keypoint_dir=str(tmp_path / "veri_kp"))
    assert packed.load_packed("veri", tmp_path / "p_kp", keypoint_dir="/elsewhere").train.viewids.any()
    assert not packed.load_packed("veri", tmp_path / "p_plain").train.viewids.any()  # no option asked: no check
    # Through the trainer's config: the recipe's default seed (0) against the pack's 2.
    config = config_defaults.official("vehicleid", config_defaults.VIT)
    config.dataset.root, config.dataset.packed_dir = "/nonexistent", str(tmp_path / "p_vid")
    with pytest.raises(data.DataError, match="^dataset.gallery_seed: 0"):
      train.load_dataset(config)
    config.dataset.gallery_seed = 2
    assert train.load_dataset(config).name == "vehicleid"
