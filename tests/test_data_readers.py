"""Dataset readers on small trees in each official layout: counts, file-name rules, labels, warnings."""
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from clipreid_jax import data
from clipreid_jax.data import __main__ as inspect_cli
from clipreid_jax.data import published, registry

REPO = pathlib.Path(__file__).resolve().parents[1]


def _jpeg_bytes() -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (4, 8), (120, 30, 200)).save(buf, "JPEG")
  return buf.getvalue()


JPEG = _jpeg_bytes()


def touch_images(folder: pathlib.Path, names) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  for name in names:
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(JPEG)


def market_names(pid: int, cams, start: int = 0):
  return [f"{pid:04d}_c{c}s1_{start + i:06d}_01.jpg" if pid >= 0 else f"-1_c{c}s1_{start + i:06d}_01.jpg"
          for i, c in enumerate(cams)]


def make_market(root: pathlib.Path) -> pathlib.Path:
  d = root / "Market-1501-v15.09.15"
  touch_images(d / "bounding_box_train",
               market_names(2, [1, 2]) + market_names(7, [3]) + market_names(10, [4, 5, 6]) + market_names(-1, [1]))
  touch_images(d / "query", market_names(3, [1]) + market_names(5, [2, 3]))
  touch_images(d / "bounding_box_test", market_names(3, [2, 4]) + market_names(5, [5]) + market_names(0, [1, 6])
               + market_names(-1, [2, 3]) + ["bad_name.jpg", "12-3_c1s1_000451_03.jpg"])
  (d / "bounding_box_test" / "Thumbs.db").write_bytes(b"x")
  return d


def test_market1501_rules(tmp_path):
  make_market(tmp_path)
  with pytest.warns(data.DataWarning) as record:
    ds = data.get_dataset("market1501", tmp_path)
  messages = " | ".join(str(w.message) for w in record)
  assert "num_train_pids 3 (published 751)" in messages and "num_gallery_imgs 5 (published 15913)" in messages
  # .jpg files not named <pid>_c<cam> are skipped with a warning; '12-3_c1...' too (it matches the official
  # pattern, then int() fails: it used to crash the reader).
  assert "skipped 2 files in bounding_box_test" in messages
  assert ds.stats() == dict(num_train_pids=3, num_train_imgs=6, num_train_cams=6, num_train_views=1, num_query_pids=2,
                            num_query_imgs=3, num_gallery_pids=3, num_gallery_imgs=5)
  # Junk (-1) skipped everywhere, distractors (0) kept, train labels in sorted pid order, cameras 0-based.
  assert ds.train.pids.tolist() == [0, 0, 1, 2, 2, 2]
  assert ds.train.camids.tolist() == [0, 1, 2, 3, 4, 5]
  assert sorted(set(ds.gallery.pids.tolist())) == [0, 3, 5]
  assert -1 not in ds.query.pids and -1 not in ds.gallery.pids
  assert set(ds.train.viewids.tolist()) == {0}
  rec = ds.query[0]
  assert rec.pid == 3 and rec.camid == 0 and os.path.isfile(rec.path)
  assert rec.path.endswith("query/0003_c1s1_000000_01.jpg")
  # The same folder passed directly works too, and labels do not depend on the path.
  with pytest.warns(data.DataWarning, match="bad_name.jpg"):
    ds2 = data.get_dataset("Market1501", tmp_path / "Market-1501-v15.09.15", check_counts=False)
  assert ds2.train.same_records(ds.train)


