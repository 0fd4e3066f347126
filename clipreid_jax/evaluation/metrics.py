"""ReID retrieval metrics (CMC, mAP, mINP) as the official `utils/metrics.py` computes them, without its memory.

The official evaluation (`R1_mAP_eval` + `eval_func`, github Syliz517/CLIP-ReID) L2-normalises query and gallery
features as whole vectors, builds the full squared-Euclidean query x gallery matrix, argsorts every row and then,
per query, drops the gallery entries with the same pid AND the same camera, skips queries left without a true
match, and averages the CMC curve (truncated at `min(50, num_gallery)`) and the non-interpolated AP.

`evaluate` returns the same numbers but never holds the query x gallery matrix on the host: queries are processed
in chunks on the JAX devices and only per-query results are kept (the ranks of the true matches, from which AP,
the first-hit rank for CMC and INP follow). Peak memory is O(chunk x num_gallery), not O(num_query x num_gallery).

Ranking without sorting: the rank of a true match m of query q is 1 + the number of kept gallery entries that
come before it, i.e. with a smaller distance, or an equal distance and a smaller gallery index. Ties are therefore
broken by gallery index, exactly as a stable argsort orders them. The official code uses numpy's default
(unstable) argsort, so with exact ties between a true match and another entry its order is unspecified (it depends
on numpy's sort kernel and the CPU); without such ties the two agree exactly, and `eval_func(..., stable=False)`
reproduces the official ordering bit for bit. Three ways to count, chosen by `ranking=`:

- "device": one fused compare-and-count on the device per block of matches, O(chunk x matches x gallery) simple
  operations; fast on GPU/TPU;
- "sort": one stable (distance, gallery index) sort per row on the device, the match's rank its position; work
  independent of the number of matches (the compare-and-count grows with it), O(chunk x gallery x log gallery);
- "host": numpy sorts each distance row (AVX-512 sort on x86) and binary-searches the match distances, falling
  back to an explicit count only for rows with exact ties; fast on CPU, where XLA's sort and large reductions are
  10-100x slower than numpy's vectorised sort. "auto" (default) picks "host" on the CPU backend, else "device".

All give identical integers. AP, CMC and INP are then computed on the host in float64 from the ranks.

Deliberate differences from the official code (none changes a value the official code can produce):
- with fewer gallery entries than `max_rank` the official code crashes (ragged CMC rows) as soon as a query loses
  entries to the same-pid-same-camera filter; here every CMC row is padded with its last value (1: a valid query
  has a match somewhere), i.e. "a match within the first k" stays true past the end of the shortened list;
- if no query has a valid match the official code fails an `assert`; here it is a ValueError;
- mINP (Ye et al., TPAMI 2021) is reported as well: INP = (number of true matches) / (rank of the last one).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
DistRows = Callable[[np.ndarray], "Array | np.ndarray"]

MAX_RANK = 50
NORM_EPS = 1e-12  # torch.nn.functional.normalize's default eps.
_HIGHEST = jax.lax.Precision.HIGHEST
# Rank given to padding slots; larger than any gallery size.
_NO_RANK = np.iinfo(np.int32).max
# Matches compared per device pass; the pass count follows each chunk's largest match count.
_MATCH_BLOCK = 16
# Default budget for one chunk's distance rows and their temporaries on the device.
_CHUNK_BYTES = 512 * 2**20


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """Metrics of one evaluation.

  Attributes:
    cmc: (max_rank,) float32, fraction of valid queries with a true match within the first k+1 kept entries
      (the official curve: float32 counts divided by the number of valid queries).
    mAP: mean of the per-query average precision over valid queries (float64).
    mINP: mean inverse negative penalty over valid queries (float64).
    num_valid_queries: queries left with at least one true match after the same-pid-same-camera filter.
    per_query_ap: (num_query,) float64 AP of each query, NaN for skipped queries.
    per_query_inp: (num_query,) float64 INP of each query, NaN for skipped queries.
  """
  cmc: np.ndarray
  mAP: float
  mINP: float
  num_valid_queries: int
  per_query_ap: np.ndarray
  per_query_inp: np.ndarray

  @property
  def num_skipped_queries(self) -> int:
    return int(self.per_query_ap.shape[0]) - self.num_valid_queries

  def rank(self, k: int) -> float:
    """CMC at rank k (1-based), e.g. rank(1) is Rank-1 accuracy; past the curve's end, its last value."""
    if k < 1 or len(self.cmc) == 0:
      raise ValueError(f"rank: expected k >= 1 on a CMC curve of length >= 1, got k={k}, length {len(self.cmc)}")
    return float(self.cmc[min(k, len(self.cmc)) - 1])


