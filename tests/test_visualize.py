"""Pictures of a run: t-SNE on known clusters, rank-list frames on a known ranking, every picture of a tiny trained
run (size, not blank, frame colours), and the CLI's exit codes."""
import json
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from clipreid_jax import train
from clipreid_jax.visualize import __main__ as cli
from clipreid_jax.visualize import ranks, tsne
from train_helpers import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def _pixels(path) -> np.ndarray:
  return np.asarray(Image.open(path).convert("RGB"))


def _assert_picture(path, min_size=(200, 150)):
  """A PNG of at least `min_size` (width, height) with real content: varied pixels and many colours."""
  img = Image.open(path)
  assert img.format == "PNG" and img.size[0] >= min_size[0] and img.size[1] >= min_size[1], img.size
  px = _pixels(path)
  assert px.std() > 20
  assert len(np.unique(px.reshape(-1, 3), axis=0)) > 50


def _frame_color(px: np.ndarray, layout: ranks.RankLayout, k: int) -> tuple:
  left, top, _, _ = layout.frame_box(k)
  return tuple(int(v) for v in px[top + 1, left + 1])  # inside the frame strip, outside the image


# ----------------------------------------------------------------------------------------------------------------
# t-SNE.


def _clusters(num=5, per=24, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(0, 6, (num, dim))
  x = np.concatenate([c + rng.normal(0, 1, (per, dim)) for c in centres])
  return x, np.repeat(np.arange(num), per)


def test_perplexity_search_hits_target_entropy():
  x, _ = _clusters()
  p = tsne.conditional_affinities(tsne.squared_distances(x), perplexity=12.0)
  np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-12)
  assert np.all(np.diag(p) == 0)
  entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(1)
  np.testing.assert_allclose(entropy, np.log(12.0), atol=1e-4)


def test_tsne_keeps_separable_clusters_apart():
  x, labels = _clusters()
  y = tsne.tsne(x, tsne.TSNEOptions(num_iters=500, seed=1))
  assert y.shape == (len(x), 2) and np.all(np.isfinite(y))
  d = tsne.squared_distances(y)
  np.fill_diagonal(d, np.inf)
  neighbours = labels[np.argsort(d, axis=1)[:, :5]]
  predicted = np.array([np.bincount(row).argmax() for row in neighbours])
  assert (predicted == labels).mean() >= 0.98
  # Deterministic for a seed; the optimisation lowered the cost below that of the initial layout.
  np.testing.assert_array_equal(y, tsne.tsne(x, tsne.TSNEOptions(num_iters=500, seed=1)))
  start = np.random.default_rng(0).normal(0, 1e-2, y.shape)
  assert tsne.kl_divergence(x, y) < 0.5 * tsne.kl_divergence(x, start)


def test_tsne_rejects_bad_input():
  with pytest.raises(ValueError, match="num_points"):
    tsne.tsne(np.zeros((3, 2)))
  with pytest.raises(ValueError, match="finite"):
    tsne.tsne(np.full((8, 2), np.nan))


# ----------------------------------------------------------------------------------------------------------------
# Rank lists on a known case.