def test_duke_and_occluded_duke(tmp_path):
  duke = tmp_path / "dukemtmcreid" / "DukeMTMC-reID"
  for d in (duke, tmp_path / "dukemtmcreid" / "Occluded_Duke"):
    # pids 12, 100, 5000 relabel numerically (text order would put 100 first).
    touch_images(d / "bounding_box_train", ["5000_c8_f0001.jpg", "0012_c1_f0002.jpg", "0100_c2_f0003.jpg"])
    touch_images(d / "query", ["0005_c3_f0004.jpg"])
    touch_images(d / "bounding_box_test", ["0005_c4_f0005.jpg", "0009_c5_f0006.jpg"])
  for name in ("dukemtmc", "occ_duke"):
    with pytest.warns(data.DataWarning, match="published 702"):
      ds = data.get_dataset(name, tmp_path)
    assert ds.name == name
    assert [os.path.basename(p) for p in ds.train.relpaths] == ["0012_c1_f0002.jpg", "0100_c2_f0003.jpg",
                                                                "5000_c8_f0001.jpg"]
    assert ds.train.pids.tolist() == [0, 1, 2] and ds.train.camids.tolist() == [0, 1, 7]
    assert ds.stats()["num_gallery_pids"] == 2 and set(ds.gallery.viewids.tolist()) == {0}


def _msmt_name(pid: int, cam: int, k: int) -> str:
  return f"{pid:04d}/{pid:04d}_{k:03d}_{cam:02d}_0303morning_{k:04d}_0.jpg"


@pytest.mark.parametrize("folder,train_dir,test_dir", [("MSMT17_V1", "train", "test"),
                                                       ("MSMT17_V2", "mask_train_v2", "mask_test_v2"),
                                                       ("MSMT17", "train", "test")])
def test_msmt17_lists(tmp_path, folder, train_dir, test_dir):
  d = tmp_path / folder
  train = [(_msmt_name(0, 1, 0), 0), (_msmt_name(0, 15, 1), 0), (_msmt_name(1, 5, 2), 1)]
  val = [(_msmt_name(2, 7, 3), 2)]
  query = [(_msmt_name(0, 3, 0), 0)]
  gallery = [(_msmt_name(0, 4, 1), 0), (_msmt_name(3, 2, 2), 3)]
  for sub, rows, lst in ((train_dir, train, "list_train.txt"), (train_dir, val, "list_val.txt"),
                         (test_dir, query, "list_query.txt"), (test_dir, gallery, "list_gallery.txt")):
    touch_images(d / sub, [r for r, _ in rows])
    (d / lst).write_text("".join(f"{r} {p}\n" for r, p in rows))
  with pytest.warns(data.DataWarning, match="num_train_imgs 4 \\(published 32621\\)"):
    ds = data.get_dataset("msmt17", tmp_path)
  # train = list_train + list_val, camera from the third field of the file name.
  assert len(ds.train) == 4 and ds.train.pids.tolist() == [0, 0, 1, 2]
  assert ds.train.camids.tolist() == [0, 14, 4, 6]
  assert ds.query.camids.tolist() == [2] and ds.gallery.pids.tolist() == [0, 3]
  assert all(os.path.isfile(ds.train.path(i)) for i in range(len(ds.train)))
  assert ds.train.relpaths[0].startswith(train_dir + "/")


def _veri_name(pid: int, cam: int, k: int) -> str:
  return f"{pid:04d}_c{cam:03d}_{k:08d}_0.jpg"


def make_veri(root: pathlib.Path, keypoints: bool) -> pathlib.Path:
  d = root / "VeRi"
  train = [_veri_name(1, 1, 1), _veri_name(1, 20, 2), _veri_name(3, 2, 3), _veri_name(4, 5, 4)]
  query = [_veri_name(2, 3, 5), _veri_name(5, 3, 6)]
  gallery = [_veri_name(2, 4, 7), _veri_name(5, 9, 8), "-1_c001_00000009_0.jpg"]
  touch_images(d / "image_train", train)
  touch_images(d / "image_query", query)
  touch_images(d / "image_test", gallery)
  if keypoints:
    kp = " ".join(["-1"] * 40)
    # train[3] has no entry (dropped); query[1] is found in the train map (train map first).
    (d / "keypoint_train.txt").write_text(
        "".join(f"VeRi/image_train/{n} {kp} {v}\n" for n, v in zip(train[:3], (0, 7, 3)))
        + f"VeRi/image_query/{query[1]} {kp} 6\n")
    (d / "keypoint_test.txt").write_text(
        f"VeRi/image_query/{query[0]} {kp} 2\n" + f"VeRi/image_query/{query[1]} {kp} 1\n"
        + "".join(f"VeRi/image_test/{n} {kp} 5\n" for n in gallery[:1]))
  return d


