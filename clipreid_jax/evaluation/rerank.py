"""Scalable k-reciprocal re-ranking (Zhong et al., CVPR 2017) with the official CLIP-ReID arithmetic.

The official `utils/reranking.py: re_ranking` holds (N, N) matrices, N = num_query + num_gallery: at MSMT17 size
(N = 93,820) that is 35 GB per float32 matrix. Everything it computes is sparse, though: V has non-zeros only on
each item's k-reciprocal expansion set, V_qe on the union of k2 such rows, and the Jaccard numerator of (query,
gallery) is non-zero only where their V_qe supports overlap. This module computes exactly those entries:

1. k-nearest-neighbour lists (device): query+gallery features in row chunks, distances (|a|^2 + |b|^2) - 2 a.b
   (fp32), each row divided by its maximum (the official column scaling; the matrix is symmetric), then
   `lax.top_k` of the first max(k1 + 1, k2) neighbours (ties to the lower index, like a stable argsort);
2. k-reciprocal and half-k reciprocal sets, the 2/3-overlap expansion and the union (host numpy, vectorised in
   row chunks);
3. the weights exp(-d) of every (item, expansion member) pair, from per-pair dot products on the device, then
   normalised and rounded to float16 on the host with numpy (same summation as the official `np.sum`);
4. V_qe = float16(mean of the k2 neighbours' V rows), sparse, with the float32 running sum in neighbour order;
5. per query chunk: the float16 Jaccard accumulator over the query's V_qe support in ascending column order
   (every addition rounded to float16, as the official loop), jaccard = 1 - t / (2 - t), then
   final = float16(jaccard * (1 - lambda)) + float32(original * lambda) with the original distances recomputed on
   the device. `Reranked.rows` produces these rows chunk by chunk, so `evaluate_reranked` never holds the
   (num_query, num_gallery) matrix.

Memory bound (host): features, O(N (k1 + 1)) neighbour lists, nnz(V) + nnz(V_qe) sparse entries (6 bytes each;
nnz(V) <= N (k1 + 1)(k1/2 + 2), in practice ~N k1), a (chunk, N) bitmap while expanding, and per query chunk a
(chunk, num_gallery) float16 accumulator plus the (chunk, num_gallery) output rows. Device: features and one
(chunk, N) distance block. Nothing is quadratic in N.

Numbers equal `rerank_exact.re_ranking_exact` (the dense official emulation) when the pairwise distances agree
bit for bit (as with exactly representable features); otherwise the per-pair dot products may differ from the
dense GEMM by an fp32 ulp, which can move a float16-rounded weight by one float16 ulp (~1e-5 in final) in rare
entries. Like the exact form, ties in the neighbour lists go to the lower index.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from clipreid_jax.evaluation import metrics
from clipreid_jax.evaluation.rerank_exact import half_k

Array = jax.Array
# Budget for one device block of distance rows (and its temporaries).
_BLOCK_BYTES = 512 * 2**20
# Pairs per device call when computing expansion-set distances.
_PAIR_CHUNK = 8192
# Host threads for the Jaccard step.
_THREADS = os.cpu_count() or 1


@metrics.jit_untuned(static_argnames=("k",))
def _knn_block(xr: Array, x: Array, sq_r: Array, sq: Array, k: int) -> tuple[Array, Array]:
  d = metrics.sqdist_from_norms(xr, x, sq_r, sq)
  m = jnp.max(d, axis=1)
  _, idx = jax.lax.top_k(-(d / m[:, None]), k)
  return idx, m


@jax.jit
def _pair_scaled_dist(x: Array, sq: Array, m: Array, ii: Array, jj: Array) -> Array:
  dot = jnp.sum(x[ii] * x[jj], axis=1)
  return ((sq[ii] + sq[jj]) - 2.0 * dot) / m[ii]


@metrics.jit_untuned
def _final_rows(xq: Array, xg: Array, sq_q: Array, sq_g: Array, m_q: Array, part: Array, lam: Array) -> Array:
  d = metrics.sqdist_from_norms(xq, xg, sq_q, sq_g)
  return part.astype(jnp.float32) + (d / m_q[:, None]) * lam


def _block_rows(n: int) -> int:
  return int(min(max(_BLOCK_BYTES // (16 * n), 8), 4096))


@dataclasses.dataclass(frozen=True)
class _Csr:
  indptr: np.ndarray  # (rows + 1,) int64
  indices: np.ndarray  # int32, ascending within a row
  data: np.ndarray  # float16

  def nnz(self) -> int:
    return int(self.indices.size)


def _csr_from_rows(owner: np.ndarray, cols: np.ndarray, vals: np.ndarray, n: int) -> _Csr:
  """CSR from entries already ordered by (owner, col)."""
  keep = vals != 0  # the official code tests `!= 0`; float16 underflow makes an entry vanish
  owner, cols, vals = owner[keep], cols[keep], vals[keep]
  return _Csr(np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=n))]), cols.astype(np.int32), vals)


def _reciprocal(top: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
  """(len(rows), k+1) mask: neighbour p of i is kept iff i is among that neighbour's first k+1."""
  back = top[top[rows, :k + 1], :k + 1]
  return np.any(back == rows[:, None, None], axis=2)