def test_rank_list_known_case_frames_and_protocol():
  # Query: pid 7, camera 0. Gallery distances along one axis: g0 is the same person in the same camera (dropped by
  # the protocol), then g1 (match, other camera), g2 (another person), g3 (match), g4 (another person).
  qf = np.array([[1.0, 0.0]])
  angles = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
  gf = np.stack([np.cos(angles), np.sin(angles)], 1)
  g_pids, g_cams = np.array([7, 7, 3, 7, 5]), np.array([0, 1, 1, 2, 0])
  (rank,) = ranks.rank_lists(qf, gf, [7], g_pids, [0], g_cams, queries=[0], topk=3)
  np.testing.assert_array_equal(rank.gallery, [1, 2, 3])
  np.testing.assert_array_equal(rank.matches, [True, False, True])
  np.testing.assert_allclose(rank.distances, 2 - 2 * np.cos(angles[1:4]), atol=1e-6)
  assert rank.ap == pytest.approx((1 / 1 + 2 / 3) / 2)

  tile = (40, 20)
  colours = [(200, 200, 0), (0, 200, 200), (200, 0, 200), (90, 90, 90)]
  picture = ranks.draw_rank_list(rank, Image.new("RGB", (20, 40), colours[0]),
                                 [Image.new("RGB", (30, 60), c) for c in colours[1:]], (7, 0),
                                 [(int(g_pids[i]), int(g_cams[i])) for i in rank.gallery], tile=tile, topk=3)
  layout = ranks.RankLayout(tile, 3)
  assert picture.size == layout.size
  px = np.asarray(picture)
  assert _frame_color(px, layout, 0) == ranks.QUERY_COLOR
  assert [_frame_color(px, layout, k) for k in (1, 2, 3)] == [ranks.MATCH_COLOR, ranks.MISMATCH_COLOR,
                                                              ranks.MATCH_COLOR]
  for k, colour in enumerate(colours):  # each image pasted inside its own frame
    left, top, right, bottom = layout.image_box(k)
    assert tuple(px[(top + bottom) // 2, (left + right) // 2]) == colour
  # The distances are printed under the tiles: dark text pixels below each gallery frame.
  for k in (1, 2, 3):
    left, _, right, bottom = layout.frame_box(k)
    assert (px[bottom + 2:bottom + 14, left:right] < 100).all(-1).any()


def test_choose_queries_worst_skips_queries_without_match():
  ap = np.array([0.5, np.nan, 0.1, 0.9, 0.1])
  np.testing.assert_array_equal(ranks.choose_queries(ap, 2, worst=True), [2, 4])
  picked = ranks.choose_queries(ap, 10, seed=3)
  np.testing.assert_array_equal(picked, [0, 2, 3, 4])


def test_rank_list_keeps_other_identities_of_the_query_camera():
  """The protocol drops only the query's identity seen by the query's camera; another person in that camera stays."""
  qf = np.array([[1.0, 0.0]])
  angles = np.array([0.0, 0.1, 0.2])
  gf = np.stack([np.cos(angles), np.sin(angles)], 1)
  (rank,) = ranks.rank_lists(qf, gf, [7], [7, 3, 7], [0], [0, 0, 1], queries=[0], topk=3)
  np.testing.assert_array_equal(rank.gallery, [1, 2])
  np.testing.assert_array_equal(rank.matches, [False, True])
  assert rank.ap == pytest.approx(1 / 2)


def test_tiles_keep_the_input_aspect_and_distances_show_the_smallest():
  assert ranks.tile_size((256, 128)) == (128, 64) and ranks.tile_size((256, 256)) == (128, 128)
  assert ranks.tile_size((224, 224), height=64) == (64, 64)
  assert ranks.distance_decimals(np.array([0.0, 0.0012, 0.9])) == 5  # 0.00120: three significant digits
  assert ranks.distance_decimals(np.array([0.25, 1.5])) == 3
  assert ranks.distance_decimals(np.array([0.00025, 0.5])) == 6  # 0.000250: six decimals, the most
  assert ranks.distance_decimals(np.array([1.2e-9])) == 6  # near-duplicates: still six, not all of them


def test_tsne_of_fewer_points_than_the_perplexity_needs():
  """A small run (a dozen points) lowers the perplexity to (n - 1) / 3 instead of failing."""
  x, _ = _clusters(num=3, per=4)
  y = tsne.tsne(x, tsne.TSNEOptions(num_iters=50, seed=0))
  assert y.shape == (12, 2) and np.all(np.isfinite(y))


def test_curves_keep_the_last_record_of_an_epoch():
  """A resumed run of an older version logged the epochs after its checkpoint again: the last record wins."""
  from clipreid_jax.visualize import curves  # pylint: disable=g-import-not-at-top
  records = [{"stage": 2, "epoch": 1, "loss": 5.0}, {"stage": 2, "epoch": 2, "loss": 4.0},
             {"stage": 2, "epoch": 2, "loss": 3.0}, {"final": True, "mAP": 0.1}, {"final": True, "mAP": 0.2}]
  stage1, stage2, final = curves.by_epoch(records)
  assert stage1 == {} and {e: r["loss"] for e, r in stage2.items()} == {1: 5.0, 2: 3.0} and final["mAP"] == 0.2


def test_root_reads_the_folder_of_a_run_trained_on_a_pack(tmp_path):
  """--root names the folder to read, also where the run's config.json records the packed copy it trained on."""
  from clipreid_jax import data  # pylint: disable=g-import-not-at-top
  from clipreid_jax.visualize import inputs  # pylint: disable=g-import-not-at-top
  root = data.write_synthetic_market(tmp_path / "m", num_train_ids=4, num_test_ids=2, imgs_per_id=4, num_cams=2,
                                     size=(32, 16), seed=2)
  _write_files(tmp_path, {"w/config.json": json.dumps({"dataset": {
      "name": "market1501", "root": "/nonexistent/folder", "packed_dir": "/nonexistent/pack", "check_counts": False}})})
  ds = inputs.dataset_for(None, str(root), tmp_path / "w")
  assert ds.name == "market1501" and ds.train.images is None and ds.train.same_records(
      data.get_dataset("market1501", root, check_counts=False).train)


def test_staged_folder_moves_nothing_where_a_file_is_in_the_way(tmp_path):
  from clipreid_jax.visualize import inputs  # pylint: disable=g-import-not-at-top
  out = tmp_path / "vis"
  _write_files(out, {"ranks": "a file", "keep.txt": "mine"})
  in_the_way = r"^--out: cannot write .*vis/ranks/q\.png: .*vis/ranks is in the way"
  with pytest.raises(inputs.VisualizeError, match=in_the_way):
    with inputs.staged_folder(out, "--out") as stage:
      _write_files(stage, {"a.png": "new", "ranks/q.png": "new"})
  assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "ranks"] and (out / "ranks").read_text() == "a file"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["vis"]  # no staging folder left
  # A folder where the block writes a file: refused before anything moves (os.replace would fail half-way).
  (out / "curves.png").mkdir()
  with pytest.raises(inputs.VisualizeError, match=r"^--out: cannot write .*vis/curves\.png: .*vis/curves\.png is in "
                     "the way"):
    with inputs.staged_folder(out, "--out") as stage:
      _write_files(stage, {"a.png": "new", "curves.png": "new"})
  assert sorted(p.name for p in out.iterdir()) == ["curves.png", "keep.txt", "ranks"] and (out / "curves.png").is_dir()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["vis"]


def test_sample_identities_owner_is_the_position_of_the_label():
  """The t-SNE colours images by `owner`, the position of their identity in `labels` (not the label itself), with
  at most `max_per_id` images each, in index order."""
  from clipreid_jax.data.records import Split  # pylint: disable=g-import-not-at-top
  from clipreid_jax.visualize import embedding  # pylint: disable=g-import-not-at-top
  pids = np.repeat(np.arange(30), np.arange(30) % 7 + 1)
  n = pids.size
  split = Split("/x", np.asarray([f"{i}.jpg" for i in range(n)]), pids, np.zeros(n, np.int32), np.zeros(n, np.int32))
  s = embedding.sample_identities(split, num_ids=5, max_per_id=3, seed=4)
  assert s.labels.size == 5 and np.all(np.diff(s.labels) > 0) and s.labels.max() >= 5
  np.testing.assert_array_equal(pids[s.indices], s.labels[s.owner])
  for k, label in enumerate(s.labels):
    own = s.indices[s.owner == k]
    assert own.size == min(3, np.sum(pids == label)) and np.all(np.diff(own) > 0)
  again = embedding.sample_identities(split, num_ids=5, max_per_id=3, seed=4)
  np.testing.assert_array_equal(again.indices, s.indices)


# ----------------------------------------------------------------------------------------------------------------
# A tiny trained run.


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("vis")
  config = tiny_config(root / "data")
  train.train_and_evaluate(config, str(root / "work"))
  return root, train.load_dataset(config)


@pytest.fixture(scope="module")
def rendered(run):
  from clipreid_jax.visualize import render_all
  root, dataset = run
  return render_all(root / "work", dataset, num_queries=2, num_worst=2)


def test_render_all_writes_every_picture(run, rendered):
  root, _ = run
  out = root / "work" / "visualizations"
  assert sorted(rendered) == ["curves", "ranks", "tsne"]
  assert rendered["tsne"] == [out / "tsne.png"] and rendered["curves"] == [out / "curves.png"]
  assert len(rendered["ranks"]) == 4 and all(p.parent == out / "ranks" for p in rendered["ranks"])
  assert sum(p.name.startswith("worst") for p in rendered["ranks"]) == 2
  for path in rendered["tsne"] + rendered["curves"]:
    _assert_picture(path, min_size=(600, 350))
  for path in rendered["ranks"]:
    _assert_picture(path)


def test_rank_list_pictures_frame_the_true_matches(run, rendered):
  from clipreid_jax.evaluation import evaluate
  from clipreid_jax.inference import FeatureExtractor
  from clipreid_jax.visualize import features
  root, dataset = run
  q, g = dataset.query, dataset.gallery
  extractor = FeatureExtractor(root / "work" / "model")
  qf, gf = features.eval_features(extractor, q), features.eval_features(extractor, g)
  ap = evaluate(qf, gf, q.pids, g.pids, q.camids, g.camids).per_query_ap
  worst = sorted(p for p in rendered["ranks"] if p.name.startswith("worst"))
  # The worst-AP pictures show the lowest-AP queries, in that order.
  shown = [int(re.search(r"_q(\d+)\.png$", p.name).group(1)) for p in worst]
  assert np.all(np.diff(ap[shown]) >= 0) and ap[shown[0]] == np.nanmin(ap)
  for path in rendered["ranks"]:
    query = int(re.search(r"_q(\d+)\.png$", path.name).group(1))
    (rank,) = ranks.rank_lists(qf, gf, q.pids, g.pids, q.camids, g.camids, [query], topk=10)
    layout = ranks.RankLayout(ranks.tile_size(extractor.input_size), 10)
    px = _pixels(path)
    assert (px.shape[1], px.shape[0]) == layout.size
    expected = [ranks.MATCH_COLOR if m else ranks.MISMATCH_COLOR for m in rank.matches]
    assert [_frame_color(px, layout, k) for k in range(1, len(rank.gallery) + 1)] == expected
    assert rank.ap == pytest.approx(ap[query])


def test_cli_subcommands_on_the_run(run, tmp_path, capsys):
  root, _ = run
  work = root / "work"
  (tmp_path / "r").mkdir()
  (tmp_path / "r" / "keep.txt").write_text("mine")  # an existing --out folder keeps its files
  # --dataset/--root come from the run's config.json (the workdir that holds --checkpoint).
  assert cli.main(["ranks", "--checkpoint", str(work / "model"), "--out", str(tmp_path / "r"), "--num", "2",
                   "--worst", "--topk", "5"]) == 0
  assert cli.main(["curves", "--workdir", str(work), "--out", str(tmp_path / "c.png")]) == 0
  printed = capsys.readouterr().out.split()
  assert len(printed) == 3 and all(pathlib.Path(p).is_file() for p in printed)
  assert len(list((tmp_path / "r").glob("worst*.png"))) == 2
  assert sorted(p.name for p in (tmp_path / "r").iterdir() if not p.name.startswith("worst")) == ["keep.txt"]
  _assert_picture(tmp_path / "c.png", min_size=(600, 350))


@pytest.fixture(scope="module")
def packed(run):
  """The run's data packed (python -m clipreid_jax.data.prepare), and the run's model in two workdirs whose
  config.json names market1501 at a root that does not exist: 'packed' records the pack, as a run trained with
  --config.dataset.packed_dir does; 'folder' records no pack."""
  from clipreid_jax.data import packed as packed_lib
  root, _ = run
  pack = root / "pack"
  packed_lib.prepare("market1501", root / "data", pack)
  config = json.loads((root / "work" / "config.json").read_text())
  works = {}
  for kind, packed_dir in (("packed", str(pack)), ("folder", "")):
    work = works[kind] = root / f"work_{kind}"
    work.mkdir()
    config["dataset"].update(name="market1501", root="/nonexistent", packed_dir=packed_dir, check_counts=False)
    (work / "config.json").write_text(json.dumps(config))
    # A copy, not a link: `ranks` reads the config.json beside the resolved --checkpoint.
    shutil.copytree(root / "work" / "model", work / "model")
    for name in ("stage1", "metrics.jsonl"):
      (work / name).symlink_to(root / "work" / name)
  return pack, works


def _same_pictures(a: pathlib.Path, b: pathlib.Path) -> None:
  names = sorted(p.relative_to(a) for p in a.rglob("*.png"))
  assert names and names == sorted(p.relative_to(b) for p in b.rglob("*.png"))
  for name in names:
    np.testing.assert_array_equal(_pixels(a / name), _pixels(b / name))


def test_cli_reads_the_pack_the_run_trained_on(run, packed, tmp_path, capsys):
  # The run's config.json names a pack and a root that is gone: every subcommand reads the pack.
  root, _ = run
  work = packed[1]["packed"]
  ranks_args = ["--num", "2", "--worst", "--topk", "5"]
  assert cli.main(["ranks", "--checkpoint", str(work / "model"), "--out", str(tmp_path / "pack")] + ranks_args) == 0
  assert cli.main(["all", "--workdir", str(work), "--out", str(tmp_path / "all"), "--num", "1"]) == 0
  # --root reads the folder instead of the recorded pack: the same records and pixels, so the same pictures.
  assert cli.main(["ranks", "--checkpoint", str(work / "model"), "--out", str(tmp_path / "folder"),
                   "--root", str(root / "data")] + ranks_args) == 0
  assert capsys.readouterr().err == ""
  _same_pictures(tmp_path / "pack", tmp_path / "folder")
  assert sorted(p.relative_to(tmp_path / "all").as_posix() for p in (tmp_path / "all").rglob("*.png")
                if p.parent.name != "ranks") == ["curves.png", "tsne.png"]
  assert len(list((tmp_path / "all" / "ranks").glob("*.png"))) == 2


def test_cli_packed_dir_option(run, packed, tmp_path, capsys):
  # The run recorded a folder that is gone: an error naming it, until --packed_dir names a packed copy.
  pack, works = packed
  model = str(works["folder"] / "model")
  assert cli.main(["ranks", "--checkpoint", model, "--out", str(tmp_path / "r"), "--num", "2"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and re.match(r"error: market1501: root /nonexistent is not a folder", err), err
  assert not (tmp_path / "r").exists()
  assert cli.main(["ranks", "--checkpoint", model, "--out", str(tmp_path / "r"), "--num", "2", "--packed_dir",
                   str(pack)]) == 0
  assert capsys.readouterr().err == ""
  assert len(list((tmp_path / "r").glob("*.png"))) == 2


_RECORDS = ['{"stage": 1, "epoch": 1, "loss": 2.0, "lr": 0.001}',
            '{"stage": 2, "epoch": 1, "loss": 3.0, "id_cls": 2.5, "lr": 0.0001, "accuracy": 0.4, "eval_mAP": 0.2}',
            '{"final": true, "mAP": 0.25, "R1": 0.5}']


def _write_files(root: pathlib.Path, files: dict) -> None:
  for name, text in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)


@pytest.mark.parametrize("argv, files, message", [
    (["curves", "--workdir", "{tmp}/missing", "--out", "{tmp}/c.png"], {}, "--workdir: .*missing is not a directory"),
    (["tsne", "--workdir", "{tmp}/missing", "--out", "{tmp}/t"], {}, "--workdir: .*missing is not a directory"),
    (["ranks", "--checkpoint", "{tmp}/missing", "--out", "{tmp}/r"], {},
     "--checkpoint: .*missing is not a directory"),
    (["ranks", "--checkpoint", "{tmp}", "--out", "{tmp}/r"], {}, "is not a model directory"),
    (["ranks", "--checkpoint", "{tmp}", "--out", "{tmp}/r", "--batch-size", "0"], {},
     "--batch-size: expected a positive number, got 0"),
    (["ranks", "--checkpoint", "{tmp}", "--out", "{tmp}/r", "--topk", "0"], {},
     "--topk: expected a positive number, got 0"),
    (["ranks", "--checkpoint", "{tmp}/m", "--out", "{tmp}/r"], {"m/config.json": "{}"},
     "--checkpoint: .*m is not a model directory \\(expected config.json and variables/ in it\\)"),
    # `all --num 0` drew no rank lists without a word; refused as `ranks --num 0` is.
    (["all", "--workdir", "{tmp}", "--out", "{tmp}/v", "--num", "0"], {}, "--num: expected a positive number, got 0"),
    (["curves", "--workdir", "{tmp}", "--out", "{tmp}/c.png"], {}, "metrics.jsonl not found"),
    # A line that is JSON but not a record, before the last line: an error, as a line that is not JSON.
    (["curves", "--workdir", "{tmp}/w", "--out", "{tmp}/c.png"],
     {"w/metrics.jsonl": "\n".join(["null"] + _RECORDS) + "\n"}, r"metrics\.jsonl: line 1 is not a JSON object"),
    (["curves", "--workdir", "{tmp}/w", "--out", "{tmp}/c.png"],
     {"w/metrics.jsonl": "\n".join([_RECORDS[0], "[1, 2]"] + _RECORDS[1:]) + "\n"},
     r"metrics\.jsonl: line 2 is not a JSON object"),
    (["curves", "--workdir", "{tmp}/w", "--out", "{tmp}/c.png"],
     {"w/metrics.jsonl": "\n".join(_RECORDS[:2] + ['{"stage": 2, "ep', _RECORDS[2]]) + "\n"},
     r"metrics\.jsonl: line 3 is not JSON"),
    (["curves", "--workdir", "{tmp}/w", "--out", "{tmp}/c.png"],
     {"w/metrics.jsonl": '{"stage": 2, "epoch": "two", "loss": 1.0}\n'}, "epoch 'two', expected an integer"),
    (["curves", "--workdir", "{tmp}/w", "--out", "{tmp}/c.pdf"], {"w/metrics.jsonl": "\n".join(_RECORDS)},
     "--out: expected a .png file or a folder"),
    (["curves", "--workdir", "{tmp}/w", "--out", "{tmp}/file/c.png"],
     {"w/metrics.jsonl": "\n".join(_RECORDS), "file": ""}, "--out: .*file exists and is not a folder"),
    (["tsne", "--workdir", "{tmp}", "--out", "{tmp}/t", "--root", "{tmp}/a", "--packed_dir", "{tmp}/b"], {},
     "--root and --packed_dir: expected one of them"),
    (["tsne", "--workdir", "{tmp}", "--out", "{tmp}/t", "--dataset", "market1501", "--packed_dir", "{tmp}"], {},
     "packed market1501: not prepared under .*; run python -m clipreid_jax.data.prepare"),
    # A run trained from a pack that is gone: the pack is looked for, not the folder (tfds' own log line silenced).
    (["tsne", "--workdir", "{tmp}/w", "--out", "{tmp}/t"],
     {"w/config.json": json.dumps({"dataset": {"name": "market1501", "root": "/nonexistent/folder",
                                               "packed_dir": "/nonexistent/pack"}})},
     "packed market1501: .*under /nonexistent/pack"),
    # A model directory or an eval workdir given as --workdir: said as such (it named a config.json that did not
    # exist, or asked for --dataset and --root).
    (["tsne", "--workdir", "{tmp}/m", "--out", "{tmp}/t"],
     {"m/config.json": '{"kind": "clipreid"}', "m/variables/x": ""},
     r"both are needed \(.*m is a model directory, not a training workdir: pass the workdir that holds it\)"),
    (["tsne", "--workdir", "{tmp}/e", "--out", "{tmp}/t"], {"e/metrics.json": "{}"},
     r"both are needed \(.*e holds no config.json: not a training workdir\)"),
], ids=["curves-workdir", "tsne-workdir", "ranks-checkpoint", "ranks-not-a-model", "ranks-batch-size-0",
        "ranks-topk-0", "ranks-no-variables", "all-num-0", "curves-no-metrics", "curves-null-line", "curves-list-line",
        "curves-torn-line", "curves-epoch-not-int",
        "curves-out-pdf", "curves-out-under-a-file", "root-and-packed-dir", "packed-dir-not-prepared",
        "recorded-pack-missing", "workdir-is-a-model", "workdir-of-an-evaluation"])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, files, message):
  _write_files(tmp_path, files)
  before = sorted(tmp_path.rglob("*"))
  argv = [a.format(tmp=tmp_path) for a in argv]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ") and re.search(message, err), err
  assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_curves_skips_a_last_line_that_is_not_a_record(tmp_path, capsys):
  _write_files(tmp_path, {"w/metrics.jsonl": "\n".join(_RECORDS + ["null"]) + "\n"})
  assert cli.main(["curves", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "c.png")]) == 0
  out, err = capsys.readouterr()
  assert out == f"{tmp_path / 'c.png'}\n"
  assert re.fullmatch(r"warning: .*metrics\.jsonl: skipping the last line, which is not a JSON object\n", err), err
  _assert_picture(tmp_path / "c.png", min_size=(600, 350))


