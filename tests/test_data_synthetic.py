"""Synthetic Market-layout data: layout and naming, determinism, query/gallery protocol, idempotence, CLI."""
import collections
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from clipreid_jax import data
from clipreid_jax.data import __main__ as inspect_cli
from clipreid_jax.data import synthetic

KW = dict(num_train_ids=6, num_test_ids=4, imgs_per_id=6, num_cams=3, size=(32, 16), seed=11)
REPO = pathlib.Path(__file__).resolve().parents[1]


def _snapshot(root) -> dict:
  """Every file under `root` with its bytes and modification time."""
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      path = os.path.join(d, n)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = (f.read(), os.stat(path).st_mtime_ns)
  return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return data.write_synthetic_market(tmp_path_factory.mktemp("synth"), **KW)


def test_layout_and_names(root):
  pattern = re.compile(r"^(-1|\d{4})_c[1-3]s1_\d{6}_01\.jpg$")
  for sub in synthetic.SPLIT_DIRS:
    names = os.listdir(os.path.join(root, sub))
    assert names and all(pattern.match(n) for n in names), sub
  gallery = os.listdir(os.path.join(root, "bounding_box_test"))
  assert sum(n.startswith("-1_") for n in gallery) == 2 and sum(n.startswith("0000_") for n in gallery) == 2
  img = Image.open(os.path.join(root, "query", os.listdir(os.path.join(root, "query"))[0]))
  assert img.format == "JPEG" and img.size == (16, 32) and img.mode == "RGB"


def test_reads_as_market(root):
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # synthetic folders skip the published-count check
    ds = data.get_dataset("market1501", root)
  assert ds.stats() == dict(num_train_pids=6, num_train_imgs=36, num_train_cams=3, num_train_views=1,
                            num_query_pids=4, num_query_imgs=8, num_gallery_pids=5, num_gallery_imgs=4 * 4 + 2)
  # Train and test identities are disjoint; every query has a same-identity gallery image in another camera.
  train_pids = {int(os.path.basename(p)[:4]) for p in ds.train.relpaths}
  assert not train_pids & set(ds.query.pids.tolist())
  gallery = collections.defaultdict(set)
  for pid, cam in zip(ds.gallery.pids, ds.gallery.camids):
    gallery[int(pid)].add(int(cam))
  for pid, cam in zip(ds.query.pids, ds.query.camids):
    assert gallery[int(pid)] - {int(cam)}
  # At most one query per identity and camera, as in Market-1501.
  assert len(set(zip(ds.query.pids.tolist(), ds.query.camids.tolist()))) == len(ds.query)


def test_deterministic_from_the_seed(root, tmp_path):
  again = data.write_synthetic_market(tmp_path / "again", **KW)
  for sub in synthetic.SPLIT_DIRS:
    a, b = sorted(os.listdir(os.path.join(root, sub))), sorted(os.listdir(os.path.join(again, sub)))
    assert a == b
    for n in a:
      with open(os.path.join(root, sub, n), "rb") as f, open(os.path.join(again, sub, n), "rb") as g:
        assert f.read() == g.read()
  other = data.write_synthetic_market(tmp_path / "other", **{**KW, "seed": 12})
  assert sorted(os.listdir(os.path.join(other, "query"))) != sorted(os.listdir(os.path.join(root, "query")))


def test_identities_are_consistent_and_distinct(root):
  ds = data.get_dataset("market1501", root)
  x = np.stack([data.load_resized(ds.train.path(i), (32, 16)).astype(np.float32) for i in range(len(ds.train))])
  feats = x.reshape(len(x), -1)
  feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
  d = ((feats[:, None] - feats[None]) ** 2).sum(-1)
  same = ds.train.pids[:, None] == ds.train.pids[None]
  off_diag = ~np.eye(len(x), dtype=bool)
  # Learnable: raw pixels already put same-identity images closer on average ...
  assert d[same & off_diag].mean() < d[~same].mean()
  # ... but not trivial: nearest neighbours in raw pixels are often of another identity.
  np.fill_diagonal(d, np.inf)
  nn_acc = (ds.train.pids[d.argmin(1)] == ds.train.pids).mean()
  assert nn_acc < 1.0


