"""k-reciprocal re-ranking: golden runs of the official `re_ranking`, dense vs scalable forms, bad inputs."""
import inspect

import numpy as np
import pytest

from conftest import golden_root
from clipreid_jax.evaluation import metrics, rerank, rerank_exact
from clipreid_jax.evaluation.rerank import re_ranking
from clipreid_jax.evaluation.rerank_exact import re_ranking_exact

PARAMS_SUFFIX = "_params"


def _rerank_runs() -> list[tuple[str, str]]:
  """(file stem, run tag) for every `<tag>_params` array in metrics/*.npz."""
  d = golden_root() / "metrics"
  if not d.is_dir():
    return []
  return [(p.stem, k[:-len(PARAMS_SUFFIX)]) for p in sorted(d.glob("*.npz"))
          for k in np.load(p).files if k.endswith(PARAMS_SUFFIX)]


def _run(golden, stem, tag):
  z = dict(np.load(golden / "metrics" / f"{stem}.npz"))
  k1, k2, lam = z[tag + PARAMS_SUFFIX]
  assert k1 == int(k1) and k2 == int(k2)
  return z, int(k1), int(k2), float(lam)


def _labels(z):
  return z["q_pids"], z["g_pids"], z["q_camids"], z["g_camids"]


@pytest.mark.parametrize("stem,tag", _rerank_runs())
def test_golden_exact_form(golden, stem, tag):
  z, k1, k2, lam = _run(golden, stem, tag)
  got = re_ranking_exact(z["qf_normalized"], z["gf_normalized"], k1, k2, lam)
  ref = z[tag + "_final_dist"]
  assert got.shape == ref.shape and got.dtype == np.float32
  assert np.abs(got - ref).max() <= 1e-6
  res = metrics.eval_func(ref, *_labels(z))  # the official metric on the official distances: exact
  assert abs(res.mAP - float(z[tag + "_mAP"])) <= 1e-9
  np.testing.assert_allclose(res.cmc, z[tag + "_cmc"], rtol=0, atol=1e-9)
  res = metrics.eval_func(got, *_labels(z))  # and on ours (README: re-ranking metrics 1e-6)
  assert abs(res.mAP - float(z[tag + "_mAP"])) <= 1e-6
  np.testing.assert_allclose(res.cmc, z[tag + "_cmc"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("stem,tag", _rerank_runs())
def test_golden_scalable_form(golden, stem, tag):
  z, k1, k2, lam = _run(golden, stem, tag)
  got = re_ranking(z["qf_normalized"], z["gf_normalized"], k1, k2, lam, block=48).dense(chunk=7)
  assert np.abs(got - z[tag + "_final_dist"]).max() <= 1e-6
  res = rerank.evaluate_reranked(z["qf"], z["gf"], *_labels(z), k1=k1, k2=k2, lambda_value=lam)
  assert abs(res.mAP - float(z[tag + "_mAP"])) <= 1e-6
  np.testing.assert_allclose(res.cmc, z[tag + "_cmc"], rtol=0, atol=1e-6)


def _clustered(rng, nq, ng, dim, ids, noise):
  centres = rng.standard_normal((ids, dim))
  q = centres[rng.integers(0, ids, nq)] + noise * rng.standard_normal((nq, dim))
  g = centres[rng.integers(0, ids, ng)] + noise * rng.standard_normal((ng, dim))
  return np.asarray(metrics.l2_normalize(q)), np.asarray(metrics.l2_normalize(g))


def _dyadic(rng, nq, ng, dim, levels):
  """Entries k/8: every distance is exact in fp32 whatever the summation order, and many are tied."""
  return ((rng.integers(-levels, levels + 1, (nq, dim)) / 8).astype(np.float32),
          (rng.integers(-levels, levels + 1, (ng, dim)) / 8).astype(np.float32))


@pytest.mark.parametrize("kind,k1,k2,lam", [
    ("clustered", 20, 6, 0.3),
    ("clustered", 50, 15, 0.3),
    ("clustered", 10, 1, 0.5),  # k2 = 1: no query expansion
    ("dyadic", 20, 6, 0.3),
    ("dyadic", 15, 5, 0.0),
    # 13 items, fewer than k1 + 1 (the official slices then take all of them; half_k(20) + 1 = 11 still cuts) or k2
    ("small", 50, 15, 0.3),
    ("small", 20, 6, 0.3),
    ("small", 12, 13, 0.3),
])
def test_scalable_equals_exact(kind, k1, k2, lam):
  rng = np.random.default_rng(k1 * 100 + k2)
  if kind == "clustered":
    q, g = _clustered(rng, 40, 190, 16, 25, 0.9)
  else:
    q, g = _dyadic(rng, 30, 160, 5, 2) if kind == "dyadic" else _dyadic(rng, 4, 9, 5, 2)
  if kind == "dyadic":
    d = rerank_exact.pairwise_sq_dist(np.concatenate([q, g]))
    assert len(np.unique(d)) < d.size // 50  # ties everywhere
  ref = re_ranking_exact(q, g, k1, k2, lam)
  got = re_ranking(q, g, k1, k2, lam, block=37).dense(chunk=11)  # blocks that divide nothing
  diff = np.abs(got - ref)
  if kind != "clustered":  # identical distances: identical arithmetic throughout
    assert diff.max() <= 1e-6
  else:
    # The dense form's numpy GEMM and the device's distances may differ by an fp32 ulp (they do on GPU), which can
    # tip a float16 rounding: then float16(jaccard * (1 - lambda)) moves by one float16 ulp (2^-11 in [0.5, 1)).
    assert np.mean(diff > 1e-6) <= 2e-3 and diff.max() <= 2.0**-11 + 1e-6


def test_rows_in_any_order_match_dense():
  rng = np.random.default_rng(2)
  q, g = _clustered(rng, 20, 90, 8, 10, 1.0)
  rr = re_ranking(q, g, 20, 6, 0.3)
  dense = rr.dense()
  idx = np.array([5, 0, 19, 5, 3])
  np.testing.assert_array_equal(np.asarray(rr.rows(idx)), dense[idx])
  assert rr.nnz() > 0 and rr.num_query == 20 and rr.num_gallery == 90


@pytest.mark.parametrize("lam", [0.3, 0.0, 0.9])
def test_reranked_evaluation_equals_eval_func_on_dense(lam):
  rng = np.random.default_rng(4)
  nq, ng = 30, 140
  q, g = _clustered(rng, nq, ng, 16, 15, 1.0)
  labels = (rng.integers(0, 8, nq), rng.integers(0, 8, ng), rng.integers(0, 3, nq), rng.integers(0, 3, ng))
  res = rerank.evaluate_reranked(q, g, *labels, k1=20, k2=6, lambda_value=lam, normalize=False, chunk=9)
  ref = metrics.eval_func(re_ranking_exact(q, g, 20, 6, lam), *labels)
  assert abs(res.mAP - ref.mAP) <= 1e-9 and np.array_equal(res.cmc, ref.cmc)
  if lam != 0.3:  # lambda_value reaches the distances: another lambda gives other numbers
    other = metrics.eval_func(re_ranking_exact(q, g, 20, 6, 0.3), *labels)
    assert abs(res.mAP - other.mAP) > 1e-4


def test_half_k_and_expansion_rule_follow_numpy():
  assert [rerank_exact.half_k(k) for k in (5, 15, 20, 25, 50)] == [2, 8, 10, 12, 25]  # round half to even
  assert rerank_exact.expansion_qualifies(3, 4) and not rerank_exact.expansion_qualifies(2, 3)


def test_bad_inputs():
  f = np.ones((3, 4), np.float32)
  for args, kwargs, match in [((np.ones((0, 4)), f), {}, "query features"),
                              ((f, np.ones((3, 5))), {}, "widths differ"),
                              ((f, f), {"k1": 0}, "k1"),
                              ((f, np.full((3, 4), np.nan, np.float32)), {}, "finite"),
                              ((f, f), {"k1": 2}, "all features identical")]:  # the official code: NaN everywhere
    with pytest.raises(ValueError, match=match) as err:
      re_ranking(*args, **kwargs)
    assert "\n" not in str(err.value) and "expected" in str(err.value)


def test_defaults_are_the_official_k1_k2_lambda():
  # R1_mAP_eval calls re_ranking(qf, gf, k1=50, k2=15, lambda_value=0.3) (spec section 6).
  for fn in (re_ranking, re_ranking_exact):
    params = inspect.signature(fn).parameters
    assert (params["k1"].default, params["k2"].default, params["lambda_value"].default) == (50, 15, 0.3), fn
