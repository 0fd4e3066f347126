"""Metrics: golden cases from the official `R1_mAP_eval`, a brute-force float64 reference, bad inputs."""
import json

import numpy as np
import pytest

from conftest import golden_root
from clipreid_jax.evaluation import metrics

RANKINGS = ("host", "device", "sort")


def _metric_cases() -> list[str]:
  """Every metrics/*.npz holding a plain evaluation case (a `distmat` and its labels)."""
  d = golden_root() / "metrics"
  if not d.is_dir():
    return []
  return sorted(p.stem for p in d.glob("*.npz") if "distmat" in np.load(p).files)


def _load(golden, name):
  z = np.load(golden / "metrics" / f"{name}.npz")
  return {k: z[k] for k in z.files}


def _labels(z):
  return z["q_pids"], z["g_pids"], z["q_camids"], z["g_camids"]


def test_every_metrics_file_is_covered(golden):
  """A new golden file must be picked up by one of the data-driven tests, not silently skipped."""
  index = json.loads((golden / "metrics" / "index.json").read_text())
  for p in sorted((golden / "metrics").glob("*.npz")):
    files = np.load(p).files
    assert "distmat" in files or any(k.endswith("_params") for k in files), p.name
    assert p.stem in index, p.name


@pytest.mark.parametrize("name", _metric_cases())
def test_golden_distmat_from_features(golden, name):
  z = _load(golden, name)
  got = metrics.euclidean_distance(metrics.l2_normalize(z["qf"]), metrics.l2_normalize(z["gf"]))
  ref = z["distmat"]
  assert got.shape == ref.shape and got.dtype == np.float32
  assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6


@pytest.mark.parametrize("name", _metric_cases())
def test_golden_eval_func_on_stored_distmat(golden, name):
  z = _load(golden, name)
  info = json.loads((golden / "metrics" / "index.json").read_text())[name]
  for stable in (True, False):
    res = metrics.eval_func(z["distmat"], *_labels(z), stable=stable)
    assert res.cmc.shape == z["cmc"].shape == (min(metrics.MAX_RANK, z["gf"].shape[0]),)
    np.testing.assert_allclose(res.cmc, z["cmc"], rtol=0, atol=1e-9)
    assert abs(res.mAP - float(z["mAP"])) <= 1e-9
    assert res.num_valid_queries == int(z["num_valid_queries"]) == info["num_valid_queries"]