def test_veri_with_keypoints(tmp_path):
  make_veri(tmp_path, keypoints=True)
  with pytest.warns(data.DataWarning, match="num_train_imgs 3 \\(published 37715\\)"):
    ds = data.get_dataset("veri", tmp_path)
  assert ds.train.viewids.tolist() == [0, 7, 3] and ds.train.pids.tolist() == [0, 0, 1]
  assert ds.train.camids.tolist() == [0, 19, 1]
  assert ds.query.viewids.tolist() == [2, 6]  # the train map wins for query[1]
  assert ds.gallery.pids.tolist() == [2]  # one gallery image lacks an entry, the junk -1 is skipped
  assert ds.num_train_views == 3


def test_veri_without_keypoints_warns(tmp_path):
  make_veri(tmp_path, keypoints=False)
  with pytest.warns(data.DataWarning) as record:
    ds = data.get_dataset("veri", tmp_path)
  messages = " | ".join(str(w.message) for w in record)
  assert "every view id is 0" in messages and "published 37778" in messages
  assert len(ds.train) == 4 and len(ds.gallery) == 2 and set(ds.train.viewids.tolist()) == {0}


def test_veri_keypoint_files_both_or_neither(tmp_path):
  """One keypoint file without its pair would drop every image of the other split for lack of a view (the official
  mirror ships keypoint_test.txt only): the missing file is named. An explicit keypoint_dir must hold them."""
  d = make_veri(tmp_path, keypoints=True)
  (d / "keypoint_train.txt").unlink()
  with pytest.raises(data.DatasetNotFoundError, match="keypoint_train.txt is missing"):
    data.get_dataset("veri", tmp_path)
  with pytest.raises(data.DatasetNotFoundError, match="keypoint_dir .*empty holds neither"):
    (tmp_path / "empty").mkdir()
    data.get_dataset("veri", tmp_path, keypoint_dir=str(tmp_path / "empty"))


def test_veri_keypoint_files_that_name_no_image_of_a_split(tmp_path):
  """Keypoint files of another copy (other names) drop every image of a split; that was reported as `split
  'train' is empty (no usable images in .../image_train)` beside a folder full of images."""
  d = make_veri(tmp_path, keypoints=True)
  (d / "keypoint_train.txt").write_text((d / "keypoint_train.txt").read_text().replace("_c", "_x"))
  with pytest.raises(data.EmptySplitError, match=r"none of the 4 images in .*image_train has an entry in .*"
                                                 r"keypoint_train.txt or .*keypoint_test.txt") as e:
    data.get_dataset("veri", tmp_path, check_counts=False)
  assert "\n" not in str(e.value)


def make_vehicleid(root: pathlib.Path) -> pathlib.Path:
  d = root / "VehicleID_V1.0"
  train = [(f"{i:07d}", pid) for i, pid in enumerate([7, 7, 3, 3, 3, 9])]
  test = {800: [(f"{100 + i:07d}", pid) for i, pid in enumerate([11, 11, 11, 12, 12, 13])]}
  test[1600] = test[800] + [(f"{200 + i:07d}", pid) for i, pid in enumerate([14, 14])]
  test[2400] = test[1600] + [(f"{300 + i:07d}", 15) for i in range(3)]
  touch_images(d / "image", [f"{n}.jpg" for n, _ in train + test[2400]])
  (d / "train_test_split").mkdir()
  (d / "train_test_split" / "train_list.txt").write_text("".join(f"{n} {p}\n" for n, p in train))
  for size, rows in test.items():
    (d / "train_test_split" / f"test_list_{size}.txt").write_text("".join(f"{n} {p}\n" for n, p in rows))
  return d


