"""Exact t-SNE (van der Maaten & Hinton, JMLR 2008) in numpy, for a few hundred points.

Steps: squared Euclidean distances in the input space; per point, a Gaussian whose precision is found by binary
search so that the conditional distribution's entropy equals log(perplexity); symmetrised joint P; then gradient
descent on KL(P || Q) with a Student-t Q in 2-D, momentum, per-coordinate adaptive gains, and early exaggeration
of P during the first iterations (it forms well-separated clusters before they settle). Everything is O(n^2) in
memory and time per iteration, which is what the figures need (n <= ~1000); no Barnes-Hut.
"""
from __future__ import annotations

import dataclasses

import numpy as np

_MIN_PROB = 1e-12
_MIN_GAIN = 0.01


@dataclasses.dataclass(frozen=True)
class TSNEOptions:
  """Optimisation settings (the usual defaults of the reference implementations).

  Attributes:
    perplexity: effective number of neighbours; lowered to (n - 1) / 3 for small n.
    num_iters: gradient steps in all.
    exaggeration: factor on P during the first `exaggeration_iters` steps.
    exaggeration_iters: steps with exaggerated P and the lower momentum.
    learning_rate: step size; None picks max(n / exaggeration / 4, 50) (Belkina et al., 2019).
    momentum: (during exaggeration, after it).
    seed: seeds the N(0, 1e-4) initial layout.
  """
  perplexity: float = 30.0
  num_iters: int = 1000
  exaggeration: float = 12.0
  exaggeration_iters: int = 250
  learning_rate: float | None = None
  momentum: tuple[float, float] = (0.5, 0.8)
  seed: int = 0


def squared_distances(x: np.ndarray) -> np.ndarray:
  """(n, n) float64 squared Euclidean distances, clipped at 0 (rounding can make them slightly negative)."""
  x = np.asarray(x, np.float64)
  sq = np.sum(x * x, axis=1)
  d = sq[:, None] + sq[None, :] - 2.0 * x @ x.T
  np.fill_diagonal(d, 0.0)
  return np.maximum(d, 0.0)


def conditional_affinities(d2: np.ndarray, perplexity: float, tol: float = 1e-5,
                           max_steps: int = 100) -> np.ndarray:
  """Row-stochastic P(j | i) with each row's entropy (nats) equal to log(perplexity), all rows searched at once.

  The precision beta_i of row i is bisected (doubled or halved until it is bracketed): a larger beta gives a
  peakier, lower-entropy row. Distances are shifted by each row's minimum, which leaves P and the entropy unchanged
  but keeps exp() from underflowing for far-away points.
  """
  n = d2.shape[0]
  if not 1.0 <= perplexity < n:
    raise ValueError(f"perplexity: expected a value in [1, {n}) for {n} points, got {perplexity}")
  off = ~np.eye(n, dtype=bool)
  d = np.where(off, d2, np.inf)
  d = d - d.min(axis=1, keepdims=True)
  target = np.log(perplexity)
  # Start near the scale of the data so that few steps are needed.
  mean = np.array([row[np.isfinite(row)].mean() for row in d])
  beta = 1.0 / np.maximum(mean, 1e-12)
  lo = np.zeros(n)
  hi = np.full(n, np.inf)
  for _ in range(max_steps):
    p = np.exp(-d * beta[:, None])
    total = p.sum(axis=1)
    mean_d = (np.where(off, d, 0.0) * p).sum(axis=1) / total  # the diagonal holds inf * 0
    entropy = np.log(total) + beta * mean_d
    diff = entropy - target
    if np.all(np.abs(diff) < tol):
      break
    too_flat = diff > 0  # entropy too high: sharpen (raise beta)
    lo = np.where(too_flat, beta, lo)
    hi = np.where(too_flat, hi, beta)
    beta = np.where(np.isfinite(hi), (lo + hi) / 2.0, beta * 2.0)
  p = np.exp(-d * beta[:, None])
  return p / p.sum(axis=1, keepdims=True)


def joint_affinities(x: np.ndarray, perplexity: float) -> np.ndarray:
  """Symmetric P = (P(j|i) + P(i|j)) / 2n, floored so that log P stays finite."""
  cond = conditional_affinities(squared_distances(x), perplexity)
  p = (cond + cond.T) / (2.0 * cond.shape[0])
  return np.maximum(p, _MIN_PROB)


def _gradient(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
  """dKL/dY and KL(P || Q) for the Student-t (one degree of freedom) Q of layout y."""
  num = 1.0 / (1.0 + squared_distances(y))
  np.fill_diagonal(num, 0.0)
  q = np.maximum(num / num.sum(), _MIN_PROB)
  w = (p - q) * num
  grad = 4.0 * (w.sum(axis=1)[:, None] * y - w @ y)
  kl = float(np.sum(p * np.log(p / q)))
  return grad, kl


def tsne(x: np.ndarray, options: TSNEOptions = TSNEOptions(), dims: int = 2) -> np.ndarray:
  """Embeds the rows of x (n, d) in `dims` dimensions; returns (n, dims) float64 centred at 0.

  Deterministic for a given `options.seed`.
  """
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or x.shape[0] < 4:
    raise ValueError(f"x: expected a (num_points >= 4, dim) array, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("x: expected finite values, got NaN or inf")
  n = x.shape[0]
  perplexity = min(options.perplexity, (n - 1) / 3.0)
  p = joint_affinities(x, max(perplexity, 1.0))
  lr = options.learning_rate or max(n / options.exaggeration / 4.0, 50.0)
  y = np.random.default_rng(options.seed).normal(0.0, 1e-2, (n, dims))
  update = np.zeros_like(y)
  gains = np.ones_like(y)
  for it in range(options.num_iters):
    early = it < options.exaggeration_iters
    grad, _ = _gradient(p * options.exaggeration if early else p, y)
    # Delta-bar-delta gains: grow where the gradient keeps pushing against the running update, shrink otherwise.
    gains = np.where(np.sign(grad) != np.sign(update), gains + 0.2, gains * 0.8)
    gains = np.maximum(gains, _MIN_GAIN)
    update = options.momentum[0 if early else 1] * update - lr * gains * grad
    y = y + update
    y = y - y.mean(axis=0)
  return y


def kl_divergence(x: np.ndarray, y: np.ndarray, perplexity: float = 30.0) -> float:
  """KL(P || Q) of a layout y of x (the t-SNE cost), e.g. to compare layouts."""
  n = np.asarray(x).shape[0]
  p = joint_affinities(x, max(min(perplexity, (n - 1) / 3.0), 1.0))
  return _gradient(p, np.asarray(y, np.float64))[1]
