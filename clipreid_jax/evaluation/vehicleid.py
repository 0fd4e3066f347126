"""VehicleID evaluation protocol: mean and std of R1, R5 and mAP over random one-image-per-identity galleries.

Official protocol (`datasets/vehicleid.py`, `test_clipreid.py`): for each identity of the test list one random
image goes to the gallery and the rest to the query; query camera 0 and gallery camera 1, so the
same-pid-same-camera filter never removes anything; 10 trials, each with a fresh random gallery, averaged. The
official script crashes before averaging (it unpacks three values from a function returning two) and never seeds
the draw. Here the trials are seeded: trial t draws with `np.random.default_rng(seed + t)`, one
`integers(n_images)` per identity in ascending pid order over the images in input order, which is the same draw
as `clipreid_jax.data.vehicleid.load(gallery_seed=seed + t)` makes on list-file order. Features do not depend on
the split, so they are extracted once and re-split per trial (the official code re-extracts the same features).
Identities with a single image give no query; their image still sits in the gallery as a distractor.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from clipreid_jax.evaluation import metrics, rerank


@dataclasses.dataclass(frozen=True)
class VehicleIDResult:
  """Per-trial metrics and their mean / population std (ddof=0) over the trials."""
  r1: np.ndarray  # (num_trials,)
  r5: np.ndarray
  r10: np.ndarray
  mAP: np.ndarray
  num_query: np.ndarray  # queries per trial (the gallery has one image per identity)

  def mean_std(self) -> dict[str, tuple[float, float]]:
    return {k: (float(np.mean(v)), float(np.std(v))) for k, v in
            (("r1", self.r1), ("r5", self.r5), ("r10", self.r10), ("mAP", self.mAP))}


def split_gallery(pids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Boolean gallery mask: one uniformly random image per identity (draws in ascending pid order)."""
  order = np.argsort(pids, kind="stable")  # images of a pid keep their input order
  _, start, count = np.unique(pids[order], return_index=True, return_counts=True)
  pick = rng.integers(count)
  gallery = np.zeros(pids.shape[0], bool)
  gallery[order[start + pick]] = True
  return gallery


def vehicleid_trials(features, pids, num_trials: int = 10, seed: int = 0, max_rank: int = metrics.MAX_RANK,
                     chunk: int | None = None, ranking: str = "auto",
                     rerank_args: dict | None = None) -> VehicleIDResult:
  """Runs the VehicleID protocol on the features of every test image.

  Args:
    features: (num_images, dim) features of the test-list images (normalised inside, as the official eval).
    pids: (num_images,) identity of each image.
    num_trials: number of random gallery draws (official 10).
    seed: trial t uses np.random.default_rng(seed + t).
    max_rank, chunk, ranking: passed to `metrics.evaluate`.
    rerank_args: k-reciprocal re-ranking of each trial's split (`rerank.evaluate_reranked` with these k1, k2,
      lambda_value); None: plain distances (the official protocol).
  """
  features = metrics._as_features(features, "features")
  pids = metrics._as_labels(pids, "pids", features.shape[0])
  if num_trials < 1:
    raise ValueError(f"num_trials: expected at least 1, got {num_trials}")
  feats = np.asarray(metrics.l2_normalize(features))  # once; each trial only re-splits
  r1, r5, r10, maps, nqs = [], [], [], [], []
  for t in range(num_trials):
    gallery = split_gallery(pids, np.random.default_rng(seed + t))
    query = ~gallery
    if not query.any():
      raise ValueError("expected at least one identity with two or more images, got none")
    args = (feats[query], feats[gallery], pids[query], pids[gallery], np.zeros(query.sum(), np.int64),
            np.ones(gallery.sum(), np.int64))
    if rerank_args is None:
      res = metrics.evaluate(*args, max_rank=max_rank, chunk=chunk, normalize=False, ranking=ranking)
    else:
      res = rerank.evaluate_reranked(*args, **rerank_args, max_rank=max_rank, chunk=chunk, normalize=False,
                                     ranking=ranking)
    r1.append(res.rank(1))
    r5.append(res.rank(5))
    r10.append(res.rank(10))
    maps.append(res.mAP)
    nqs.append(int(query.sum()))
  return VehicleIDResult(r1=np.asarray(r1), r5=np.asarray(r5), r10=np.asarray(r10), mAP=np.asarray(maps),
                         num_query=np.asarray(nqs))
