"""Bad input: each case raises its own DataError subclass with a one-line message; the CLI exits with code 2."""
import io
import pathlib

import numpy as np
import pytest
from PIL import Image

from clipreid_jax import data
from clipreid_jax.data import __main__ as inspect_cli
from clipreid_jax.data import errors


def _jpeg(size=(16, 32)) -> bytes:
  buf = io.BytesIO()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
  return buf.getvalue()


def _one_line(err: Exception) -> str:
  msg = str(err)
  assert "\n" not in msg and msg
  return msg


def _market(root: pathlib.Path, query=("0003_c1s1_000001_01.jpg",)) -> pathlib.Path:
  d = root / "Market-1501-v15.09.15"
  for sub, names in (("bounding_box_train", ["0002_c1s1_000001_01.jpg", "0004_c2s1_000001_01.jpg"]),
                     ("query", list(query)), ("bounding_box_test", ["0003_c2s1_000002_01.jpg"])):
    (d / sub).mkdir(parents=True)
    for n in names:
      (d / sub / n).write_bytes(_jpeg())
  return d


def test_missing_root_shows_expected_layout(tmp_path):
  with pytest.raises(data.DatasetNotFoundError) as e:
    data.get_dataset("market1501", tmp_path / "nope")
  msg = _one_line(e.value)
  assert str(tmp_path / "nope") in msg and "Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test}" in msg
  assert isinstance(e.value, data.DataError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize("name,expected", [("market1501", "bounding_box_train"), ("msmt17", "list_train"),
                                           ("dukemtmc", "DukeMTMC-reID"), ("occ_duke", "Occluded_Duke"),
                                           ("veri", "image_train"), ("vehicleid", "train_test_split"),
                                           ("custom", "query.csv")])  # train.csv is optional (eval only)
def test_wrong_layout_names_it(tmp_path, name, expected):
  (tmp_path / "something_else").mkdir()
  with pytest.raises(data.DatasetNotFoundError) as e:
    data.get_dataset(name, tmp_path)
  assert expected in _one_line(e.value)


def test_partial_layout_names_the_missing_entry(tmp_path):
  """A dataset folder that lacks one entry (a split folder not unpacked, a VehicleID test list not there) was
  reported as `no dataset found under ROOT`, leaving the user to compare the folder with the layout."""
  veri = tmp_path / "a" / "VeRi"
  for sub in ("image_train", "image_test"):
    (veri / sub).mkdir(parents=True)
  with pytest.raises(data.DatasetNotFoundError) as e:
    data.get_dataset("veri", tmp_path / "a")
  assert f"{veri} has no image_query; expected layout: " in _one_line(e.value)
  vid = tmp_path / "b" / "VehicleID_V1.0"
  (vid / "image").mkdir(parents=True)
  (vid / "train_test_split").mkdir()
  for n in ("train_list", "test_list_800"):
    (vid / "train_test_split" / f"{n}.txt").write_text("")
  with pytest.raises(data.DatasetNotFoundError, match=f"{vid} has no train_test_split/test_list_1600.txt;"):
    data.get_dataset("vehicleid", tmp_path / "b", test_size=1600)


def test_empty_split(tmp_path):
  d = _market(tmp_path, query=())
  with pytest.raises(data.EmptySplitError, match="split 'query' is empty") as e:
    data.get_dataset("market1501", tmp_path, check_counts=False)
  _one_line(e.value)
  # Images re-encoded as .png: the split is still empty (the published layout is .jpg), and a warning says why.
  for n in ("0003_c1s1_000001_01.png", "0003_c1s1_000002_01.png"):
    (d / "query" / n).write_bytes(b"")
  with pytest.warns(data.DataWarning, match=r"market1501: query holds no .jpg image \(the published layout's\), only "
                    r"2 other files, e.g. 0003_c1s1_000001_01.png, 0003_c1s1_000002_01.png"):
    with pytest.raises(data.EmptySplitError, match="split 'query' is empty"):
      data.get_dataset("market1501", tmp_path, check_counts=False)


@pytest.mark.parametrize("content,match", [(b"", "is empty"), (b"not an image at all", "not an image file"),
                                           (None, "cannot read image")])
def test_unreadable_image_names_the_file(tmp_path, content, match):
  path = tmp_path / "0001_c1s1_000001_01.jpg"
  if content is not None:
    path.write_bytes(content)
  with pytest.raises(data.ImageReadError, match=match) as e:
    data.read_image(path)
  assert str(path) in _one_line(e.value)


def test_image_above_the_decompression_bomb_limit_is_an_image_read_error(tmp_path, monkeypatch):
  """PIL refuses an image of more than twice MAX_IMAGE_PIXELS (179 M by default) with its own exception, which was
  not a DataError: a traceback and exit code 1 from extraction or training instead of one line naming the file."""
  path = tmp_path / "huge.png"
  Image.new("L", (20, 10)).save(path)
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 90)  # 200 pixels > 2 x 90, as a 15000 x 12000 picture by default
  with pytest.raises(data.ImageReadError, match="exceeds limit") as e:
    data.read_image(path)
  assert str(path) in _one_line(e.value)