# ---------------------------------------------------------------------------------------------------------------
# Input checks.


def _as_features(x, name: str) -> np.ndarray | Array:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{name}: expected a 2-D (num, dim) feature array, got shape {tuple(x.shape)}")
  if x.shape[0] == 0:
    raise ValueError(f"{name}: expected at least one feature row, got shape {tuple(x.shape)}")
  return x


def _as_labels(x, name: str, n: int) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 1 or x.shape[0] != n:
    raise ValueError(f"{name}: expected a 1-D array of {n} labels, got shape {x.shape}")
  if x.dtype.kind not in "iub":
    raise ValueError(f"{name}: expected integer labels, got dtype {x.dtype}")
  return x


def check_features(qf, gf):
  """Query and gallery features as 2-D arrays of one width. Raises ValueError."""
  qf, gf = _as_features(qf, "query features"), _as_features(gf, "gallery features")
  if qf.shape[1] != gf.shape[1]:
    raise ValueError(f"feature widths differ: expected query and gallery features of the same dim, got "
                     f"{qf.shape[1]} and {gf.shape[1]}")
  return qf, gf


def check_inputs(qf, gf, q_pids, g_pids, q_camids, g_camids):
  """Validates shapes; returns (qf, gf, q_pids, g_pids, q_camids, g_camids) as arrays. Raises ValueError."""
  qf, gf = check_features(qf, gf)
  nq, ng = qf.shape[0], gf.shape[0]
  return (qf, gf, _as_labels(q_pids, "q_pids", nq), _as_labels(g_pids, "g_pids", ng),
          _as_labels(q_camids, "q_camids", nq), _as_labels(g_camids, "g_camids", ng))


def _check_distmat_labels(distmat_shape, q_pids, g_pids, q_camids, g_camids):
  if len(distmat_shape) != 2 or 0 in distmat_shape:
    raise ValueError(f"distmat: expected a non-empty 2-D (num_query, num_gallery) matrix, got shape "
                     f"{tuple(distmat_shape)}")
  nq, ng = distmat_shape
  return (_as_labels(q_pids, "q_pids", nq), _as_labels(g_pids, "g_pids", ng),
          _as_labels(q_camids, "q_camids", nq), _as_labels(g_camids, "g_camids", ng))


# ---------------------------------------------------------------------------------------------------------------
# Distances.


def jit_untuned(fn=None, **jit_kwargs):
  """`jax.jit`, with XLA's GEMM autotuning off for this executable when it runs on a GPU.

  Evaluation compiles one distance GEMM per problem size and calls it a few dozen times: on an H100, autotuning
  that one GEMM took 8.5 s of a 10 s first evaluation at MSMT17 size, more than the whole evaluation costs with
  cuBLAS's heuristic choice (docs/evaluation.md). Per executable, so the training steps keep autotuning.
  """
  if fn is None:
    return functools.partial(jit_untuned, **jit_kwargs)
  plain = jax.jit(fn, **jit_kwargs)
  untuned = jax.jit(fn, compiler_options={"xla_gpu_autotune_level": 0}, **jit_kwargs)

  @functools.wraps(fn)
  def call(*args, **kwargs):
    return (untuned if jax.default_backend() == "gpu" else plain)(*args, **kwargs)

  call.untuned = untuned  # tests compile it on any backend
  return call


_TRANSFER_BYTES = 64 * 2**20


def _to_device(x) -> Array:
  """Features as float32 on the default device. On an accelerator a host array goes over in pieces of ~64 MiB:
  one large transfer stages a whole pinned host copy (0.6 GB more peak RSS for MSMT17's features on an H100,
  docs/evaluation.md). The CPU backend takes the array as it is."""
  if isinstance(x, jax.Array) or jax.default_backend() == "cpu":
    return jnp.asarray(x, jnp.float32)
  x = np.asarray(x)
  rows = max(_TRANSFER_BYTES // max(4 * x.shape[1], 1), 1)
  if x.shape[0] <= rows:
    return jnp.asarray(x, jnp.float32)
  return jnp.concatenate([jnp.asarray(x[i:i + rows], jnp.float32) for i in range(0, x.shape[0], rows)])


@jax.jit
def _l2_normalize(x: Array) -> Array:
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, NORM_EPS)