def _expansion_sets(top: np.ndarray, k1: int, block: int) -> _Csr:
  """Sorted k-reciprocal expansion set of every item (the official `k_reciprocal_expansion_index`)."""
  n = top.shape[0]
  kh = half_k(k1)
  all_rows = np.arange(n)
  half = np.concatenate([_reciprocal(top, all_rows[lo:lo + block], kh) for lo in range(0, n, block)])
  half_size = half.sum(1)
  half_nb = top[:, :kh + 1]
  member = np.zeros((block, n), bool)
  owners, cols = [], []
  for lo in range(0, n, block):
    rows = all_rows[lo:lo + block]
    c = rows.size
    local = np.arange(c)
    cand = top[rows, :k1 + 1]
    recip = _reciprocal(top, rows, k1)
    r_local, r_pos = np.nonzero(recip)
    member[r_local, cand[r_local, r_pos]] = True
    hv, hm = half_nb[cand], half[cand]  # (c, k1+1, kh+1)
    overlap = np.sum(member[local[:, None, None], hv] & hm, axis=2)
    qualifies = recip & (overlap > 2 / 3 * half_size[cand])
    member[r_local, cand[r_local, r_pos]] = False
    sets = np.concatenate([np.where(recip, cand, n),
                           np.where(qualifies[:, :, None] & hm, hv, n).reshape(c, -1)], axis=1)
    sets.sort(axis=1)
    first = np.ones_like(sets, bool)
    first[:, 1:] = sets[:, 1:] != sets[:, :-1]
    keep = first & (sets < n)
    owner = np.broadcast_to(rows[:, None], sets.shape)[keep]
    owners.append(owner)
    cols.append(sets[keep])
  owner, col = np.concatenate(owners), np.concatenate(cols)
  return _Csr(np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=n))]), col.astype(np.int32),
              np.empty(0, np.float16))


def _row_sums_like_numpy(w: np.ndarray, indptr: np.ndarray) -> np.ndarray:
  """np.sum(w[a:b]) for every row, bit for bit: rows of one length are summed together with axis=1."""
  lengths = np.diff(indptr)
  out = np.zeros(lengths.size, np.float32)
  for length in np.unique(lengths):
    if length == 0:
      continue
    rows = np.flatnonzero(lengths == length)
    idx = indptr[rows][:, None] + np.arange(length)[None, :]
    out[rows] = np.sum(w[idx], axis=1)
  return out


def _weights(x: Array, sq: Array, m: Array, sets: _Csr) -> _Csr:
  """V: exp(-d) over each expansion set, normalised in fp32, rounded to float16."""
  n = sets.indptr.size - 1
  owner = np.repeat(np.arange(n, dtype=np.int32), np.diff(sets.indptr))
  nnz = owner.size
  dist = np.empty(nnz, np.float32)
  for lo in range(0, nnz, _PAIR_CHUNK):
    ii = np.zeros(_PAIR_CHUNK, np.int32)
    jj = np.zeros(_PAIR_CHUNK, np.int32)
    hi = min(lo + _PAIR_CHUNK, nnz)
    ii[:hi - lo], jj[:hi - lo] = owner[lo:hi], sets.indices[lo:hi]
    dist[lo:hi] = np.asarray(_pair_scaled_dist(x, sq, m, jnp.asarray(ii), jnp.asarray(jj)))[:hi - lo]
  w = np.exp(-dist)
  v = (w / np.repeat(_row_sums_like_numpy(w, sets.indptr), np.diff(sets.indptr))).astype(np.float16)
  return _csr_from_rows(owner, sets.indices, v, n)


