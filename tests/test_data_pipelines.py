"""grain loaders: PK batches, determinism, multi-host slices, mid-epoch restore, stage-1 and evaluation coverage."""
import os
import pathlib
import signal
import time

import numpy as np
import pytest

from clipreid_jax import data

SIZE = (32, 16)
P, K = 4, 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("synthetic")
  data.write_synthetic_market(root, num_train_ids=10, num_test_ids=5, imgs_per_id=5, num_cams=3, size=(32, 16),
                              seed=3)
  return data.get_dataset("market1501", root)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _loader(dataset, **kw):
  args = dict(image_size=SIZE, num_ids=P, num_instances=K, seed=5, epoch=2)
  args.update(kw)
  return data.train_loader(dataset.train, **args)


def test_train_batches(dataset):
  loader = _loader(dataset)
  assert len(loader) == len(loader.plan) > 3
  batches = list(loader)
  assert len(batches) == len(loader)
  for b, plan_row in zip(batches, loader.plan):
    assert b["image"].shape == (P * K, *SIZE, 3) and b["image"].dtype == np.uint8
    np.testing.assert_array_equal(b["index"], plan_row)
    np.testing.assert_array_equal(b["pid"], dataset.train.pids[plan_row])
    np.testing.assert_array_equal(b["camid"], dataset.train.camids[plan_row])
    assert b["mask"].all() and len(set(b["pid"].tolist())) == P
  # Images are the PIL bicubic resize of the files.
  first = batches[0]
  expected = data.load_resized(dataset.train.path(first["index"][0]), SIZE, data.images.BICUBIC)
  np.testing.assert_array_equal(first["image"][0], expected)


def test_deterministic_across_runs_and_epochs(dataset):
  a, b = list(_loader(dataset)), list(_loader(dataset))
  assert len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
  other = next(iter(_loader(dataset, epoch=3)))
  assert not np.array_equal(other["index"], a[0]["index"])


def test_multi_host_slices_concatenate_to_the_global_batch(dataset):
  whole = list(_loader(dataset))
  hosts = [list(_loader(dataset, process_index=i, process_count=2)) for i in range(2)]
  assert all(len(h) == len(whole) for h in hosts)
  for g, h0, h1 in zip(whole, *hosts):
    assert h0["image"].shape[0] == P * K // 2
    assert all(np.array_equal(g[k], np.concatenate([h0[k], h1[k]])) for k in g)


def test_iterator_restores_mid_epoch(dataset):
  loader = _loader(dataset)
  it = iter(loader)
  _take(it, 2)
  state = it.get_state()
  expected = _take(it, 2)
  restored = iter(_loader(dataset))  # a new process would rebuild the same loader from (seed, epoch)
  restored.set_state(state)
  assert all(_equal(x, y) for x, y in zip(_take(restored, 2), expected))


@pytest.mark.parametrize("workers", [0, 1])
def test_iterator_from_a_batch_number(dataset, workers):
  """What a resumed epoch reads: the batches from number `start` on, the same with grain worker processes."""
  whole = list(_loader(dataset))
  rest = list(_loader(dataset, worker_count=workers).iterator(start=2))
  assert len(rest) == len(whole) - 2 and all(_equal(x, y) for x, y in zip(rest, whole[2:]))
  assert list(_loader(dataset).iterator(start=len(whole))) == []
  with pytest.raises(ValueError, match=r"start: expected a batch number in \[0, \d+\], got -1"):
    _loader(dataset).iterator(start=-1)


def test_restore_through_grain_checkpoint(dataset, tmp_path):
  import grain
  import orbax.checkpoint as ocp
  loader = _loader(dataset)
  it = iter(loader)
  _take(it, 1)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = next(it)
    fresh = iter(_loader(dataset))
    mngr.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert _equal(next(fresh), expected)