def test_header_truncated_jpeg_is_an_error(tmp_path):
  path = tmp_path / "cut.jpg"
  path.write_bytes(_jpeg()[:100])
  with pytest.raises(data.ImageReadError, match="cut.jpg") as e:
    data.read_image(path)
  _one_line(e.value)


def test_bad_image_surfaces_through_the_loader(tmp_path):
  d = _market(tmp_path)
  (d / "bounding_box_train" / "0004_c2s1_000001_01.jpg").write_bytes(b"")
  ds = data.get_dataset("market1501", tmp_path, check_counts=False)
  loader = data.stage1_loader(ds.train, image_size=(16, 8), batch_size=2)
  with pytest.raises(data.ImageReadError, match="0004_c2s1_000001_01.jpg"):
    list(loader)


def test_list_file_naming_a_missing_image(tmp_path):
  (tmp_path / "im").mkdir()
  (tmp_path / "im" / "a.jpg").write_bytes(_jpeg())
  (tmp_path / "train.csv").write_text("im/a.jpg,1,1\n")
  (tmp_path / "query.csv").write_text("im/a.jpg,1,1\n")
  (tmp_path / "gallery.csv").write_text("path,identity,camera\nim/a.jpg,1,2\nim/missing.jpg,2,1\n")
  with pytest.raises(data.ListFileError) as e:
    data.get_dataset("custom", tmp_path)
  msg = _one_line(e.value)
  assert "gallery.csv:3" in msg and "missing.jpg" in msg


def test_msmt17_list_naming_a_missing_image(tmp_path):
  d = tmp_path / "MSMT17_V1"
  for sub in ("train", "test"):
    (d / sub / "0000").mkdir(parents=True)
  (d / "train" / "0000" / "0000_000_01_x_0000_0.jpg").write_bytes(_jpeg())
  (d / "list_train.txt").write_text("0000/0000_000_01_x_0000_0.jpg 0\n")
  (d / "list_val.txt").write_text("0000/0000_001_02_x_0001_0.jpg 0\n")
  (d / "list_query.txt").write_text("")
  (d / "list_gallery.txt").write_text("")
  with pytest.raises(data.ListFileError, match="list_val.txt:1 names a missing image"):
    data.get_dataset("msmt17", tmp_path)


def test_malformed_list_line(tmp_path):
  (tmp_path / "im").mkdir()
  (tmp_path / "im" / "a.jpg").write_bytes(_jpeg())
  for f in ("train.csv", "query.csv"):
    (tmp_path / f).write_text("im/a.jpg,1,1\n")
  for text, match in (("im/a.jpg\n", "gallery.csv:1: expected 'path,identity,camera"),
                      ("im/a.jpg,1,1,0,5\n", "gallery.csv:1: expected 'path,identity,camera"),
                      ("im/a.jpg,1,1\nim/a.jpg,2\n", "gallery.csv:2: expected 'path,identity,camera"),
                      ("im/a.jpg,1\nim/a.jpg,2,1\n", r"gallery.csv:2: expected 'path,identity \(as the rows before"),
                      ("path,identity,view\nim/a.jpg,1,0\n", "gallery.csv:1: header 'path,identity,view' needs "
                       "columns path, identity, and optionally camera"),
                      # Cameras in some list files only: the protocol cannot mix known and unknown cameras.
                      ("im/a.jpg,1\n", "gallery.csv has no camera column but .*train.csv has; expected cameras in "
                       "every list file or in none")):
    (tmp_path / "gallery.csv").write_text(text)
    with pytest.raises(data.ListFileError, match=match):
      data.get_dataset("custom", tmp_path)