def test_idempotent_and_rewrites_on_new_settings(tmp_path):
  out = data.write_synthetic_market(tmp_path, **KW)
  q = os.path.join(out, "query")
  mtime = {n: os.stat(os.path.join(q, n)).st_mtime_ns for n in os.listdir(q)}
  data.write_synthetic_market(tmp_path, **KW)
  assert {n: os.stat(os.path.join(q, n)).st_mtime_ns for n in os.listdir(q)} == mtime
  with pytest.warns(data.DataWarning, match=r"rewriting .* \(num_test_ids 4 -> 2, "):  # not silently
    data.write_synthetic_market(tmp_path, **{**KW, "num_test_ids": 2})
  assert len(os.listdir(q)) == 4


@pytest.mark.parametrize("foreign", ["query/mine.jpg", "bounding_box_train/notes", "bounding_box_test/sub/x.jpg",
                                     "duplicate", "bounding_box_train/0001_c1s1_000999_01.jpg"])
def test_rewrite_refuses_files_it_did_not_write(tmp_path, foreign):
  # New settings replace the generated images; a user's file among them would be lost, so the rewrite is refused.
  data.write_synthetic_market(tmp_path, **KW)
  if foreign == "duplicate":  # a generated name copied into another split: frame numbers are used once
    name = sorted(os.listdir(tmp_path / "query"))[0]
    shutil.copy(tmp_path / "query" / name, tmp_path / "bounding_box_train" / name)
  else:
    (tmp_path / foreign).parent.mkdir(exist_ok=True)
    (tmp_path / foreign).write_bytes(b"user data")
  before = _snapshot(tmp_path)
  with pytest.raises(data.DataError, match="files this generator did not write") as e:
    data.write_synthetic_market(tmp_path, **{**KW, "num_test_ids": 2})
  assert "\n" not in str(e.value) and _snapshot(tmp_path) == before


def test_rewrite_refuses_a_broken_marker(tmp_path):
  data.write_synthetic_market(tmp_path, **KW)
  (tmp_path / "synthetic.json").write_text("{not json")
  before = _snapshot(tmp_path)
  with pytest.raises(data.DataError, match="not a settings file"):
    data.write_synthetic_market(tmp_path, **KW)
  assert _snapshot(tmp_path) == before


def test_finishes_an_interrupted_write(tmp_path):
  """The marker is written last: a write killed midway left the generator's files only, and every rerun (the demo's)
  was refused until the folder was deleted by hand. It is finished now, with a warning; a user's file still blocks."""
  data.write_synthetic_market(tmp_path / "whole", **KW)
  part = tmp_path / "part"
  shutil.copytree(tmp_path / "whole", part)
  (part / "synthetic.json").unlink()
  for name in sorted(os.listdir(part / "bounding_box_test"))[3:]:
    (part / "bounding_box_test" / name).unlink()
  (part / "mine").mkdir()  # beside the split folders: not the generator's business
  with pytest.warns(data.DataWarning, match="finishing a write that was interrupted"):
    data.write_synthetic_market(part, **KW)
  for sub in ("bounding_box_train", "query", "bounding_box_test"):  # the same images as one uninterrupted write
    names = sorted(os.listdir(tmp_path / "whole" / sub))
    assert sorted(os.listdir(part / sub)) == names
    assert all((part / sub / n).read_bytes() == (tmp_path / "whole" / sub / n).read_bytes() for n in names)
  (part / "synthetic.json").unlink()
  (part / "query" / "notes.txt").write_text("mine")
  with pytest.raises(data.DataError, match=r"split folders that this generator did not write \(query/notes.txt\)"):
    data.write_synthetic_market(part, **KW)


def test_refuses_foreign_folders_and_bad_settings(tmp_path):
  (tmp_path / "query").mkdir()
  (tmp_path / "query" / "0001_c1s1_000001_00.jpg").write_bytes(b"not the generator's name (_00)")
  with pytest.raises(data.DataError, match="did not write"):
    data.write_synthetic_market(tmp_path, **KW)
  with pytest.raises(data.DataError, match=r"synthetic: num_cams: expected an integer in \[2, 6\].*got 7"):
    data.write_synthetic_market(tmp_path / "x", **{**KW, "num_cams": 7})


