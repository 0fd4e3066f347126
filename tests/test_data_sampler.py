"""PK identity sampler: the official RandomIdentitySampler invariants, over many epochs, as a pure function."""
import numpy as np
import pytest

from clipreid_jax import data
from clipreid_jax.data import sampler

P, K = 4, 3


@pytest.fixture(scope="module")
def pids():
  # Identities with 1, 2 (fewer than K: drawn with replacement), exactly K, and many images; shuffled record order.
  counts = [1, 2, 3, 3, 4, 5, 7, 9, 12, 2, 6, 30]
  pids = np.repeat(np.arange(len(counts)), counts)
  return np.random.default_rng(0).permutation(pids)


def _check_epoch(plan: np.ndarray, pids: np.ndarray) -> None:
  counts = np.bincount(pids)
  chunks_total = np.maximum(counts, K) // K  # chunks per identity
  assert plan.shape[1] == P * K and plan.dtype == np.int64
  assert plan.min() >= 0 and plan.max() < len(pids)
  used = np.zeros(len(counts), int)
  seen = [[] for _ in counts]
  for batch in plan:
    groups = pids[batch].reshape(P, K)
    assert (groups == groups[:, :1]).all(), "each group of K holds one identity"
    ids = groups[:, 0]
    assert len(set(ids.tolist())) == P, "P distinct identities per batch"
    for g, i in zip(batch.reshape(P, K), ids):
      used[i] += 1
      seen[i].extend(g.tolist())
      if counts[i] >= K:
        assert len(set(g.tolist())) == K, "no repeats within a chunk of an identity with >= K images"
  assert (used <= chunks_total).all()
  for i, s in enumerate(seen):
    if counts[i] >= K:
      assert len(s) == len(set(s)), "an image is used at most once per epoch"
  # The loop runs until fewer than P identities have chunks left; the rest are dropped.
  assert ((chunks_total - used) > 0).sum() < P
  assert len(plan) <= chunks_total.sum() // P


def test_invariants_over_many_epochs(pids):
  lengths, firsts = set(), set()
  for epoch in range(1, 61):
    plan = data.pk_epoch_plan(pids, num_ids=P, num_instances=K, seed=123, epoch=epoch)
    _check_epoch(plan, pids)
    lengths.add(len(plan))
    firsts.add(tuple(plan[0]))
  assert len(firsts) > 50  # epochs differ
  assert min(lengths) >= 3 and len(lengths) > 1  # the batch count varies a little, as in the official sampler


def test_every_identity_is_sampled_over_epochs(pids):
  hits = np.zeros(pids.max() + 1)
  for epoch in range(40):
    plan = data.pk_epoch_plan(pids, num_ids=P, num_instances=K, seed=1, epoch=epoch)
    np.add.at(hits, pids[plan[:, ::K]].ravel(), 1)
  assert (hits > 0).all()
  # Identities with fewer than K images still give one chunk per epoch; the 30-image identity gives up to 10.
  assert hits[0] > 0 and hits[11] > hits[0]


def test_pure_function_of_seed_and_epoch(pids):
  a = data.pk_epoch_plan(pids, num_ids=P, num_instances=K, seed=7, epoch=3)
  b = data.pk_epoch_plan(pids.copy(), num_ids=P, num_instances=K, seed=7, epoch=3)
  np.testing.assert_array_equal(a, b)
  c = data.pk_epoch_plan(pids, num_ids=P, num_instances=K, seed=8, epoch=3)
  d = data.pk_epoch_plan(pids, num_ids=P, num_instances=K, seed=7, epoch=4)
  assert not np.array_equal(a[:len(c)], c[:len(a)]) and not np.array_equal(a[:len(d)], d[:len(a)])


def test_official_batch_size_and_labels():
  # Batch 64 with NUM_INSTANCE 4: 16 identities x 4 images, as in every official config.
  pids = np.repeat(np.arange(40), 9)
  plan = data.pk_epoch_plan(pids, num_ids=16, num_instances=4, seed=0, epoch=1)
  assert plan.shape[1] == 64
  assert all(len(np.unique(pids[b])) == 16 for b in plan)
  # 40 ids x 2 chunks: batches stop once fewer than 16 identities hold chunks.
  assert 4 <= len(plan) <= 5


def test_fewer_identities_than_p():
  with pytest.raises(data.NotEnoughIdentitiesError, match="P=5"):
    data.pk_epoch_plan(np.arange(4), num_ids=5, num_instances=2, seed=0, epoch=0)


def test_host_slices_tile_the_global_batch():
  slices = [sampler.host_slice(64, i, 4) for i in range(4)]
  assert [(s.start, s.stop) for s in slices] == [(0, 16), (16, 32), (32, 48), (48, 64)]
  with pytest.raises(data.DataError):
    sampler.host_slice(64, 4, 4)


def test_padded_plan():
  idx, mask = sampler.padded_plan(10, 4)
  assert idx.shape == (3, 4) and mask.sum() == 10 and not mask[-1, 2:].any()
  np.testing.assert_array_equal(idx[mask], np.arange(10))


def test_images_of_an_identity_are_shuffled_each_epoch():
  # Identity 0 has 5 images and K=3: one chunk per epoch, drawn from a fresh shuffle (official: random.shuffle of
  # the identity's indices), so over epochs every image appears and the chunk's set of images varies.
  pids = np.repeat(np.arange(4), [5, 3, 3, 3])
  chunk_sets, used = set(), set()
  for epoch in range(20):
    plan = data.pk_epoch_plan(pids, num_ids=2, num_instances=3, seed=5, epoch=epoch)
    for group in plan.reshape(-1, 3):
      if pids[group[0]] == 0:
        chunk_sets.add(frozenset(group.tolist()))
        used.update(group.tolist())
  assert used == set(np.flatnonzero(pids == 0).tolist())
  assert len(chunk_sets) >= 3


def test_seed_and_epoch_are_not_summed():
  # (seed, epoch) seeds the generator as a pair; a sum would give seed 7 epoch 4 the plan of seed 8 epoch 3.
  pids = np.repeat(np.arange(12), 6)
  a = data.pk_epoch_plan(pids, num_ids=4, num_instances=3, seed=7, epoch=4)
  b = data.pk_epoch_plan(pids, num_ids=4, num_instances=3, seed=8, epoch=3)
  n = min(len(a), len(b))
  assert n >= 4 and not np.array_equal(a[:n], b[:n])


def test_identities_within_a_batch_are_in_drawn_order():
  # The official sampler pops chunks in the random.sample order, not sorted by identity.
  pids = np.repeat(np.arange(12), 6)
  orders = []
  for epoch in range(5):
    plan = data.pk_epoch_plan(pids, num_ids=4, num_instances=3, seed=0, epoch=epoch)
    orders.extend(pids[plan[:, ::3]].tolist())
  ascending = sum(row == sorted(row) for row in orders)
  # 4 distinct ids in random order are ascending with probability 1/24; allow generous slack.
  assert len(orders) >= 20 and ascending <= len(orders) // 4