@pytest.mark.parametrize("ranking", RANKINGS)
@pytest.mark.parametrize("name", _metric_cases())
def test_golden_metrics_from_features(golden, name, ranking):
  z = _load(golden, name)
  nq = z["qf"].shape[0]
  for chunk in (None, max(nq // 3 + 1, 1)):  # also chunks that do not divide the query count
    res = metrics.evaluate(z["qf"], z["gf"], *_labels(z), chunk=chunk, ranking=ranking)
    assert res.cmc.dtype == np.float32 and res.cmc.shape == z["cmc"].shape
    np.testing.assert_allclose(res.cmc, z["cmc"], rtol=0, atol=1e-6)
    assert abs(res.mAP - float(z["mAP"])) <= 1e-6
    assert res.num_valid_queries == int(z["num_valid_queries"])
    assert np.isnan(res.per_query_ap).sum() == nq - res.num_valid_queries


def test_golden_rerank_file_without_reranking(golden):
  """rerank.npz also stores the plain evaluation of its features, their normalised form and its distances."""
  files = [p for p in sorted((golden / "metrics").glob("*.npz")) if "no_rerank_distmat" in np.load(p).files]
  assert files, "no golden file with a plain evaluation beside its re-ranking"
  for p in files:
    z = dict(np.load(p))
    qn, gn = metrics.l2_normalize(z["qf"]), metrics.l2_normalize(z["gf"])
    for got, ref in ((qn, z["qf_normalized"]), (gn, z["gf_normalized"])):
      assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6
    got, ref = metrics.euclidean_distance(qn, gn), z["no_rerank_distmat"]  # README: distmat from features
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6
    res = metrics.evaluate(z["qf"], z["gf"], *_labels(z))
    np.testing.assert_allclose(res.cmc, z["no_rerank_cmc"], rtol=0, atol=1e-6)
    assert abs(res.mAP - float(z["no_rerank_mAP"])) <= 1e-6
    ref = metrics.eval_func(z["no_rerank_distmat"], *_labels(z))
    assert abs(ref.mAP - float(z["no_rerank_mAP"])) <= 1e-9


# ---------------------------------------------------------------------------------------------------------------
# Brute-force float64 reference, written from the definitions (no sorting).


def _brute_force(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
  distmat = np.asarray(distmat, np.float64)
  nq, ng = distmat.shape
  max_rank = min(max_rank, ng)
  cmc, aps, inps = np.zeros(max_rank), [], []
  for q in range(nq):
    kept = ~((g_pids == q_pids[q]) & (g_camids == q_camids[q]))
    match = np.flatnonzero(kept & (g_pids == q_pids[q]))
    if match.size == 0:
      aps.append(np.nan)
      inps.append(np.nan)
      continue
    d = distmat[q]
    j = np.arange(ng)
    # 1-based rank among kept entries: closer ones, and equal ones with a smaller gallery index, come first.
    ranks = np.sort([1 + np.sum(kept & ((d < d[m]) | ((d == d[m]) & (j < m)))) for m in match])
    aps.append(np.mean(np.arange(1, ranks.size + 1) / ranks))
    inps.append(ranks.size / ranks[-1])
    cmc[ranks[0] - 1:] += 1
  aps, inps = np.asarray(aps), np.asarray(inps)
  nv = np.sum(~np.isnan(aps))
  return cmc / nv, np.nanmean(aps), np.nanmean(inps), int(nv), aps


def _random_case(rng, nq, ng, dim, num_ids, num_cams, integer=False):
  q_pids = rng.integers(0, num_ids + 3, nq)  # some query identities are absent from the gallery
  g_pids = rng.integers(-1, num_ids, ng)  # -1 and 0 act like junk / distractor labels: plain non-matches
  q_camids = rng.integers(0, num_cams, nq)
  g_camids = rng.integers(0, num_cams, ng)
  if integer:
    # Entries in {-1/2, 0, 1/2} with four non-zeros: unit vectors whose distances are exact in fp32 (many ties).
    def unit(n):
      x = np.zeros((n, dim), np.float32)
      for r in range(n):
        x[r, rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
      return x
    qf, gf = unit(nq), unit(ng)
  else:
    centres = rng.standard_normal((num_ids + 4, dim))
    qf = (centres[q_pids + 1] + rng.standard_normal((nq, dim))).astype(np.float32)
    gf = (centres[g_pids + 1] + rng.standard_normal((ng, dim))).astype(np.float32)
  return qf, gf, q_pids, g_pids, q_camids, g_camids


def _check(res, ref, atol=1e-9):
  cmc, m_ap, m_inp, nv, aps = ref
  np.testing.assert_allclose(res.cmc, cmc, rtol=0, atol=1e-6)
  assert abs(res.mAP - m_ap) <= atol and abs(res.mINP - m_inp) <= atol
  assert res.num_valid_queries == nv
  np.testing.assert_allclose(res.per_query_ap, aps, rtol=0, atol=atol)


@pytest.mark.parametrize("ranking", RANKINGS)
@pytest.mark.parametrize("integer", [False, True])
def test_random_features_vs_brute_force(ranking, integer):
  rng = np.random.default_rng(7 + integer)
  qf, gf, *labels = _random_case(rng, 37, 211, 16, 12, 3, integer=integer)
  dist = metrics.euclidean_distance(metrics.l2_normalize(qf), metrics.l2_normalize(gf))
  ref = _brute_force(dist, *labels)
  assert ref[3] < 37  # some queries have no valid match
  if integer:
    assert len(np.unique(dist)) < dist.size // 20  # the case really has ties
  for chunk in (5, 16, None):  # 5 and 16 do not divide the number of valid queries
    _check(metrics.evaluate(qf, gf, *labels, chunk=chunk, ranking=ranking), ref)
  _check(metrics.eval_func(dist, *labels), ref)


@pytest.mark.parametrize("ranking", RANKINGS)
def test_integer_distmat_ties_and_small_gallery(ranking):
  """Integer distances (ties everywhere), gallery smaller than max_rank, queries losing entries to the filter."""
  rng = np.random.default_rng(3)
  nq, ng = 23, 31
  labels = (rng.integers(0, 5, nq), rng.integers(0, 6, ng), rng.integers(0, 3, nq), rng.integers(0, 3, ng))
  dist = rng.integers(0, 6, (nq, ng)).astype(np.float32)
  ref = _brute_force(dist, *labels)
  res = metrics.evaluate_distmat(dist, *labels, chunk=4, ranking=ranking)
  assert res.cmc.shape == (ng,)
  _check(res, ref)
  _check(metrics.eval_func(dist, *labels), ref)


def test_unstable_reference_agrees_without_ties():
  rng = np.random.default_rng(11)
  qf, gf, *labels = _random_case(rng, 30, 150, 8, 10, 4)
  dist = metrics.euclidean_distance(metrics.l2_normalize(qf), metrics.l2_normalize(gf))
  a, b = metrics.eval_func(dist, *labels), metrics.eval_func(dist, *labels, stable=False)
  assert a.mAP == b.mAP and np.array_equal(a.cmc, b.cmc)


def test_query_pid_zero_matches_gallery_pid_zero():
  """Labels are compared as given, like the official code: pid 0 is only special in the datasets."""
  dist = np.array([[0.1, 0.2, 0.3]], np.float32)
  res = metrics.evaluate_distmat(dist, [0], [1, 0, 0], [0], [1, 1, 0])
  assert res.num_valid_queries == 1 and res.mAP == 0.5 and res.rank(1) == 0.0 and res.rank(2) == 1.0


def test_max_rank_and_rank_accessor():
  rng = np.random.default_rng(5)
  qf, gf, *labels = _random_case(rng, 20, 120, 8, 6, 3)
  res = metrics.evaluate(qf, gf, *labels, max_rank=10)
  assert res.cmc.shape == (10,) and res.rank(1) == res.cmc[0] and res.rank(50) == res.cmc[-1]
  assert np.all(np.diff(res.cmc) >= 0)
  with pytest.raises(ValueError, match="k >= 1"):
    res.rank(0)  # used to return the curve's last value


# ---------------------------------------------------------------------------------------------------------------
# Bad input.


def _one_line_value_error(fn, *args, match, **kwargs):
  with pytest.raises(ValueError, match=match) as err:
    fn(*args, **kwargs)
  assert "\n" not in str(err.value) and "expected" in str(err.value)


def test_bad_inputs():
  f = np.ones((3, 4), np.float32)
  ids, cams = np.arange(3), np.zeros(3, int)
  _one_line_value_error(metrics.evaluate, np.ones((0, 4)), f, [], ids, [], cams, match="query features")
  _one_line_value_error(metrics.evaluate, f, np.ones((0, 4)), ids, [], cams, [], match="gallery features")
  _one_line_value_error(metrics.evaluate, f, np.ones((3, 5)), ids, ids, cams, cams, match="widths differ")
  _one_line_value_error(metrics.evaluate, f, f, ids[:2], ids, cams, cams, match="q_pids")
  _one_line_value_error(metrics.evaluate, f, f, ids, ids, cams, cams[:2], match="g_camids")
  _one_line_value_error(metrics.evaluate, np.ones(4), f, ids, ids, cams, cams, match="2-D")
  _one_line_value_error(metrics.evaluate, f, f, ids, ids, cams, cams, chunk=0, match="chunk")
  _one_line_value_error(metrics.evaluate, f, f, ids, ids, cams, cams, ranking="gpu", match="ranking")
  _one_line_value_error(metrics.evaluate, f * np.nan, f, ids, ids, cams, cams, match="finite")
  _one_line_value_error(metrics.evaluate, f, f, ids, ids, cams, cams, match="at least one query")  # same cams: all filtered
  _one_line_value_error(metrics.eval_func, np.ones((3, 0)), ids, [], cams, [], match="distmat")
  _one_line_value_error(metrics.eval_func, np.ones((3, 3)), ids, ids[:1], cams, cams, match="g_pids")
  _one_line_value_error(metrics.euclidean_distance, f, np.ones((2, 5)), match="widths differ")
  _one_line_value_error(metrics.evaluate, f, f, ids, ids, cams, cams + 1, max_rank=0, match="max_rank")
  d = np.arange(9, dtype=np.float32).reshape(3, 3)
  d[1, 2] = np.nan  # no order: the host, device and sort rankings used to give three different answers
  for ranking in ("host", "device", "sort"):
    _one_line_value_error(metrics.evaluate_distmat, d, ids, ids, cams, cams + 1, ranking=ranking, match="NaN")
    # Rows from elsewhere (re-ranking) are checked as they come.
    _one_line_value_error(metrics.evaluate_rows, lambda idx: d[idx], 3, ids, ids, cams, cams + 1, ranking=ranking,
                          match="distances: expected no NaN")


def test_accelerator_path_untuned_and_in_pieces(monkeypatch):
  """What a GPU runs: the untuned executables (compiler options on the top-level jit only; a nested one is an
  error) and host features sent over in pieces. Forced here on the CPU: same numbers as the plain path."""
  import jax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  qf, gf, *labels = _random_case(rng, 29, 301, 8, 10, 3)
  ref = metrics.evaluate(qf, gf, *labels, ranking="device")
  q, g = metrics.l2_normalize(qf), metrics.l2_normalize(gf)
  g_sq = metrics._sq_norms(g)  # pylint: disable=protected-access
  idx = jax.numpy.arange(4)
  for fn, args in ((metrics._sqdist_rows, (q[:4], g, g_sq)),  # pylint: disable=protected-access
                   (metrics._sqdist_gather, (q, idx, g, g_sq))):  # pylint: disable=protected-access
    np.testing.assert_array_equal(np.asarray(fn.untuned(*args)), np.asarray(fn(*args)))
  monkeypatch.setattr(metrics, "_TRANSFER_BYTES", 8 * 4 * 7)  # 7 rows per piece
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  pieces = metrics._to_device(gf)  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.asarray(pieces), gf)
  res = metrics.evaluate(qf, gf, *labels)  # "auto" picks the device ranking here
  np.testing.assert_array_equal(res.cmc, ref.cmc)
  assert res.mAP == ref.mAP and res.num_valid_queries == ref.num_valid_queries


def test_l2_normalize_divides_by_the_norm_clamped_at_eps():
  """torch's F.normalize: x / max(|x|, 1e-12), so a vector shorter than 1e-12 is scaled by 1e12, not normalised."""
  x = np.array([[3.0, 4.0], [3e-13, 4e-13], [0.0, 0.0]], np.float32)
  np.testing.assert_allclose(np.asarray(metrics.l2_normalize(x)), [[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]], rtol=1e-6)


def test_non_finite_gallery_features_are_refused():
  """The finiteness check covers the gallery too, not only the query (a gallery NaN would surface later, as a NaN
  distance blamed on a re-ranking)."""
  f = np.eye(3, 4, dtype=np.float32) + 0.5
  ids, cams = np.arange(3), np.zeros(3, int)
  for bad in (np.nan, np.inf):
    g = f.copy()
    g[1, 2] = bad
    _one_line_value_error(metrics.evaluate, f, g, ids, ids, cams, cams + 1, match="features: expected finite")


def test_euclidean_distance_chunks_cover_every_row():
  rng = np.random.default_rng(13)
  qf, gf = rng.standard_normal((11, 6)).astype(np.float32), rng.standard_normal((9, 6)).astype(np.float32)
  ref = ((qf.astype(np.float64)[:, None] - gf.astype(np.float64)[None]) ** 2).sum(-1)
  for chunk in (1, 3, 4, 10, 11, 64):  # remainders of 0, 1, 2, 3 rows, one chunk, a chunk beyond the queries
    got = metrics.euclidean_distance(qf, gf, chunk=chunk)
    assert got.shape == (11, 9) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("ranking", RANKINGS)
def test_negative_zero_ties_with_zero(ranking):
  """-0.0 == 0.0: an exact tie, broken by gallery index like any other (a sort alone puts -0.0 first)."""
  dist = np.array([[0.0, -0.0, 0.5, -0.0]], np.float32)
  labels = tuple(map(np.array, ([1], [2, 1, 1, 3], [0], [1, 1, 1, 1])))
  ref = _brute_force(dist, *labels)
  assert ref[1] == (1 / 2 + 2 / 4) / 2  # the match at -0.0 ranks second, after gallery entry 0 at +0.0
  _check(metrics.evaluate_distmat(dist, *labels, ranking=ranking), ref)