def test_bad_settings_leave_existing_data_alone(tmp_path):
  # The size rules are checked before anything is touched: too many identities used to be found only after the
  # previous settings' images had been removed.
  data.write_synthetic_market(tmp_path, **KW)
  before = _snapshot(tmp_path)
  for bad, match in (({"num_train_ids": 4996}, r"num_train_ids \+ num_test_ids: expected at most 4999.*got 5000"),
                     ({"imgs_per_id": 3}, r"imgs_per_id: expected an integer >= 4, got 3"),
                     ({"queries_per_id": 0}, r"queries_per_id: expected an integer >= 1, got 0")):
    with pytest.raises(data.DataError, match=match):
      data.write_synthetic_market(tmp_path, **{**KW, **bad})
    assert _snapshot(tmp_path) == before


def test_registry_synthetic_reads_and_never_writes(tmp_path):
  # The registry's readers only read: no folder, no data, and other settings are an error, not a rewrite.
  with pytest.raises(data.DatasetNotFoundError, match="no synthetic data .*python -m clipreid_jax.data.synthetic"):
    data.get_dataset("synthetic", tmp_path / "demo", **KW)
  assert not (tmp_path / "demo").exists()
  data.write_synthetic_market(tmp_path / "demo", **KW)
  before = _snapshot(tmp_path / "demo")
  for opts in ({}, KW, {"num_train_ids": 6, "num_distractors": None}):
    ds = data.get_dataset("synthetic", tmp_path / "demo", **opts)
    assert ds.name == "market1501" and ds.num_train_pids == 6
  with pytest.raises(data.DataError, match=r"other settings \(num_train_ids 6, not 32; seed 11, not 0\)"):
    data.get_dataset("synthetic", tmp_path / "demo", num_train_ids=32, seed=0)
  assert _snapshot(tmp_path / "demo") == before


def test_stats_cli_reads_synthetic_data_without_writing(tmp_path, capsys):
  root = data.write_synthetic_market(tmp_path / "demo", **KW)
  before = _snapshot(root)
  assert inspect_cli.main(["synthetic", root]) == 0
  assert '"num_train_pids": 6' in capsys.readouterr().out and _snapshot(root) == before
  # No synthetic data: one line saying how to write it, and nothing written.
  (tmp_path / "empty").mkdir()
  for where in (tmp_path / "empty", tmp_path / "missing"):
    assert inspect_cli.main(["synthetic", str(where)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "python -m clipreid_jax.data.synthetic" in err[0]
  assert not os.listdir(tmp_path / "empty") and not (tmp_path / "missing").exists()


def test_module_cli_runs_without_runpy_warning(tmp_path):
  # The package does not import the module, so `python -m` runs it without runpy's 'found in sys.modules' warning.
  out = subprocess.run([sys.executable, "-m", "clipreid_jax.data.synthetic", str(tmp_path), "--ids", "2",
                        "--test-ids", "1", "--imgs", "4", "--cams", "2", "--height", "16", "--width", "8"],
                       capture_output=True, text=True, cwd=REPO, check=False)
  assert out.returncode == 0 and out.stdout.strip() == str(tmp_path) and out.stderr == "", out.stderr


def test_cli(tmp_path, capsys):
  assert synthetic.main([str(tmp_path), "--ids", "3", "--test-ids", "2", "--imgs", "4", "--cams", "2",
                         "--height", "16", "--width", "8"]) == 0
  assert capsys.readouterr().out.strip() == str(tmp_path)
  assert len(os.listdir(tmp_path / "bounding_box_train")) == 12
  assert synthetic.main([str(tmp_path / "y"), "--cams", "9"]) == 2
  capsys.readouterr()
  # A root that cannot be a folder: one line, nothing written (was a NotADirectoryError traceback).
  (tmp_path / "afile").write_text("")
  assert synthetic.main([str(tmp_path / "afile" / "x"), "--ids", "3", "--test-ids", "2"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"error: root: cannot create {tmp_path / 'afile' / 'x'}: {tmp_path / 'afile'} is not a folder"]
  # New settings over an earlier dataset: its warning is one line too.
  assert synthetic.main([str(tmp_path), "--ids", "4", "--test-ids", "2", "--imgs", "4", "--cams", "2",
                         "--height", "16", "--width", "8"]) == 0
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"warning: synthetic: rewriting {tmp_path}"), err
