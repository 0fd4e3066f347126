"""The PK identity sampler: P identities x K images per batch, as a pure function of (seed, epoch).

Semantics of the official `RandomIdentitySampler` (datasets/sampler.py), kept:
  1. for every identity, its image indices, drawn K at a time with replacement when it has fewer than K;
  2. shuffled and cut into chunks of K; a remainder under K is dropped;
  3. while at least P identities still hold chunks: P distinct identities drawn uniformly among them, one chunk
     popped from each (in the drawn order); identities leave when their chunks run out; leftover chunks are dropped.
So every batch holds exactly P distinct identities x K images, and the number of batches varies a little from
epoch to epoch (it is reported by `len` of the epoch's plan).

Deliberate differences: the random numbers come from numpy's Generator seeded by (seed, epoch) instead of the global
Python/numpy state, so the plan is reproducible and the same on every host without communication; the batches of an
epoch are a global plan that each host slices (see `host_slice`).
"""
from __future__ import annotations

import numpy as np

from clipreid_jax.data import errors


def pk_epoch_plan(pids: np.ndarray, *, num_ids: int, num_instances: int, seed: int, epoch: int) -> np.ndarray:
  """The record indices of every PK batch of one epoch.

  Args:
    pids: (N,) identity label of every training record.
    num_ids: P, distinct identities per batch.
    num_instances: K, images per identity per batch.
    seed: run seed.
    epoch: epoch number; each epoch has its own plan.

  Returns:
    int64 (num_batches, P * K): row b lists batch b as P groups of K indices of the same identity.

  Raises:
    NotEnoughIdentitiesError: fewer than P identities (not even one batch can be drawn).
  """
  pids = np.asarray(pids)
  ids, inverse = np.unique(pids, return_inverse=True)
  if len(ids) < num_ids:
    raise errors.NotEnoughIdentitiesError(
        f"the PK sampler needs at least P={num_ids} identities per batch, the training split has {len(ids)}")
  if num_ids < 1 or num_instances < 1:
    raise errors.DataError(f"PK sampler: P={num_ids} and K={num_instances} must be positive")
  rng = np.random.default_rng([int(seed), int(epoch)])
  order = np.argsort(inverse, kind="stable")
  starts = np.searchsorted(inverse[order], np.arange(len(ids) + 1))
  chunks: list[np.ndarray] = []  # chunks[i]: (num_chunks_i, K) for identity i
  for i in range(len(ids)):
    idx = order[starts[i]:starts[i + 1]]
    if len(idx) < num_instances:
      idx = rng.choice(idx, size=num_instances, replace=True)
    idx = rng.permutation(idx)
    usable = len(idx) // num_instances * num_instances
    chunks.append(idx[:usable].reshape(-1, num_instances))
  remaining = np.array([len(c) for c in chunks])
  taken = np.zeros(len(ids), np.int64)
  batches = []
  while True:
    available = np.flatnonzero(taken < remaining)
    if len(available) < num_ids:
      break
    chosen = rng.choice(available, size=num_ids, replace=False)
    batches.append(np.concatenate([chunks[i][taken[i]] for i in chosen]))
    taken[chosen] += 1
  if not batches:
    return np.zeros((0, num_ids * num_instances), np.int64)
  return np.stack(batches).astype(np.int64)


def host_slice(global_batch: int, process_index: int, process_count: int) -> slice:
  """The part of each global batch that host `process_index` of `process_count` loads.

  Raises:
    DataError: the global batch does not split evenly over the hosts.
  """
  if process_count < 1 or not 0 <= process_index < process_count:
    raise errors.DataError(f"process_index {process_index} is not in [0, {process_count})")
  if global_batch % process_count:
    raise errors.DataError(f"global batch {global_batch} does not split evenly over {process_count} hosts")
  per_host = global_batch // process_count
  return slice(process_index * per_host, (process_index + 1) * per_host)


def padded_plan(num_records: int, global_batch: int) -> tuple[np.ndarray, np.ndarray]:
  """Every record once, in order, in batches of `global_batch`, the last one padded.

  Returns:
    (indices, mask), both (num_batches, global_batch); padding repeats index 0 with mask False.
  """
  num_batches = -(-num_records // global_batch)
  flat = np.arange(num_batches * global_batch, dtype=np.int64)
  mask = flat < num_records
  return np.where(mask, flat, 0).reshape(num_batches, global_batch), mask.reshape(num_batches, global_batch)