def l2_normalize(x) -> Array:
  """Row-wise x / max(|x|_2, 1e-12) in float32, like torch.nn.functional.normalize(x, dim=1)."""
  return _l2_normalize(jnp.asarray(x, jnp.float32))


def sqdist_from_norms(q: Array, g: Array, q_sq: Array, g_sq: Array) -> Array:
  """Squared Euclidean distances in the official order, (|q|^2 + |g|^2) + (-2 q.g) (the scaling by -2 is exact),
  from rows and their squared norms; evaluation and re-ranking both use it."""
  return (q_sq[:, None] + g_sq[None, :]) - 2.0 * jnp.dot(q, g.T, precision=_HIGHEST)


def _sqdist(q: Array, g: Array, g_sq: Array) -> Array:
  return sqdist_from_norms(q, g, jnp.sum(q * q, axis=1), g_sq)


_sqdist_rows = jit_untuned(_sqdist)


@jit_untuned
def _sqdist_gather(q: Array, idx: Array, g: Array, g_sq: Array) -> Array:
  return _sqdist(q[idx], g, g_sq)


@jax.jit
def _sq_norms(x: Array) -> Array:
  return jnp.sum(x * x, axis=1)


@functools.partial(jax.jit, static_argnames=("normalize",))
def _prepare(q: Array, g: Array, normalize: bool) -> tuple[Array, Array, Array, Array]:
  """(Normalised) features, gallery squared norms and an all-finite flag, in one compiled call."""
  finite = jnp.isfinite(q).all() & jnp.isfinite(g).all()
  if normalize:
    q, g = _l2_normalize(q), _l2_normalize(g)
  return q, g, _sq_norms(g), finite


def euclidean_distance(qf, gf, chunk: int = 1024) -> np.ndarray:
  """Squared Euclidean distance |q|^2 + |g|^2 - 2 q.g (fp32, no sqrt) as a host (num_q, num_g) matrix.

  Features are used as given (the official `euclidean_distance`; normalise first with `l2_normalize`). Only for
  matrices that fit in memory: `evaluate` never builds this matrix.
  """
  qf, gf = check_features(qf, gf)
  q, g = jnp.asarray(qf, jnp.float32), jnp.asarray(gf, jnp.float32)
  g_sq = _sq_norms(g)
  out = np.empty((q.shape[0], g.shape[0]), np.float32)
  for lo in range(0, q.shape[0], chunk):
    out[lo:lo + chunk] = np.asarray(_sqdist_rows(q[lo:lo + chunk], g, g_sq))
  return out


# ---------------------------------------------------------------------------------------------------------------
# Official algorithm in numpy (reference).


def eval_func(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = MAX_RANK,
              stable: bool = True) -> EvalResult:
  """The official `eval_func` on a full distance matrix, in numpy float64 (the reference for `evaluate`).

  Same steps as the official code: argsort every row, drop same-pid-same-camera entries, skip queries without a
  remaining match, CMC = clipped cumulative hits truncated at min(max_rank, num_gallery), AP = sum of
  precision@k at the hits / number of hits, mAP = np.mean of the APs. The match matrix is built row by row
  instead of all at once (same values, less memory). CMC rows shorter than max_rank (small gallery) are padded
  with 1 instead of crashing.

  Args:
    distmat: (num_query, num_gallery) distances, smaller is closer.
    q_pids, g_pids, q_camids, g_camids: integer labels.
    max_rank: CMC length before truncation to the gallery size.
    stable: True breaks ties by gallery index (as `evaluate` does); False uses numpy's default argsort like the
      official code (tie order unspecified).
  """
  distmat = np.asarray(distmat)
  q_pids, g_pids, q_camids, g_camids = _check_distmat_labels(distmat.shape, q_pids, g_pids, q_camids, g_camids)
  num_q, num_g = distmat.shape
  max_rank = min(max_rank, num_g)
  indices = np.argsort(distmat, axis=1, kind="stable" if stable else None)
  cmc_rows, all_ap, all_inp = [], [], []
  per_ap = np.full(num_q, np.nan)
  per_inp = np.full(num_q, np.nan)
  for q in range(num_q):
    order = indices[q]
    keep = ~((g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q]))
    hits = (g_pids[order][keep] == q_pids[q]).astype(np.int32)
    if not np.any(hits):
      continue
    cum = hits.cumsum()
    row = np.minimum(cum, 1)[:max_rank]
    if row.shape[0] < max_rank:
      row = np.pad(row, (0, max_rank - row.shape[0]), constant_values=1)
    cmc_rows.append(row)
    num_rel = hits.sum()
    precision = cum / (np.arange(1, cum.shape[0] + 1) * 1.0)
    ap = (precision * hits).sum() / num_rel
    inp = num_rel / (np.flatnonzero(hits)[-1] + 1.0)
    per_ap[q], per_inp[q] = ap, inp
    all_ap.append(ap)
    all_inp.append(inp)
  if not all_ap:
    raise ValueError("expected at least one query with a true match left after the same-pid-same-camera filter, "
                     "got none")
  nv = len(all_ap)
  cmc = np.asarray(cmc_rows).astype(np.float32).sum(0) / float(nv)
  return EvalResult(cmc=cmc, mAP=float(np.mean(all_ap)), mINP=float(np.mean(all_inp)), num_valid_queries=nv,
                    per_query_ap=per_ap, per_query_inp=per_inp)


