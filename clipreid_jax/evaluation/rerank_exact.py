"""Dense k-reciprocal re-ranking, step for step as the official `utils/reranking.py: re_ranking` computes it.

This is the reference for small problems (it holds several (N, N) matrices, N = num_query + num_gallery); the
scalable form is `rerank.re_ranking`. Numbers follow the official arithmetic, including its precision choices:

- original distance: squared Euclidean over query + gallery in fp32, each column divided by its maximum, then
  transposed (so row i is scaled by the maximum of column i);
- V (k-reciprocal weights) and V_qe (query expansion) are float16 matrices: exp(-d) weights are normalised in fp32
  (numpy's pairwise sum over the ascending neighbour indices) and rounded once to float16; V_qe is numpy's mean
  of float16 rows (a float32 running sum in neighbour order, divided by k2, rounded to float16);
- the Jaccard accumulator is float16 and is updated in ascending column order, every addition rounded to float16;
  jaccard = 1 - t / (2 - t) in float16;
- final = float16(jaccard * float16(1 - lambda)) + float32(original * lambda), in float32.

Only deliberate difference: neighbour lists come from a stable argsort (ties broken by index) instead of numpy's
default argsort, whose order for exact ties is unspecified.
"""
from __future__ import annotations

import numpy as np


def pairwise_sq_dist(x: np.ndarray) -> np.ndarray:
  """(N, N) squared Euclidean distances in fp32: (|a|^2 + |b|^2) - 2 a.b, as the official code."""
  sq = np.sum(np.square(x), axis=1)
  return (sq[:, None] + sq[None, :]) - np.float32(2.0) * (x @ x.T)


def half_k(k1: int) -> int:
  """The official int(np.around(k1 / 2)) (round half to even)."""
  return int(np.around(k1 / 2))


def expansion_qualifies(overlap: int, size: int) -> bool:
  """The official expansion test len(intersect) > 2/3 * len(candidate set), with its float64 rounding."""
  return overlap > 2 / 3 * size


def k_reciprocal(rank: np.ndarray, i: int, k: int) -> np.ndarray:
  """Members j of the first k+1 neighbours of i that have i among their own first k+1 (in i's rank order)."""
  forward = rank[i, :k + 1]
  backward = rank[forward, :k + 1]
  return forward[np.any(backward == i, axis=1)]


def re_ranking_exact(qf, gf, k1: int = 50, k2: int = 15, lambda_value: float = 0.3) -> np.ndarray:
  """Re-ranked (num_query, num_gallery) float32 distances for already normalised features (dense reference).

  Args:
    qf: (Q, D) query features, used as given (the official code receives L2-normalised features).
    gf: (G, D) gallery features.
    k1, k2, lambda_value: the official parameters (CLIP-ReID would call it with 50, 15, 0.3).
  """
  qf = np.asarray(qf, np.float32)
  gf = np.asarray(gf, np.float32)
  nq = qf.shape[0]
  x = np.concatenate([qf, gf])
  n = x.shape[0]
  dist = pairwise_sq_dist(x)
  original = np.transpose(dist / np.max(dist, axis=0))
  rank = np.argsort(original, axis=1, kind="stable")
  kh = half_k(k1)

  v = np.zeros((n, n), np.float16)
  for i in range(n):
    recip = k_reciprocal(rank, i, k1)
    expansion = [recip]
    for c in recip:
      cand = k_reciprocal(rank, c, kh)
      if expansion_qualifies(len(np.intersect1d(cand, recip)), len(cand)):
        expansion.append(cand)
    members = np.unique(np.concatenate(expansion))
    weight = np.exp(-original[i, members])
    v[i, members] = weight / np.sum(weight)

  if k2 != 1:
    v_qe = np.zeros_like(v)
    for i in range(n):
      v_qe[i] = np.mean(v[rank[i, :k2]], axis=0)
    v = v_qe

  jaccard = np.zeros((nq, n), np.float16)
  for i in range(nq):
    acc = np.zeros(n, np.float16)
    for col in np.flatnonzero(v[i]):
      rows = np.flatnonzero(v[:, col])
      acc[rows] = acc[rows] + np.minimum(v[i, col], v[rows, col])
    jaccard[i] = 1 - acc / (2 - acc)

  final = jaccard * (1 - lambda_value) + original[:nq] * lambda_value
  return np.asarray(final[:, nq:], np.float32)
