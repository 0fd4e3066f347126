"""grain pipelines: the PK training loader, the stage-1 loader and the evaluation loader.

Each loader is a `grain.MapDataset` of this host's batches built from a global plan (a numpy array of record
indices that every host computes identically), so batches are a pure function of the plan, a position is just a
batch number (`Loader.iterator(start)`; grain's `get_state`/`set_state` work too), and host h of n loads columns
[h*B/n, (h+1)*B/n) of every global batch of B. The host decodes and resizes with PIL into uint8 NHWC; normalisation
and the random train augmentation run on the device (`device_augment.py`).

Batch fields (numpy): `image` uint8 (b, H, W, 3), `pid` int32 (train: label), `camid` int32, `viewid` int32, `index`
int64 (record position in the split; for evaluation in query + gallery), and `mask` bool (False on the padding of the
last stage-1 or evaluation batch; always True in training).
"""
from __future__ import annotations

import dataclasses
import signal
from typing import Any, Sequence

import grain
import numpy as np

from clipreid_jax.data import image_sources, images, sampler
from clipreid_jax.data.records import Split


@dataclasses.dataclass(frozen=True)
class _PlanSource:
  """Position -> (record index, mask) of this host's flattened plan."""
  indices: np.ndarray
  mask: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, position: int) -> tuple[int, bool]:
    return int(self.indices[position]), bool(self.mask[position])


class LoadRecord(grain.transforms.Map):
  """(record index, mask) -> dict(image uint8 HWC resized with PIL, pid, camid, viewid, index, mask)."""

  def __init__(self, split: Split, source: image_sources.ImageSource, size: Sequence[int], resample: int):
    self.split, self.source, self.size, self.resample = split, source, tuple(size), resample

  def map(self, element: tuple[int, bool]) -> dict[str, Any]:
    index, mask = element
    return {
        "image": images.resize(self.source[index], self.size, self.resample),
        "pid": self.split.pids[index],
        "camid": self.split.camids[index],
        "viewid": self.split.viewids[index],
        "index": np.int64(index),
        "mask": np.bool_(mask),
    }


@dataclasses.dataclass(frozen=True)
class Loader:
  """This host's batches of one plan. `iter(loader)` starts a fresh iterator; `loader.iterator(start)` starts at
  batch `start` (a resumed epoch).

  With `worker_count > 0`, close the iterator (`it.close()`) when done to stop the worker processes.

  Attributes:
    dataset: grain MapDataset of batches (len = number of batches).
    plan: (num_batches, global_batch) record indices of the global plan (all hosts).
    mask: (num_batches, global_batch) validity of every plan entry.
    host_batch: batch size of this host.
    read_options: threads and prefetch of the host process.
    worker_count: grain worker processes (0: threads of this process only).
  """
  dataset: grain.MapDataset
  plan: np.ndarray
  mask: np.ndarray
  host_batch: int
  read_options: grain.ReadOptions
  worker_count: int = 0

  def __len__(self) -> int:
    return len(self.dataset)

  def __iter__(self) -> grain.DatasetIterator:
    return self.iterator()

  def iterator(self, start: int = 0) -> grain.DatasetIterator:
    """The batches from number `start` on: the same batches whatever `worker_count` (grain's own iterator state
    has a different form with worker processes, so a position saved as a batch number survives changing it)."""
    if not 0 <= start <= len(self.dataset):
      raise ValueError(f"start: expected a batch number in [0, {len(self.dataset)}], got {start}")
    ds = (self.dataset[start:] if start else self.dataset).to_iter_dataset(self.read_options)
    if self.worker_count > 0:
      _allow_grain_workers()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count),
                          worker_init_fn=_ignore_ctrl_c)
    return iter(ds)


def _ignore_ctrl_c(worker_index: int, worker_count: int) -> None:
  """A terminal's Ctrl-C reaches the whole process group: the trainer saves and stops, and asks its workers itself
  (a worker killed by it made the trainer's next batch fail instead)."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _allow_grain_workers() -> None:
  # grain workers read absl flags; outside absl.app.run (scripts, pytest) they are unparsed and grain fails.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def default_read_options(num_threads: int = 8) -> grain.ReadOptions:
  # Elements are whole batches, so a small buffer is enough and bounds host memory.
  return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2, 2 * num_threads))


def _loader(split: Split, plan: np.ndarray, mask: np.ndarray, size: Sequence[int],
            resample: int, process_index: int, process_count: int, read_options: grain.ReadOptions | None,
            worker_count: int) -> Loader:
  cols = sampler.host_slice(plan.shape[1], process_index, process_count)
  host_plan, host_mask = plan[:, cols], mask[:, cols]
  host_batch = host_plan.shape[1]
  ds = grain.MapDataset.source(_PlanSource(host_plan.reshape(-1), host_mask.reshape(-1)))
  ds = ds.map(LoadRecord(split, image_sources.images_of(split), size, resample))
  ds = ds.batch(host_batch, drop_remainder=True)
  return Loader(ds, plan, mask, host_batch, read_options or default_read_options(), worker_count)


def train_loader(split: Split, *, image_size: Sequence[int], num_ids: int, num_instances: int, seed: int, epoch: int,
                 process_index: int = 0, process_count: int = 1, read_options: grain.ReadOptions | None = None,
                 worker_count: int = 0) -> Loader:
  """Stage-2 PK batches of one epoch, images resized with PIL bicubic to `image_size` (apply `augment` next).

  Args:
    split: the training split (pids are labels).
    image_size: (height, width), the official INPUT.SIZE_TRAIN.
    num_ids, num_instances: P and K; the global batch is P * K (the official IMS_PER_BATCH / NUM_INSTANCE).
    seed, epoch: the plan is a pure function of these (`sampler.pk_epoch_plan`).
    process_index, process_count: this host and the number of hosts; each loads P * K / process_count images
      of every global batch (a multiple of K keeps an identity's images on one host).
    read_options: grain threads and prefetch; worker_count: grain worker processes (0 = none).

  Raises:
    NotEnoughIdentitiesError: fewer than P identities.
  """
  plan = sampler.pk_epoch_plan(split.pids, num_ids=num_ids, num_instances=num_instances, seed=seed, epoch=epoch)
  return _loader(split, plan, np.ones(plan.shape, bool), image_size, images.BICUBIC, process_index,
                 process_count, read_options, worker_count)


def stage1_loader(split: Split, *, image_size: Sequence[int], batch_size: int, process_index: int = 0,
                  process_count: int = 1, read_options: grain.ReadOptions | None = None,
                  worker_count: int = 0) -> Loader:
  """Every training image once, in order, test transform (PIL bilinear to `image_size`), for the stage-1 feature bank.

  The last global batch is padded (mask False). The official loader shuffles; the bank does not depend on order.
  """
  plan, mask = sampler.padded_plan(len(split), batch_size)
  return _loader(split, plan, mask, image_size, images.BILINEAR, process_index, process_count, read_options,
                 worker_count)


def eval_loader(query: Split, gallery: Split, *, image_size: Sequence[int], batch_size: int, process_index: int = 0,
                process_count: int = 1, read_options: grain.ReadOptions | None = None, worker_count: int = 0) -> Loader:
  """Query then gallery, in order, test transform; the last global batch is padded (mask False).

  Records with `index < len(query)` are queries.
  """
  both = Split.concat(query, gallery)
  plan, mask = sampler.padded_plan(len(both), batch_size)
  return _loader(both, plan, mask, image_size, images.BILINEAR, process_index, process_count, read_options,
                 worker_count)