@pytest.mark.parametrize("test_size,num_ids", [(800, 3), (1600, 4), (2400, 5)])
def test_vehicleid_splits(tmp_path, test_size, num_ids):
  make_vehicleid(tmp_path)
  with pytest.warns(data.DataWarning, match=f"num_gallery_imgs {num_ids} \\(published {test_size}\\)"):
    ds = data.get_dataset("VehicleID", tmp_path, test_size=test_size)
  assert ds.train.pids.tolist() == [1, 1, 0, 0, 0, 2] and len(ds.train) == 6
  # One random image per identity in the gallery (camera 1), the rest in the query (camera 0).
  assert sorted(ds.gallery.pids.tolist()) == sorted(set(ds.gallery.pids.tolist())) and len(ds.gallery) == num_ids
  assert set(ds.gallery.camids.tolist()) == {1} and set(ds.query.camids.tolist()) == {0}
  all_paths = set(ds.query.relpaths.tolist()) | set(ds.gallery.relpaths.tolist())
  assert len(all_paths) == len(ds.query) + len(ds.gallery)
  # The gallery draw is seeded: the same on every call (every host), and the seed changes it.
  again = data.get_dataset("vehicleid", tmp_path, test_size=test_size, check_counts=False)
  assert again.gallery.same_records(ds.gallery) and again.query.same_records(ds.query)
  draws = {tuple(data.get_dataset("vehicleid", tmp_path, test_size=test_size, gallery_seed=s,
                                  check_counts=False).gallery.relpaths) for s in range(8)}
  assert len(draws) > 1


def test_vehicleid_rejects_other_test_sizes(tmp_path):
  make_vehicleid(tmp_path)
  with pytest.raises(data.DataError, match="test_size 500"):
    data.get_dataset("vehicleid", tmp_path, test_size=500)


def make_custom(root: pathlib.Path) -> pathlib.Path:
  touch_images(root / "images", ["alice/1.jpg", "alice/2.jpg", "bob/1.jpg", "carl/1.jpg", "carl/2.jpg", "dan/1.jpg",
                                 "eve/1.jpg"])
  Image.new("L", (4, 8), 30).save(root / "images" / "eve" / "2.png")
  (root / "train.csv").write_text("path,identity,camera,view\n# comment\nimages/bob/1.jpg,bob,cam2,front\n"
                                  "images/alice/1.jpg,alice,cam1,back\n\nimages/alice/2.jpg,alice,cam2,front\n")
  (root / "query.csv").write_text("images/carl/1.jpg,carl,cam1\nimages/dan/1.jpg,dan,cam3\n")
  (root / "gallery.csv").write_text("camera,path,identity\ncam2,images/carl/2.jpg,carl\ncam1,images/eve/1.jpg,eve\n"
                                    "cam3,images/eve/2.png,eve\n")
  return root


def test_custom_csv(tmp_path):
  make_custom(tmp_path)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no published counts for custom data
    ds = data.get_dataset("custom", tmp_path)
  assert ds.train.pids.tolist() == [1, 0, 0]  # alice 0, bob 1 (sorted)
  assert ds.train.camids.tolist() == [1, 0, 1]  # train's cam1, cam2 -> 0, 1; cam3 (test only) -> 2
  assert ds.train.viewids.tolist() == [1, 0, 1]  # train's back, front -> 0, 1; '0' (the test rows' default) -> 2
  assert ds.query.camids.tolist() == [0, 2] and ds.gallery.camids.tolist() == [1, 0, 2]
  # Text identities of query and gallery share one numbering: carl 0, dan 1, eve 2.
  assert ds.query.pids.tolist() == [0, 1] and ds.gallery.pids.tolist() == [0, 2, 2]
  assert os.path.isfile(ds.gallery.path(2)) and ds.gallery.relpaths[2] == "images/eve/2.png"
  assert ds.stats()["num_train_views"] == 2