def test_fewer_identities_than_p(tmp_path):
  _market(tmp_path)
  ds = data.get_dataset("market1501", tmp_path, check_counts=False)
  with pytest.raises(data.NotEnoughIdentitiesError, match="at least P=4 identities.*has 2") as e:
    data.train_loader(ds.train, image_size=(16, 8), num_ids=4, num_instances=2, seed=0, epoch=1)
  _one_line(e.value)


def test_uneven_host_split():
  pids = np.repeat(np.arange(8), 4)
  split = data.Split.from_records("/x", [(f"{i}.jpg", int(p), 0, 0) for i, p in enumerate(pids)])
  with pytest.raises(data.DataError, match="does not split evenly over 3 hosts"):
    data.train_loader(split, image_size=(16, 8), num_ids=4, num_instances=2, seed=0, epoch=1, process_count=3)


@pytest.mark.parametrize("argv,match", [(["market1501", "{root}/missing"], "expected layout"),
                                        (["cuhk03", "{root}"], "unknown dataset"),
                                        (["market1501", "{root}", "--opt", "nonsense"], "expected KEY=VALUE"),
                                        (["vehicleid", "{root}", "--opt", "test_size=5"], "test_size 5 is not one of"),
                                        (["market1501", "{root}", "--opt", "foo=1"],
                                         "market1501: unknown option foo; valid options: check_counts"),
                                        (["synthetic", "{root}"], "no synthetic data")])
def test_cli_exit_code_2(tmp_path, capsys, argv, match):
  code = inspect_cli.main([a.format(root=tmp_path) for a in argv])
  out = capsys.readouterr()
  assert code == 2 and out.out == ""
  lines = out.err.strip().splitlines()
  assert len(lines) == 1 and match in lines[0] and lines[0].startswith("error: ")


def test_one_line_forms_of_foreign_errors():
  """What of another library's error reaches a one-line message: its first line, cut with "...", or its type."""
  assert errors.first_line(OSError("disk full\n  details\n")) == "disk full"
  assert errors.first_line(RuntimeError("  ")) == "RuntimeError"
  assert errors.first_line(ValueError("x" * 250)) == "x" * 197 + "..."
  assert errors.first_line(ValueError("x" * 200)) == "x" * 200
  assert errors.describe(ValueError("bad input\nmore"), limit=5) == "ValueError: ba..."
  assert errors.describe(KeyError()) == "KeyError"


def test_list_file_that_is_not_utf8_is_a_list_file_error(tmp_path, capsys):
  """Excel's "CSV (Comma delimited)" writes Windows-1252 (its "Unicode Text" UTF-16): an accented name was a
  UnicodeDecodeError traceback from the custom reader, and from the MSMT17/VehicleID/VeRi list readers."""
  (tmp_path / "im").mkdir()
  (tmp_path / "im" / "a.jpg").write_bytes(_jpeg())
  (tmp_path / "train.csv").write_text("im/a.jpg,1,1\n")
  (tmp_path / "query.csv").write_text("im/a.jpg,1,1\n")
  (tmp_path / "gallery.csv").write_bytes(b"path,identity,camera\nim/a.jpg,1,1\nim/a.jpg,jos\xe9,1\n")
  with pytest.raises(data.ListFileError, match=r"gallery.csv:3: not UTF-8 text") as e:
    data.get_dataset("custom", tmp_path)
  _one_line(e.value)
  assert inspect_cli.main(["custom", str(tmp_path)]) == 2
  assert "gallery.csv:3: not UTF-8" in capsys.readouterr().err
  # Excel's BOM before it: still line 3 and the byte itself (the BOM's 3 bytes counted)
  (tmp_path / "gallery.csv").write_bytes(b"\xef\xbb\xbfpath,identity,camera\nim/a.jpg,1,1\nim/a.jpg,jos\xe9,1\n")
  with pytest.raises(data.ListFileError, match=r"gallery.csv:3: not UTF-8 text \(byte b'\\xe9' cannot"):
    data.get_dataset("custom", tmp_path)
  d = tmp_path / "VehicleID_V1.0"
  (d / "image").mkdir(parents=True)
  (d / "image" / "0000001.jpg").write_bytes(_jpeg())
  (d / "train_test_split").mkdir()
  (d / "train_test_split" / "train_list.txt").write_text("0000001 1\n")
  (d / "train_test_split" / "test_list_800.txt").write_text("0000001 1\n".encode("utf-16").decode("latin-1"),
                                                             encoding="latin-1")
  with pytest.raises(data.ListFileError, match=r"test_list_800.txt:1: not UTF-8 text"):
    data.get_dataset("vehicleid", tmp_path)