# ---------------------------------------------------------------------------------------------------------------
# Chunked evaluation.


@dataclasses.dataclass(frozen=True)
class _Matches:
  """Per-query gallery indices (ascending) of true matches and of same-pid-same-camera (excluded) entries."""
  match_ptr: np.ndarray  # (Q+1,) offsets into match_idx
  match_idx: np.ndarray  # int32
  excl_ptr: np.ndarray
  excl_idx: np.ndarray

  def count(self) -> np.ndarray:
    return np.diff(self.match_ptr)


def _ragged_take(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """Concatenation of arange(s, s + c) for each (s, c)."""
  total = int(counts.sum())
  offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
  return np.repeat(starts, counts) + offsets


def _group_ptr(group: np.ndarray, n: int) -> np.ndarray:
  return np.concatenate([[0], np.cumsum(np.bincount(group, minlength=n))])


def _find_matches(q_pids, g_pids, q_camids, g_camids) -> _Matches:
  order = np.argsort(g_pids, kind="stable")  # gallery indices grouped by pid, ascending within a pid
  sorted_pids = g_pids[order]
  uniq, start, size = np.unique(sorted_pids, return_index=True, return_counts=True)
  pos = np.clip(np.searchsorted(uniq, q_pids), 0, len(uniq) - 1)
  found = uniq[pos] == q_pids
  counts = np.where(found, size[pos], 0)
  qrep = np.repeat(np.arange(len(q_pids)), counts)
  gidx = order[_ragged_take(np.where(found, start[pos], 0), counts)]
  same_cam = g_camids[gidx] == q_camids[qrep]
  nq = len(q_pids)
  return _Matches(match_ptr=_group_ptr(qrep[~same_cam], nq), match_idx=gidx[~same_cam].astype(np.int32),
                  excl_ptr=_group_ptr(qrep[same_cam], nq), excl_idx=gidx[same_cam].astype(np.int32))


def num_valid_queries(q_pids, g_pids, q_camids, g_camids) -> int:
  """Queries with at least one true match left after the same-pid-same-camera filter."""
  return int(np.count_nonzero(_find_matches(*_check_distmat_labels(
      (len(q_pids), len(g_pids)), q_pids, g_pids, q_camids, g_camids)).count()))


def _codes(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Dense int32 codes of two label arrays over their joint vocabulary (int32 is all the device needs)."""
  _, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
  inv = inv.astype(np.int32).reshape(-1)
  return inv[:len(a)], inv[len(a):]


def _kept_distances(d: Array, q_pid: Array, q_cam: Array, g_pid: Array, g_cam: Array) -> Array:
  """Distance rows with the gallery entries of the query's own pid and camera (the protocol drops them) at +inf."""
  return jnp.where((q_pid[:, None] == g_pid[None, :]) & (q_cam[:, None] == g_cam[None, :]), jnp.inf, d)


def _padded(ranks: Array, mcount: Array) -> Array:
  """Match ranks (C, M) with the slots past each row's `mcount` matches set to _NO_RANK."""
  return jnp.where(jnp.arange(ranks.shape[1])[None, :] < mcount[:, None], ranks, _NO_RANK)


@jit_untuned(static_argnames=("block",))  # a compare-and-count; nothing for the autotuner to choose
def _device_ranks(d: Array, q_pid: Array, q_cam: Array, g_pid: Array, g_cam: Array, midx: Array, mcount: Array,
                  num_blocks: Array, block: int = _MATCH_BLOCK) -> Array:
  """1-based rank of each true match among the kept gallery entries, ties broken by gallery index.

  d: (C, G) distances; midx: (C, M) gallery indices of the true matches (ascending, padded); mcount: (C,).
  The loop over match blocks has a traced trip count, so one compilation serves every chunk.
  """
  dv = _kept_distances(d, q_pid, q_cam, g_pid, g_cam)
  col = jnp.arange(d.shape[1], dtype=jnp.int32)

  def body(b, ranks):
    idx = jax.lax.dynamic_slice_in_dim(midx, b * block, block, axis=1)
    dm = jnp.take_along_axis(d, idx, axis=1)[:, :, None]
    before = (dv[:, None, :] < dm) | ((dv[:, None, :] == dm) & (col[None, None, :] < idx[:, :, None]))
    r = jnp.sum(before, axis=-1, dtype=jnp.int32) + 1
    return jax.lax.dynamic_update_slice_in_dim(ranks, r, b * block, axis=1)

  return _padded(jax.lax.fori_loop(0, num_blocks, body, jnp.zeros(midx.shape, jnp.int32)), mcount)


@jit_untuned
def _device_sorted_ranks(d: Array, q_pid: Array, q_cam: Array, g_pid: Array, g_cam: Array, midx: Array,
                         mcount: Array) -> Array:
  """`_device_ranks` by one stable sort per row: the rank of a match is its position in the row's (distance,
  gallery index) order. Work independent of the number of matches (O(chunk x gallery x log gallery))."""
  dv = _kept_distances(d, q_pid, q_cam, g_pid, g_cam) + 0.0  # -0.0 -> +0.0: the sort puts -0.0 first, `<` does not
  col = jnp.broadcast_to(jnp.arange(d.shape[1], dtype=jnp.int32), d.shape)
  _, order = jax.lax.sort((dv, col), dimension=1, num_keys=1, is_stable=True)
  pos = jnp.zeros_like(col).at[jnp.arange(d.shape[0])[:, None], order].set(col, unique_indices=True)
  return _padded(jnp.take_along_axis(pos, midx, axis=1) + 1, mcount)


@jax.jit
def _has_nan(d: Array) -> Array:
  return jnp.isnan(d).any()


def _host_row_ranks(row: np.ndarray, midx: np.ndarray, excl: np.ndarray) -> np.ndarray:
  row = np.array(row, dtype=np.float32)  # private copy: excluded entries become +inf
  row[excl] = np.inf
  dm = row[midx]
  s = np.sort(row)
  lt = np.searchsorted(s, dm, side="left")
  ranks = lt + 1
  tied = np.flatnonzero(np.searchsorted(s, dm, side="right") - lt > 1)
  for t in tied:  # exact ties with other entries: those with a smaller gallery index come first
    ranks[t] += np.count_nonzero(row[:midx[t]] == dm[t])
  return ranks


def _ap_inp(ranks: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """AP, INP and first-hit rank per row from the (unsorted, padded) match ranks."""
  width = max(int(counts.max()), 1)
  r = np.sort(ranks, axis=1)[:, :width].astype(np.float64)
  k = np.arange(1, width + 1, dtype=np.float64)[None, :]
  used = k <= counts[:, None]
  ap = np.where(used, k / np.where(used, r, 1.0), 0.0).sum(1) / counts
  last = np.take_along_axis(r, (counts - 1)[:, None], axis=1)[:, 0]
  return ap, counts / last, r[:, 0]


def _pick_ranking(ranking: str) -> str:
  if ranking == "auto":
    return "host" if jax.default_backend() == "cpu" else "device"
  if ranking not in ("host", "device", "sort"):
    raise ValueError(f"ranking: expected 'auto', 'host', 'device' or 'sort', got {ranking!r}")
  return ranking


def default_chunk(num_gallery: int) -> int:
  """Queries per chunk so that a chunk's distance rows and temporaries stay near 512 MiB."""
  c = _CHUNK_BYTES // (16 * max(num_gallery, 1))
  return int(min(max(2 ** int(np.log2(max(c, 1))), 8), 4096))


def evaluate_rows(dist_rows: DistRows, num_gallery: int, q_pids, g_pids, q_camids, g_camids,
                  max_rank: int = MAX_RANK, chunk: int | None = None, ranking: str = "auto") -> EvalResult:
  """Evaluates distances that are produced query chunk by query chunk (the engine behind `evaluate`).

  Args:
    dist_rows: callable taking an int array of query indices (C,) and returning their (C, num_gallery) fp32
      distance rows (a device or host array); it is called once per chunk, never for all queries at once.
    num_gallery: gallery size.
    q_pids, g_pids, q_camids, g_camids: integer labels.
    max_rank: CMC length before truncation to the gallery size (official 50).
    chunk: queries per call of dist_rows; default from `default_chunk`.
    ranking: "auto", "host", "device" or "sort" (see the module docstring).
  """
  q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
  nq = q_pids.shape[0]
  if nq == 0 or num_gallery == 0:
    raise ValueError(f"expected a non-empty query and gallery, got {nq} queries and {num_gallery} gallery entries")
  q_pids, g_pids, q_camids, g_camids = _check_distmat_labels((nq, num_gallery), q_pids, g_pids, q_camids,
                                                             g_camids)
  if chunk is not None and chunk < 1:
    raise ValueError(f"chunk: expected a positive number of queries, got {chunk}")
  if max_rank < 1:
    raise ValueError(f"max_rank: expected a CMC length >= 1, got {max_rank}")
  ranking = _pick_ranking(ranking)
  max_rank = min(max_rank, num_gallery)
  m = _find_matches(q_pids, g_pids, q_camids, g_camids)
  counts = m.count()
  valid_q = np.flatnonzero(counts > 0)
  if valid_q.size == 0:
    raise ValueError("expected at least one query with a true match left after the same-pid-same-camera filter, "
                     "got none")
  # Queries with similar match counts share a chunk, so the per-chunk match loop wastes little.
  valid_q = valid_q[np.argsort(counts[valid_q], kind="stable")]
  c = chunk or default_chunk(num_gallery)
  c = min(c, valid_q.size)
  width = int(np.ceil(counts.max() / _MATCH_BLOCK)) * _MATCH_BLOCK
  if ranking != "host":
    qp_code, gp_code = _codes(q_pids, g_pids)
    qc_code, gc_code = _codes(q_camids, g_camids)
    gp_dev, gc_dev = jnp.asarray(gp_code), jnp.asarray(gc_code)

  ap = np.full(nq, np.nan)
  inp = np.full(nq, np.nan)
  first = np.zeros(nq, np.int64)
  pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) if ranking == "host" else None

  def launch(lo: int):
    rows = valid_q[lo:lo + c]
    padded = np.concatenate([rows, np.zeros(c - rows.size, rows.dtype)])  # fixed chunk shape: one compile
    d = dist_rows(padded)
    n = counts[rows]
    if ranking == "host":
      return rows, n, np.isnan(d).any() if isinstance(d, np.ndarray) else _has_nan(d), d
    midx = np.zeros((c, width), np.int32)
    midx[np.repeat(np.arange(rows.size), n), _ragged_take(np.zeros_like(n), n)] = (
        m.match_idx[_ragged_take(m.match_ptr[rows], n)])
    qp = np.full(c, -1, np.int32)
    qc = np.full(c, -1, np.int32)
    qp[:rows.size], qc[:rows.size] = qp_code[rows], qc_code[rows]
    mc = np.zeros(c, np.int32)
    mc[:rows.size] = n
    d = jnp.asarray(d)
    nan = _has_nan(d)  # NaN has no order: each ranking would count it differently
    if ranking == "sort":
      return rows, n, nan, _device_sorted_ranks(d, jnp.asarray(qp), jnp.asarray(qc), gp_dev, gc_dev,
                                                jnp.asarray(midx), jnp.asarray(mc))
    num_blocks = int(np.ceil(n.max() / _MATCH_BLOCK))
    r = _device_ranks(d, jnp.asarray(qp), jnp.asarray(qc), gp_dev, gc_dev, jnp.asarray(midx),
                      jnp.asarray(mc), jnp.int32(num_blocks))
    return rows, n, nan, r

  def finish(rows, n, nan, out):
    if bool(nan):
      raise ValueError("distances: expected no NaN, got NaN (from non-finite features, or a re-ranking of identical "
                       "ones)")
    if ranking == "host":
      d = np.asarray(out)
      fn = lambda i: _host_row_ranks(d[i], m.match_idx[m.match_ptr[rows[i]]:m.match_ptr[rows[i] + 1]],
                                     m.excl_idx[m.excl_ptr[rows[i]]:m.excl_ptr[rows[i] + 1]])
      ranks = np.full((rows.size, int(n.max())), _NO_RANK, np.int64)
      for i, r in enumerate(pool.map(fn, range(rows.size))):
        ranks[i, :r.size] = r
    else:
      ranks = np.asarray(out)[:rows.size]
    ap[rows], inp[rows], first[rows] = _ap_inp(ranks, n)

  try:
    pending = None
    for lo in range(0, valid_q.size, c):
      nxt = launch(lo)  # dispatched asynchronously; overlaps with the host work on the previous chunk
      if pending is not None:
        finish(*pending)
      pending = nxt
    finish(*pending)
  finally:
    if pool is not None:
      pool.shutdown()

  nv = int(valid_q.size)
  hits = np.bincount(np.minimum(first[valid_q], max_rank + 1).astype(np.int64) - 1, minlength=max_rank + 1)
  cmc = np.cumsum(hits[:max_rank]).astype(np.float32) / np.float32(nv)
  valid_sorted = np.sort(valid_q)  # means over queries in query order, as the official list is built
  return EvalResult(cmc=cmc, mAP=float(np.mean(ap[valid_sorted])), mINP=float(np.mean(inp[valid_sorted])),
                    num_valid_queries=nv, per_query_ap=ap, per_query_inp=inp)


def evaluate(qf, gf, q_pids, g_pids, q_camids, g_camids, max_rank: int = MAX_RANK, chunk: int | None = None,
             normalize: bool = True, ranking: str = "auto") -> EvalResult:
  """CMC / mAP / mINP of query features against gallery features, official protocol, chunked on device.

  Features are L2-normalised as whole vectors (the official `feat_norm` is always on), distances are squared
  Euclidean in fp32 computed on the default JAX device one query chunk at a time, and each chunk is reduced to
  per-query match ranks before the next one; see the module docstring for tie handling.

  Args:
    qf: (num_query, dim) query features (numpy or jax).
    gf: (num_gallery, dim) gallery features.
    q_pids, g_pids, q_camids, g_camids: integer labels.
    max_rank: CMC length before truncation to the gallery size.
    chunk: queries per device call (default: about 512 MiB of distance rows).
    normalize: L2-normalise the features first (official behaviour); False uses them as given.
    ranking: "auto", "host", "device" or "sort".

  Returns:
    EvalResult.

  Raises:
    ValueError: empty inputs, mismatched widths or lengths, non-finite features, or no valid query.
  """
  qf, gf, q_pids, g_pids, q_camids, g_camids = check_inputs(qf, gf, q_pids, g_pids, q_camids, g_camids)
  q, g, g_sq, finite = _prepare(_to_device(qf), _to_device(gf), normalize)
  if not bool(finite):
    raise ValueError("features: expected finite values, got NaN or inf")
  dist_rows = lambda idx: _sqdist_gather(q, jnp.asarray(idx, jnp.int32), g, g_sq)
  return evaluate_rows(dist_rows, g.shape[0], q_pids, g_pids, q_camids, g_camids, max_rank=max_rank, chunk=chunk,
                       ranking=ranking)


def evaluate_distmat(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = MAX_RANK,
                     chunk: int | None = None, ranking: str = "auto") -> EvalResult:
  """`evaluate` on a precomputed (num_query, num_gallery) distance matrix (e.g. a re-ranked one)."""
  distmat = np.asarray(distmat, np.float32)
  _check_distmat_labels(distmat.shape, q_pids, g_pids, q_camids, g_camids)
  return evaluate_rows(lambda idx: distmat[idx], distmat.shape[1], q_pids, g_pids, q_camids, g_camids,
                       max_rank=max_rank, chunk=chunk, ranking=ranking)