def test_stage1_loader_covers_train_once_in_order(dataset):
  n = len(dataset.train)
  batches = list(data.stage1_loader(dataset.train, image_size=SIZE, batch_size=16))
  assert len(batches) == -(-n // 16)
  idx = np.concatenate([b["index"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(idx, np.arange(n))
  assert not batches[-1]["mask"].all() or n % 16 == 0
  # Test transform resize (PIL bilinear).
  expected = data.load_resized(dataset.train.path(3), SIZE, data.images.BILINEAR)
  np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches])[3], expected)


def test_eval_loader_query_then_gallery_multi_host(dataset):
  nq, ng = len(dataset.query), len(dataset.gallery)
  hosts = [list(data.eval_loader(dataset.query, dataset.gallery, image_size=SIZE, batch_size=8, process_index=i,
                                 process_count=2)) for i in range(2)]
  merged = [{k: np.concatenate([h0[k], h1[k]]) for k in h0} for h0, h1 in zip(*hosts)]
  idx = np.concatenate([b["index"][b["mask"]] for b in merged])
  np.testing.assert_array_equal(idx, np.arange(nq + ng))
  pids = np.concatenate([b["pid"][b["mask"]] for b in merged])
  np.testing.assert_array_equal(pids, np.concatenate([dataset.query.pids, dataset.gallery.pids]))
  cams = np.concatenate([b["camid"][b["mask"]] for b in merged])
  np.testing.assert_array_equal(cams, np.concatenate([dataset.query.camids, dataset.gallery.camids]))
  assert sum(int(b["mask"].sum()) for b in merged) == nq + ng


def test_one_grain_worker_gives_the_same_batches(dataset):
  # grain worker processes need parsed absl flags; the loader marks them parsed when needed.
  loader = _loader(dataset, worker_count=1)
  it = iter(loader)
  try:
    got = _take(it, 3)
  finally:
    it.close()
  expected = _take(iter(_loader(dataset)), 3)
  assert all(_equal(x, y) for x, y in zip(got, expected))


def _children(pid: int) -> list[int]:
  found = []
  for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
    try:
      found += [int(c) for c in (task / "children").read_text().split()]
    except FileNotFoundError:  # a thread that ended since the listing
      pass
  return found


def test_grain_workers_ignore_a_terminal_ctrl_c(dataset):
  """A terminal's Ctrl-C reaches the worker processes too; they ignore it and the trainer, which saves and stops
  on its own, still gets its batches (a worker killed by it failed the next batch)."""
  loader = _loader(dataset, worker_count=1)
  expected = _take(iter(_loader(dataset)), len(loader))
  it = iter(loader)
  try:
    got = _take(it, 1)
    workers = _children(os.getpid())
    assert workers
    for pid in workers:
      os.kill(pid, signal.SIGINT)
    time.sleep(1.0)
    got += _take(it, len(loader) - 1)
  finally:
    it.close()
  assert all(_equal(x, y) for x, y in zip(got, expected)) and len(got) == len(expected)


def test_each_loader_resizes_with_its_own_filter(dataset):
  """Train batches are PIL bicubic (the official train transform), stage-1 and evaluation batches PIL bilinear (the
  test transform), at a size the files do not have (at the files' own size every filter is the identity)."""
  size = (24, 12)
  bicubic = data.load_resized(dataset.train.path(0), size, data.images.BICUBIC)
  bilinear = data.load_resized(dataset.train.path(0), size, data.images.BILINEAR)
  assert not np.array_equal(bicubic, bilinear)  # the filters differ on these pictures

  def image_of(batches, index):
    return next(b["image"][i] for b in batches for i in range(len(b["index"])) if b["index"][i] == index)

  np.testing.assert_array_equal(image_of(list(_loader(dataset, image_size=size)), 0), bicubic)
  stage1 = list(data.stage1_loader(dataset.train, image_size=size, batch_size=16))
  np.testing.assert_array_equal(image_of(stage1, 0), bilinear)
  evaluation = list(data.eval_loader(dataset.query, dataset.gallery, image_size=size, batch_size=16))
  np.testing.assert_array_equal(image_of(evaluation, 0),
                                data.load_resized(dataset.query.path(0), size, data.images.BILINEAR))