def test_list_files_with_a_utf8_bom(tmp_path):
  """Excel's "CSV UTF-8" and Windows editors start a file with a byte-order mark: it hid the header of a custom
  list (`names a missing image ROOT/<BOM>path`) and of an extract list, and glued itself to the first name of a
  VehicleID (MSMT17, VeRi keypoint) list."""
  from clipreid_jax import inference  # pylint: disable=g-import-not-at-top
  make_custom(tmp_path / "plain")
  plain = data.get_dataset("custom", tmp_path / "plain")
  bom = pathlib.Path(shutil.copytree(tmp_path / "plain", tmp_path / "bom"))
  for name in ("train.csv", "query.csv", "gallery.csv"):
    (bom / name).write_bytes(b"\xef\xbb\xbf" + (bom / name).read_text().replace("\n", "\r\n").encode())
  ds = data.get_dataset("custom", bom)
  for a, b in ((ds.train, plain.train), (ds.query, plain.query), (ds.gallery, plain.gallery)):
    assert a.same_records(b)
  (bom / "list.txt").write_bytes(b"\xef\xbb\xbfpath,camera\r\nimages/bob/1.jpg,1\r\n")
  listed = inference.list_images(str(bom / "list.txt"))
  assert listed.files == [str(bom / "images" / "bob" / "1.jpg")] and listed.cams.tolist() == [1]
  d = make_vehicleid(tmp_path / "vid")
  lists = d / "train_test_split"
  (lists / "train_list.txt").write_bytes(b"\xef\xbb\xbf" + (lists / "train_list.txt").read_bytes())
  assert data.get_dataset("vehicleid", tmp_path / "vid", check_counts=False).train.relpaths[0] == "image/0000000.jpg"


def test_custom_numbers_train_cameras_first(tmp_path):
  """The SIE table has one row per training camera: train's cameras are 0..n-1 even when a test-only camera sorts
  before them (it used to be numbered 0, pushing train's past the table)."""
  touch_images(tmp_path / "im", ["a.jpg", "b.jpg", "c.jpg"])
  (tmp_path / "train.csv").write_text("im/a.jpg,1,camB\nim/b.jpg,2,camC\n")
  (tmp_path / "query.csv").write_text("im/c.jpg,1,camA\n")
  (tmp_path / "gallery.csv").write_text("im/b.jpg,1,camC\n")
  ds = data.get_dataset("custom", tmp_path)
  assert ds.train.camids.tolist() == [0, 1] and ds.num_train_cams == 2
  assert ds.query.camids.tolist() == [2] and ds.gallery.camids.tolist() == [1]


def test_custom_integer_identities_are_kept(tmp_path):
  touch_images(tmp_path / "im", ["a.jpg", "b.jpg", "c.jpg"])
  (tmp_path / "train.csv").write_text("im/a.jpg,10,1\nim/b.jpg,20,2\n")
  (tmp_path / "query.csv").write_text("im/a.jpg,42,1\n")
  (tmp_path / "gallery.csv").write_text("im/b.jpg,42,2\nim/c.jpg,7,2\n")
  ds = data.get_dataset("custom", tmp_path)
  assert ds.train.pids.tolist() == [0, 1] and ds.query.pids.tolist() == [42] and ds.gallery.pids.tolist() == [42, 7]