@pytest.mark.parametrize("out, written", [
    ("existing", "existing/curves.png"),  # an existing folder: curves.png in it
    ("new/", "new/curves.png"),  # a trailing slash names a folder
    ("plain", "plain.png"),  # no suffix: .png added (matplotlib would add it anyway)
    ("C.PNG", "C.PNG"),
], ids=["existing-folder", "trailing-slash", "no-suffix", "png"])
def test_curves_out_prints_the_path_written(tmp_path, capsys, out, written):
  _write_files(tmp_path, {"w/metrics.jsonl": "\n".join(_RECORDS) + "\n"})
  (tmp_path / "existing").mkdir()
  assert cli.main(["curves", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path) + "/" + out]) == 0
  printed = capsys.readouterr().out
  assert pathlib.Path(printed.strip()) == tmp_path / written and printed.count("\n") == 1
  _assert_picture(tmp_path / written, min_size=(600, 350))
  pictures = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
  assert pictures == sorted([written, "w/metrics.jsonl"])  # no stray or temporary file


def _workdir_like(run, dest: pathlib.Path, metrics: bool = True, stage1: str = "link") -> pathlib.Path:
  """A workdir sharing the trained run's model (links), with or without metrics.jsonl, and a stage1/ that is
  the run's ('link') or a model directory whose variables cannot be restored ('broken')."""
  work = run[0] / "work"
  dest.mkdir()
  for name in ["config.json", "model"] + (["metrics.jsonl"] if metrics else []):
    (dest / name).symlink_to(work / name)
  if stage1 == "link":
    (dest / "stage1").symlink_to(work / "stage1")
  else:
    (dest / "stage1" / "variables").mkdir(parents=True)
    (dest / "stage1" / "config.json").write_text((work / "stage1" / "config.json").read_text())
  return dest