def _segment_order(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Stable order of keys, plus start and length of each run of equal keys in that order."""
  order = np.argsort(keys, kind="stable")
  k = keys[order]
  starts = np.flatnonzero(np.concatenate([[True], k[1:] != k[:-1]]))
  return order, starts, np.diff(np.concatenate([starts, [k.size]]))


def _query_expansion(v: _Csr, top: np.ndarray, k2: int, block: int) -> _Csr:
  """V_qe[i] = float16(mean over the first k2 neighbours' V rows), as numpy's float16 mean rounds it."""
  n = v.indptr.size - 1
  lengths = np.diff(v.indptr)
  owners, cols, vals = [], [], []
  for lo in range(0, n, block):
    rows = np.arange(lo, min(lo + block, n))
    nb = top[rows, :k2].T.reshape(-1)  # neighbour-major: entries of neighbour 0 first
    own = np.tile(np.arange(rows.size), k2)
    cnt = lengths[nb]
    src = metrics._ragged_take(v.indptr[nb], cnt)
    e_owner, e_col, e_val = np.repeat(own, cnt), v.indices[src], v.data[src]
    order, starts, runs = _segment_order(e_owner.astype(np.int64) * n + e_col)
    e_val = e_val[order]
    acc = e_val[starts].astype(np.float32)
    for p in range(1, int(runs.max(initial=1))):  # float32 running sum in neighbour order
      more = runs > p
      acc[more] += e_val[starts[more] + p].astype(np.float32)
    mean = (acc.astype(np.float64) / k2).astype(np.float32).astype(np.float16)
    owners.append(rows[e_owner[order][starts]])
    cols.append(e_col[order][starts])
    vals.append(mean)
  return _csr_from_rows(np.concatenate(owners), np.concatenate(cols), np.concatenate(vals), n)


@dataclasses.dataclass(frozen=True)
class _Csc:
  """Columns of V_qe restricted to gallery rows: colptr (N+1,), gallery row (ascending), float16 value."""
  colptr: np.ndarray
  rows: np.ndarray
  data: np.ndarray


def _gallery_columns(vqe: _Csr, num_query: int) -> _Csc:
  n = vqe.indptr.size - 1
  owner = np.repeat(np.arange(n, dtype=np.int32), np.diff(vqe.indptr))
  sel = owner >= num_query
  cols = vqe.indices[sel]
  order = np.argsort(cols, kind="stable")
  return _Csc(np.concatenate([[0], np.cumsum(np.bincount(cols, minlength=n))]),
              (owner[sel][order] - num_query).astype(np.int32), vqe.data[sel][order])


class Reranked:
  """Re-ranked query x gallery distances, produced in query chunks (see `re_ranking`)."""

  def __init__(self, x: Array, sq: Array, m: np.ndarray, vqe: _Csr, cols: _Csc, num_query: int,
               lambda_value: float):
    self.num_query = num_query
    self.num_gallery = x.shape[0] - num_query
    self.lambda_value = lambda_value
    self._x, self._sq, self._m = x, sq, jnp.asarray(m)
    self._vqe, self._cols = vqe, cols
    self._xg, self._sqg = x[num_query:], sq[num_query:]

  def nnz(self) -> int:
    """Stored non-zeros of V_qe (the main sparse structure)."""
    return self._vqe.nnz()

  def jaccard_part(self, qidx: np.ndarray) -> np.ndarray:
    """float16 jaccard * (1 - lambda) of the given queries against the gallery: (C, num_gallery)."""
    parts = np.array_split(qidx, min(_THREADS, max(qidx.size // 8, 1)))
    if len(parts) == 1:
      return self._jaccard_part(qidx)
    with concurrent.futures.ThreadPoolExecutor(len(parts)) as pool:  # numpy drops the GIL in the heavy loops
      return np.concatenate(list(pool.map(self._jaccard_part, parts)))

  def _jaccard_part(self, qidx: np.ndarray) -> np.ndarray:
    v, cols, ng = self._vqe, self._cols, self.num_gallery
    acc = np.zeros(qidx.size * ng, np.float16)
    start = v.indptr[qidx]
    length = v.indptr[qidx + 1] - start
    for p in range(int(length.max(initial=0))):  # ascending V_qe columns, one float16 addition each
      act = np.flatnonzero(length > p)
      ent = start[act] + p
      col = v.indices[ent]
      cnt = cols.colptr[col + 1] - cols.colptr[col]
      src = metrics._ragged_take(cols.colptr[col], cnt)
      lin = np.repeat(act * ng, cnt) + cols.rows[src]  # no (query, gallery) pair repeats within one p
      acc[lin] += np.minimum(np.repeat(v.data[ent], cnt), cols.data[src])
    # Untouched pairs have t = 0, i.e. jaccard 1; only touched ones need the float16 arithmetic.
    part = np.full(acc.shape, np.float16(1) * np.float16(1 - self.lambda_value), np.float16)
    hit = np.flatnonzero(acc)
    t = acc[hit]
    part[hit] = (1 - t / (2 - t)) * (1 - self.lambda_value)
    return part.reshape(qidx.size, ng)

  def rows(self, qidx) -> Array:
    """(C, num_gallery) float32 re-ranked distances of queries qidx (any order, repeats allowed)."""
    qidx = np.asarray(qidx, np.int64)
    part = jnp.asarray(self.jaccard_part(qidx))
    qi = jnp.asarray(qidx, jnp.int32)
    return _final_rows(self._x[qi], self._xg, self._sq[qi], self._sqg, self._m[qi], part,
                       jnp.float32(self.lambda_value))

  def dense(self, chunk: int = 256) -> np.ndarray:
    """The whole (num_query, num_gallery) matrix; only for problems that fit in memory."""
    out = np.empty((self.num_query, self.num_gallery), np.float32)
    for lo in range(0, self.num_query, chunk):
      idx = np.arange(lo, min(lo + chunk, self.num_query))
      out[idx] = np.asarray(self.rows(idx))
    return out


def re_ranking(qf, gf, k1: int = 50, k2: int = 15, lambda_value: float = 0.3, block: int | None = None) -> Reranked:
  """k-reciprocal re-ranking of query against gallery features, sparse and chunked (official arithmetic).

  Args:
    qf: (Q, D) query features, used as given (the official code receives L2-normalised features).
    gf: (G, D) gallery features.
    k1: k-reciprocal neighbourhood size (official CLIP-ReID value 50).
    k2: query-expansion neighbourhood size (15); 1 disables query expansion, as in the official code.
    lambda_value: weight of the original distance in the final one (0.3).
    block: rows per device / host block (default: about 512 MiB of distance rows).

  Returns:
    `Reranked`: `rows(query_indices)` gives re-ranked distance rows, `dense()` the whole matrix.
  """
  qf, gf = metrics.check_features(qf, gf)
  if k1 < 1 or k2 < 1:
    raise ValueError(f"expected k1 >= 1 and k2 >= 1, got k1={k1}, k2={k2}")
  nq = qf.shape[0]
  x = jnp.concatenate([jnp.asarray(qf, jnp.float32), jnp.asarray(gf, jnp.float32)])
  if not bool(jnp.isfinite(x).all()):
    raise ValueError("features: expected finite values, got NaN or inf")
  n = x.shape[0]
  # The official slices (initial_rank[i, :k1 + 1], [:k2], ...) stop at the N items: on a small problem the lists
  # are all N neighbours. The neighbour table is that wide at most; its slices below stop there the same way.
  k2 = min(k2, n)
  sq = metrics._sq_norms(x)
  block = block or _block_rows(n)
  k = min(max(k1 + 1, k2), n)
  top = np.empty((n, k), np.int32)
  colmax = np.empty(n, np.float32)
  for lo in range(0, n, block):
    idx = jnp.asarray(np.minimum(np.arange(lo, lo + block), n - 1), jnp.int32)  # fixed shape: one compile
    t, mx = _knn_block(x[idx], x, sq[idx], sq, k)
    hi = min(lo + block, n)
    top[lo:hi], colmax[lo:hi] = np.asarray(t)[:hi - lo], np.asarray(mx)[:hi - lo]
  if not np.all(colmax > 0):  # the official scaling divides by it: 0/0 = NaN everywhere (a collapsed model)
    raise ValueError(f"features: expected items that differ, got {int(np.sum(colmax <= 0))} whose distance to "
                     "every item is 0 (all features identical); re-ranking divides by the largest distance")
  host_block = min(block, 1024)
  v = _weights(x, sq, jnp.asarray(colmax), _expansion_sets(top, k1, host_block))
  if k2 != 1:
    v = _query_expansion(v, top, k2, host_block)
  return Reranked(x, sq, colmax, v, _gallery_columns(v, nq), nq, lambda_value)


def evaluate_reranked(qf, gf, q_pids, g_pids, q_camids, g_camids, k1: int = 50, k2: int = 15,
                      lambda_value: float = 0.3, max_rank: int = metrics.MAX_RANK, chunk: int | None = None,
                      normalize: bool = True, ranking: str = "auto") -> metrics.EvalResult:
  """`metrics.evaluate` on re-ranked distances (features L2-normalised first, as `R1_mAP_eval` would)."""
  qf, gf, q_pids, g_pids, q_camids, g_camids = metrics.check_inputs(qf, gf, q_pids, g_pids, q_camids, g_camids)
  q, g = jnp.asarray(qf, jnp.float32), jnp.asarray(gf, jnp.float32)
  if normalize:
    q, g = metrics.l2_normalize(q), metrics.l2_normalize(g)
  rr = re_ranking(q, g, k1=k1, k2=k2, lambda_value=lambda_value)
  return metrics.evaluate_rows(rr.rows, rr.num_gallery, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank,
                               chunk=chunk or 256, ranking=ranking)