def test_custom_without_cameras(tmp_path):
  """Lists without a camera column (cameras unknown): query images count as camera 0 and gallery images as camera 1,
  so the protocol's same-camera rule removes no gallery image; a header may name the two columns."""
  touch_images(tmp_path / "im", ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
  (tmp_path / "train.csv").write_text("im/a.jpg,x\nim/b.jpg,y\n")
  (tmp_path / "query.csv").write_text("id,path\n7,im/c.jpg\n")
  (tmp_path / "gallery.csv").write_text("im/d.jpg,7\nim/a.jpg,8\n")
  ds = data.get_dataset("custom", tmp_path)
  assert ds.train.pids.tolist() == [0, 1] and ds.train.camids.tolist() == [0, 0] and ds.num_train_cams == 1
  assert ds.query.camids.tolist() == [0] and ds.gallery.camids.tolist() == [1, 1]
  assert ds.query.pids.tolist() == [7] and ds.gallery.pids.tolist() == [7, 8]
  from clipreid_jax.evaluation import metrics
  assert metrics.num_valid_queries(ds.query.pids, ds.gallery.pids, ds.query.camids, ds.gallery.camids) == 1


def test_custom_without_cameras_never_matches_an_image_with_itself(tmp_path):
  """Cameras unknown and a query set drawn from the gallery (the same file in query.csv and gallery.csv): the query
  kept its own copy as a match (query camera 0, gallery camera 1), at distance 0, so R1 was 100% for any model. Its
  copy is now out of its ranking, and only it (the other query images stay in the gallery)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from clipreid_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  touch_images(tmp_path / "im", ["a1.jpg", "a2.jpg", "b1.jpg", "b2.jpg", "c1.jpg"])
  (tmp_path / "query.csv").write_text("im/a1.jpg,a\nim/b1.jpg,b\n")
  (tmp_path / "gallery.csv").write_text("im/a1.jpg,a\nim/a2.jpg,a\nim/b1.jpg,b\nim/b2.jpg,b\nim/c1.jpg,c\n")
  ds = data.get_dataset("custom", tmp_path)
  q, g = ds.query, ds.gallery
  rng = np.random.default_rng(0)
  feats = {name: rng.normal(size=4) for name in ("a1", "a2", "b1", "b2", "c1")}
  qf = np.stack([feats[p[-6:-4]] for p in q.relpaths])
  gf = np.stack([feats[p[-6:-4]] for p in g.relpaths])
  dist = ((qf[:, None] - gf[None]) ** 2).sum(-1)
  got = metrics.eval_func(dist, q.pids, g.pids, q.camids, g.camids)
  aps = []
  for i, path in enumerate(q.relpaths):  # each query ranked against the gallery without its own copy
    keep = [j for j, p in enumerate(g.relpaths) if p != path]
    one = metrics.eval_func(dist[i:i + 1, keep], q.pids[i:i + 1], g.pids[keep], np.zeros(1, int),
                            np.ones(len(keep), int))
    aps.append(one.mAP)
  assert got.num_valid_queries == 2 and got.mAP == pytest.approx(np.mean(aps)) and got.mAP < 1


def test_registry_names_and_layouts():
  assert data.DATASET_NAMES == ("market1501", "msmt17", "dukemtmc", "occ_duke", "veri", "vehicleid", "custom")
  assert data.canonical_name("VehicleID") == "vehicleid" and data.canonical_name("Market") == "market1501"
  # The error lists every name get_dataset takes, 'synthetic' included (data/README.md lists it too).
  with pytest.raises(data.UnknownDatasetError, match="unknown dataset 'cuhk03'; known: market1501, .*, custom, "
                     "synthetic$"):
    data.get_dataset("cuhk03", "/nonexistent")
  # An unknown option names the valid ones, before anything is read.
  with pytest.raises(data.DataError, match="^market1501: unknown option test_size; valid options: check_counts$"):
    data.get_dataset("market1501", "/nonexistent", test_size=800)
  with pytest.raises(data.DataError, match="^VehicleID: unknown options foo, bar; valid options: test_size, "
                     "gallery_seed, check_counts, check_files$"):
    data.get_dataset("VehicleID", "/nonexistent", foo=1, bar=2)
  # Option values of the wrong type are refused before reading (a non-empty string used to count as true).
  with pytest.raises(data.DataError, match="option check_counts: expected true or false, got 'maybe'"):
    data.get_dataset("market1501", "/nonexistent", **registry.parse_options(["check_counts=maybe"]))
  with pytest.raises(data.DataError, match="option gallery_seed: expected an integer >= 0, got -1"):
    data.get_dataset("vehicleid", "/nonexistent", gallery_seed=-1)


@pytest.mark.filterwarnings("ignore::clipreid_jax.data.errors.DataWarning")
def test_published_counts_match_exactly_give_no_warning(tmp_path):
  make_market(tmp_path)
  ds = data.get_dataset("market1501", tmp_path, check_counts=False)
  published.PUBLISHED["tiny_market"] = ds.stats()
  try:
    assert published.differences(ds, "tiny_market") == []
  finally:
    del published.PUBLISHED["tiny_market"]


def test_inspection_cli_prints_json(tmp_path, capsys):
  make_vehicleid(tmp_path)
  assert inspect_cli.main(["vehicleid", str(tmp_path), "--opt", "test_size=1600"]) == 0
  out = capsys.readouterr()
  stats = json.loads(out.out)
  assert stats == dict(num_train_pids=3, num_train_imgs=6, num_train_cams=1, num_train_views=1, num_query_pids=3,
                       num_query_imgs=4, num_gallery_pids=4, num_gallery_imgs=4)
  assert "published 1600" in out.err


def test_inspection_cli_subprocess(tmp_path):
  make_market(tmp_path)
  ok = subprocess.run([sys.executable, "-m", "clipreid_jax.data", "market1501", str(tmp_path)], capture_output=True,
                      text=True, cwd=REPO, check=False)
  assert ok.returncode == 0, ok.stderr
  assert json.loads(ok.stdout)["num_train_imgs"] == 6
  bad = subprocess.run([sys.executable, "-m", "clipreid_jax.data", "market1501", str(tmp_path / "missing")],
                       capture_output=True, text=True, cwd=REPO, check=False)
  assert bad.returncode == 2 and bad.stdout == ""
  lines = bad.stderr.strip().splitlines()
  assert len(lines) == 1 and "expected layout" in lines[0] and "bounding_box_train" in lines[0]


@pytest.mark.filterwarnings("ignore::clipreid_jax.data.errors.DataWarning")
def test_split_is_cheap_and_picklable(tmp_path):
  import pickle
  make_market(tmp_path)
  ds = data.get_dataset("market1501", tmp_path, check_counts=False)
  clone = pickle.loads(pickle.dumps(ds.train))
  assert clone.same_records(ds.train) and clone.pids.dtype == np.int32
  both = data.Split.concat(ds.query, ds.gallery)
  assert len(both) == len(ds.query) + len(ds.gallery) and both.path(len(ds.query)) == ds.gallery.path(0)


@pytest.mark.parametrize("sub", ["bounding_box_train", "query"])
def test_market1501_refuses_a_seventh_camera(tmp_path, sub):
  # Market-1501 has cameras c1..c6 (the official reader asserts 1 <= camid <= 6); c7 is a corrupt or foreign file.
  d = make_market(tmp_path)
  touch_images(d / sub, market_names(2, [7], start=50))
  with pytest.raises(data.DataError, match=r"0002_c7s1_000050_01\.jpg: camera 7 outside 1\.\.6"):
    data.get_dataset("market1501", tmp_path, check_counts=False)


def test_split_records_fingerprint_and_concat_of_other_roots():
  """Every column of a record counts (a resumed run checks the fingerprint; `prepare` checks `same_records`), and
  splits of two roots concatenate with each record's own path."""
  a = data.Split.from_records("/a", [("x/1.jpg", 0, 0, 0), ("x/2.jpg", 1, 1, 1)])
  fp = a.fingerprint()
  for column in ("pids", "camids", "viewids"):
    values = getattr(a, column).copy()
    values[0] = 5
    other = data.Split(a.root, a.relpaths, **{k: values if k == column else getattr(a, k)
                                              for k in ("pids", "camids", "viewids")})
    assert other.fingerprint()["sha256"] != fp["sha256"] and not other.same_records(a), column
  renamed = data.Split(a.root, np.asarray(["x/1.jpg", "x/3.jpg"]), a.pids, a.camids, a.viewids)
  assert renamed.fingerprint()["sha256"] != fp["sha256"] and not renamed.same_records(a)
  moved = data.Split("/elsewhere", a.relpaths, a.pids, a.camids, a.viewids)
  assert moved.fingerprint() == fp and moved.same_records(a)
  b = data.Split.from_records("/b", [("y/9.jpg", 7, 2, 0)])
  both = data.Split.concat(a, b)
  assert [both.path(i) for i in range(3)] == [os.path.join("/a", "x/1.jpg"), os.path.join("/a", "x/2.jpg"),
                                              os.path.join("/b", "y/9.jpg")]
  np.testing.assert_array_equal(both.pids, [0, 1, 7])