def test_cli_all_fails_before_writing_anything(run, tmp_path, capsys):
  # No metrics.jsonl: found missing before the features are extracted; the new --out folder is not created.
  work = _workdir_like(run, tmp_path / "no_metrics", metrics=False)
  assert cli.main(["all", "--workdir", str(work), "--out", str(tmp_path / "vis" / "deep"), "--num", "1"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and re.match(r"error: --workdir: .*metrics\.jsonl not found", err), err
  assert not (tmp_path / "vis").exists()


def test_cli_all_failing_midway_leaves_out_as_it_was(run, tmp_path, capsys):
  # stage1/ cannot be restored: the t-SNE fails after the rank lists were drawn. An existing --out keeps its
  # files, old pictures included, and gains nothing (no rank list, no staging folder).
  work = _workdir_like(run, tmp_path / "broken_stage1", stage1="broken")
  out = tmp_path / "vis"
  _write_files(out, {"keep.txt": "mine", "tsne.png": "old"})
  assert cli.main(["all", "--workdir", str(work), "--out", str(out), "--num", "1"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ") and "stage1" in err, err
  assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "tsne.png"]
  assert (out / "tsne.png").read_text() == "old"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["broken_stage1", "vis"]


def test_cli_process_exit_code():
  proc = subprocess.run([sys.executable, "-m", "clipreid_jax.visualize", "ranks", "--checkpoint", "/nonexistent/m",
                         "--out", "/tmp/unused"], capture_output=True, text=True, cwd=REPO, timeout=60)
  assert proc.returncode == 2
  assert proc.stderr == "error: --checkpoint: /nonexistent/m is not a directory\n"


def test_rank_lists_need_a_valid_query(run, tmp_path, capsys):
  """A dataset whose queries all lose their matches to the same-camera rule: one line, exit 2, nothing written
  (the evaluation's ValueError used to end in a traceback)."""
  root, dataset = run
  rows = lambda split: "".join(f"{split.path(i)},{split.pids[i]},0\n" for i in range(len(split)))
  custom = tmp_path / "one_camera"
  custom.mkdir()
  for name in ("train", "query", "gallery"):
    (custom / f"{name}.csv").write_text(rows(getattr(dataset, name)))
  out = tmp_path / "r"
  assert cli.main(["ranks", "--checkpoint", str(root / "work" / "model"), "--dataset", "custom", "--root",
                   str(custom), "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no query has a gallery image of its identity from another camera" in err[0], err
  assert not out.exists()


def test_rank_lists_of_an_sie_model_on_other_cameras(run, tmp_path, capsys):
  """An SIE model (3 cameras) on a dataset with camera ids past its table: one line, exit 2 (was a traceback)."""
  from clipreid_jax import convert  # pylint: disable=g-import-not-at-top
  from golden_reid import convert_args, variants  # pylint: disable=g-import-not-at-top
  root, dataset = run
  variant = next(v for v in variants() if v.parent.name == "vit" and v.name == "c_sie_cam")
  assert convert.main(convert_args(variant, tmp_path / "sie")) == 0
  custom = tmp_path / "five_cameras"
  custom.mkdir()
  for name, shift in (("train", 0), ("query", 2), ("gallery", 0)):
    split = getattr(dataset, name)
    (custom / f"{name}.csv").write_text("".join(f"{split.path(i)},{split.pids[i]},{split.camids[i] + shift}\n"
                                                for i in range(len(split))))
  out = tmp_path / "r"
  assert cli.main(["ranks", "--checkpoint", str(tmp_path / "sie"), "--dataset", "custom", "--root", str(custom),
                   "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: custom: query camera id 3, 4 is outside the SIE table (rows "
                                             "0..2"), err
  assert not out.exists()
  # Ids inside the table, but fewer cameras than it was trained with: refused as eval mode refuses it (was drawn).
  two = tmp_path / "two_cameras"
  two.mkdir()
  for name in ("train", "query", "gallery"):
    split = getattr(dataset, name)
    (two / f"{name}.csv").write_text("".join(f"{split.path(i)},{split.pids[i]},{split.camids[i] % 2}\n"
                                             for i in range(len(split))))
  assert cli.main(["ranks", "--checkpoint", str(tmp_path / "sie"), "--dataset", "custom", "--root", str(two),
                   "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"error: --checkpoint: {tmp_path / 'sie'} has an SIE table for 3 "
                                             "cameras, but dataset custom (query under "), err
  assert err[0].endswith("has 2; expected the same cameras") and not out.exists()
