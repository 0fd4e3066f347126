"""Losses vs the official PyTorch outputs (golden/losses and the model fixtures), plus batch-composition checks."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipreid_jax import losses
from conftest import golden_cases, golden_root

# README section 10: losses/ files, |x - ref| <= rtol * max|ref| + atol over the whole array.
RTOL, ATOL = 1e-5, 1e-7

# Jitted once per shape: eager dispatch of many small ops is slower than compiling on CPU.
triplet = jax.jit(losses.triplet_loss, static_argnums=2)
stage1_loss = jax.jit(losses.stage1_loss)
stage2_loss = jax.jit(losses.stage2_loss, static_argnums=4)
_triplet_grad = jax.jit(jax.grad(lambda f, y, m: losses.triplet_loss(f, y, m)[0]), static_argnums=2)


def triplet_grad(feats, labels, margin=0.3):
  return _triplet_grad(feats, labels, margin)


def assert_close(x, ref, rtol=RTOL, atol=ATOL, what=""):
  x = np.asarray(x, np.float64)
  ref = np.asarray(ref, np.float64)
  assert x.shape == ref.shape, (what, x.shape, ref.shape)
  tol = rtol * (np.max(np.abs(ref)) if ref.size else 0.0) + atol
  err = np.max(np.abs(x - ref)) if ref.size else 0.0
  assert err <= tol, f"{what}: max abs err {err:.3e} > tol {tol:.3e}"


def _loss_cases():
  d = golden_root() / "losses"
  if not (d / "index.json").is_file():
    return []
  index = json.loads((d / "index.json").read_text())
  return [pytest.param(name, entry["kind"], id=name) for name, entry in sorted(index.items())]


@pytest.mark.parametrize("name,kind", _loss_cases())
def test_golden_loss_case(golden, name, kind):
  z = np.load(golden / "losses" / f"{name}.npz")
  if kind == "supcon":
    a, b = jnp.asarray(z["input_A"]), jnp.asarray(z["input_B"])
    ya, yb = jnp.asarray(z["input_yA"]), jnp.asarray(z["input_yB"])
    loss, (ga, gb) = jax.jit(jax.value_and_grad(losses.supcon_loss, argnums=(0, 1)))(a, b, ya, yb)
    assert_close(loss, z["loss"], what="loss")
    for key, g in (("grad_A", ga), ("grad_B", gb)):
      if key in z.files:
        assert_close(g, z[key], what=key)
  elif kind == "triplet":
    feat, labels = jnp.asarray(z["input_feat"]), jnp.asarray(z["input_labels"])
    fn = jax.value_and_grad(lambda f: (lambda out: (out[0], out[1:]))(losses.triplet_loss(f, labels, 0.3)),
                            has_aux=True)
    (loss, (ap, an)), g = jax.jit(fn)(feat)
    assert_close(loss, z["loss"], what="loss")
    assert_close(ap, z["dist_ap"], what="dist_ap")
    assert_close(an, z["dist_an"], what="dist_an")
    if "grad_feat" in z.files:
      assert_close(g, z["grad_feat"], what="grad_feat")
    else:  # ties: no reference gradient, but it must be finite
      assert np.all(np.isfinite(np.asarray(g)))
  elif kind == "ce":
    logits, targets = jnp.asarray(z["input_logits"]), jnp.asarray(z["input_targets"])
    k = int(z["input_num_classes"]) if "input_num_classes" in z.files else None
    loss, g = jax.jit(jax.value_and_grad(lambda x: losses.cross_entropy_label_smooth(x, targets, 0.1, k)))(logits)
    assert_close(loss, z["loss"], what="loss")
    if "grad_logits" in z.files:
      assert_close(g, z["grad_logits"], what="grad_logits")
  else:
    pytest.fail(f"unknown loss kind {kind!r}")


# ---------------------------------------------------------------------------------------------------------------
# Stage totals recomputed from the stored official model outputs.


def _model_variants():
  return [pytest.param(p, id=f"{p.parent.name}/{p.name}") for backbone in ("vit", "rn50")
          for p in golden_cases(backbone) if (p / "outputs.npz").is_file()]


def _model_name(meta):
  overrides = meta.get("config_overrides", [])
  return overrides[overrides.index("MODEL.NAME") + 1]


@pytest.mark.parametrize("variant", _model_variants())
def test_stage_losses_from_model_outputs(variant):
  meta = json.loads((variant / "meta.json").read_text())
  out = np.load(variant / "outputs.npz")
  y = jnp.asarray(np.load(variant / "inputs.npz")["labels"])

  total1, parts1 = stage1_loss(jnp.asarray(out["get_image_feature"]), jnp.asarray(out["text_features_batch"]), y)
  assert_close(parts1["i2t"], out["stage1_loss_i2t"], what="stage1 i2t")
  assert_close(parts1["t2i"], out["stage1_loss_t2i"], what="stage1 t2i")
  assert_close(total1, out["stage1_loss"], what="stage1 total")

  weights = losses.LossWeights.from_dict(meta["loss_weights"])
  assert weights == losses.LossWeights.for_config(_model_name(meta), meta["loss_weights"]["IF_LABELSMOOTH"] == "on")
  logits = losses.i2t_logits(jnp.asarray(out["img_feature_proj"]), jnp.asarray(out["text_features_all"]))
  assert_close(logits, out["stage2_i2t_logits"], rtol=5e-5, atol=1e-6, what="i2t logits")
  scores = (jnp.asarray(out["cls_score"]), jnp.asarray(out["cls_score_proj"]))
  feats = tuple(jnp.asarray(out[k]) for k in ("img_feature_last", "img_feature", "img_feature_proj"))
  total, comps = stage2_loss(scores, feats, y, jnp.asarray(out["stage2_i2t_logits"]), weights)
  ref = {"id_cls": "stage2_id_loss_cls", "id_proj": "stage2_id_loss_cls_proj", "tri_last": "stage2_tri_loss_last",
         "tri_feat": "stage2_tri_loss_feat", "tri_proj": "stage2_tri_loss_proj", "i2t": "stage2_i2t_loss"}
  assert set(comps) == set(ref)
  for k, v in ref.items():
    assert_close(comps[k], out[v], what=k)
  assert_close(total, out["stage2_loss_total"], what="stage2 total")
  for suffix, f in zip(("last", "feat", "proj"), feats):
    _, ap, an = triplet(f, y, weights.margin)
    assert_close(ap, out[f"stage2_tri_dist_ap_{suffix}"], what=f"dist_ap {suffix}")
    assert_close(an, out[f"stage2_tri_dist_an_{suffix}"], what=f"dist_an {suffix}")


# ---------------------------------------------------------------------------------------------------------------
# Batch composition, ties, edge cases (float64 numpy references written here).


def _np_dist(x):
  d2 = (x * x).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2 * x @ x.T
  return np.sqrt(np.maximum(d2, 1e-12))


def _np_triplet_pk(x, labels, margin):
  """The official reshape-based mining, valid only when every ID has the same count."""
  d = _np_dist(x)
  n = len(labels)
  same = labels[:, None] == labels[None, :]
  ap = d[same].reshape(n, -1).max(1)
  an = d[~same].reshape(n, -1).min(1)
  return np.maximum(ap - an + margin, 0).mean(), ap, an


def test_triplet_equals_reshape_mining_on_shuffled_pk():
  rng = np.random.default_rng(0)
  labels = rng.permutation(np.repeat(np.arange(5), 3))
  x = rng.normal(size=(15, 12)) * 2
  loss, ap, an = triplet(jnp.asarray(x, jnp.float32), jnp.asarray(labels), 0.3)
  ref = _np_triplet_pk(x, labels, 0.3)
  assert_close(loss, ref[0], rtol=1e-5, atol=1e-6)
  assert_close(ap, ref[1], rtol=1e-5, atol=1e-6)
  assert_close(an, ref[2], rtol=1e-5, atol=1e-6)


def test_triplet_uneven_batch():
  rng = np.random.default_rng(1)
  labels = np.array([0, 0, 0, 0, 1, 2, 2, 3, 3, 3])  # counts 4, 1, 2, 3: the official reshape cannot do this
  x = rng.normal(size=(10, 8))
  x32 = jnp.asarray(x, jnp.float32)
  loss, ap, an = triplet(x32, jnp.asarray(labels), 0.3)
  # Mining is checked on the fp32 distances.
  d = np.asarray(losses.euclidean_dist(x32, x32), np.float64)
  same = labels[:, None] == labels[None, :]
  ref_ap = np.where(same, d, -np.inf).max(1)
  ref_an = np.where(same, np.inf, d).min(1)
  # The singleton ID's hardest positive is itself: its distance is fp32 rounding noise of |x|^2 + |x|^2 - 2 x.x
  # (official too), 1e-3 or the 1e-12 clamp's 1e-6 depending on how XLA fuses the sums (it differs between jax
  # versions), so that row is checked for being noise and the loss takes it as computed.
  alone = same.sum(1) == 1
  assert alone.tolist() == [False] * 4 + [True] + [False] * 5 and float(ap[4]) < 1e-2
  assert_close(np.asarray(ap)[~alone], ref_ap[~alone], rtol=1e-5, atol=1e-6)
  assert_close(an, ref_an, rtol=1e-5, atol=1e-6)
  used_ap = np.where(alone, np.asarray(ap, np.float64), ref_ap)
  assert_close(loss, np.maximum(used_ap - ref_an + 0.3, 0).mean(), rtol=1e-5, atol=1e-6)
  g = triplet_grad(x32, jnp.asarray(labels))
  assert np.all(np.isfinite(np.asarray(g)))


def test_triplet_ties_pick_one_element():
  # Anchor 0 has two equally far positives (rows 1 and 2) and two equally near negatives (rows 3 and 4).
  x = jnp.array([[0., 0.], [3., 0.], [0., 3.], [5., 0.], [0., 5.]], jnp.float32)
  labels = jnp.array([0, 0, 0, 1, 1])
  dist = losses.euclidean_dist(x, x)
  gap = jax.grad(lambda d: losses.hard_example_mining(d, labels)[0][0])(dist)
  gan = jax.grad(lambda d: losses.hard_example_mining(d, labels)[1][0])(dist)
  # Like torch.max/min(dim): the gradient goes to the first extreme column only.
  np.testing.assert_array_equal(np.asarray(gap[0]), [0, 1, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(gan[0]), [0, 0, 0, 1, 0])


def test_triplet_hinge_gradient_at_exactly_zero():
  # Anchor 0: d_ap = 3, d_an = 4, so with margin 1 its hinge is exactly 0 (all distances are exact integers).
  # torch's clamp_min(0) still passes the gradient there: margin 1 must act like margin 1 + tiny, not 1 - tiny.
  x = jnp.array([[0., 0.], [3., 0.], [0., 4.], [0., 10.]], jnp.float32)
  labels = jnp.array([0, 0, 1, 1])
  grad = lambda m: np.asarray(triplet_grad(x, labels, m))
  np.testing.assert_allclose(grad(1.0), grad(1.001), rtol=1e-6)
  assert not np.allclose(grad(1.0), grad(0.999))


def test_triplet_soft_margin_and_no_negatives():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  labels = jnp.array([0, 0, 1, 1, 2, 2])
  loss, ap, an = triplet(x, labels, None)
  assert_close(loss, np.mean(np.log1p(np.exp(np.asarray(ap, np.float64) - np.asarray(an, np.float64)))))
  # A batch with a single ID: no negatives, zero loss, finite gradient.
  one = jnp.zeros((4,), jnp.int32)
  loss1, _, an1 = triplet(x[:4], one, 0.3)
  assert float(loss1) == 0.0 and np.all(np.isinf(np.asarray(an1)))
  g = triplet_grad(x[:4], one)
  assert np.all(np.asarray(g) == 0)


def test_supcon_rectangular_and_no_positive_row():
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(4, 6)), rng.normal(size=(7, 6))
  ya, yb = np.array([0, 1, 1, 2]), np.array([1, 0, 0, 3, 1, 2, 0])
  logits = a @ b.T
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  m = (ya[:, None] == yb[None, :]).astype(float)
  ref = -np.mean((m * logp).sum(1) / m.sum(1))
  got = losses.supcon_loss(*(jnp.asarray(v, jnp.float32) for v in (a, b)), jnp.asarray(ya), jnp.asarray(yb))
  assert_close(got, ref, rtol=1e-5, atol=1e-6)
  ya2 = np.array([0, 1, 5, 2])  # ID 5 has no positive: contributes 0 instead of NaN
  got2 = losses.supcon_loss(*(jnp.asarray(v, jnp.float32) for v in (a, b)), jnp.asarray(ya2), jnp.asarray(yb))
  ref2 = -np.sum(np.where(m.sum(1) > 0, (m * logp).sum(1) / np.maximum(m.sum(1), 1), 0)[[0, 1, 3]]) / 4
  assert_close(got2, ref2, rtol=1e-5, atol=1e-6)


def test_plain_cross_entropy_and_jit():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(5, 9)) * 30
  t = rng.integers(0, 9, size=5)
  logp = logits - logits.max(1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
  got = jax.jit(losses.cross_entropy_label_smooth, static_argnums=(2,))(jnp.asarray(logits, jnp.float32),
                                                                      jnp.asarray(t), 0.0)
  assert_close(got, -logp[np.arange(5), t].mean(), rtol=1e-6, atol=1e-6)


def test_stage2_loss_weights_and_baseline():
  rng = np.random.default_rng(5)
  y = jnp.array([0, 0, 1, 1, 2, 2])
  scores = tuple(jnp.asarray(rng.normal(size=(6, 3)), jnp.float32) for _ in range(2))
  feats = tuple(jnp.asarray(rng.normal(size=(6, d)), jnp.float32) for d in (8, 8, 4))
  w = losses.LossWeights.for_config("ViT-B-16")
  assert (w.id, w.triplet, w.i2t, w.label_smoothing, w.margin) == (0.25, 1.0, 1.0, 0.1, 0.3)
  assert losses.LossWeights.for_config("RN50").id == 1.0
  assert losses.LossWeights.for_config("RN50", label_smoothing=False).label_smoothing == 0.0
  total, comps = stage2_loss(scores, feats, y, None, w)
  assert "i2t" not in comps
  expect = 0.25 * (comps["id_cls"] + comps["id_proj"]) + comps["tri_last"] + comps["tri_feat"] + comps["tri_proj"]
  assert_close(total, expect, rtol=1e-6, atol=0)


def test_low_precision_inputs_are_upcast():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(8, 16)), jnp.bfloat16)
  y = jnp.array([0, 0, 1, 1, 2, 2, 3, 3])
  loss, ap, _ = triplet(x, y)
  assert loss.dtype == jnp.float32 and ap.dtype == jnp.float32
  ref = triplet(x.astype(jnp.float32), y)[0]
  assert float(loss) == pytest.approx(float(ref), rel=1e-6)
  g = jax.grad(lambda f: losses.supcon_loss(f, f, y, y))(x)
  assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


def test_loss_weights_from_dict_defaults():
  # Missing keys take the official defaults.py values: label smoothing on with epsilon 0.1, triplet margin 0.3.
  w = losses.LossWeights.from_dict({})
  assert (w.id, w.triplet, w.i2t, w.label_smoothing, w.margin) == (1.0, 1.0, 1.0, 0.1, 0.3)
  assert losses.LossWeights.from_dict({"IF_LABELSMOOTH": "off"}).label_smoothing == 0.0
  w = losses.LossWeights.from_dict({"margin": 0.5, "label_smoothing_epsilon": 0.2, "no_margin": False})
  assert (w.label_smoothing, w.margin) == (0.2, 0.5)
  assert losses.LossWeights.from_dict({"NO_MARGIN": True}).margin is None


@pytest.mark.parametrize("margin", [0.7, None])
def test_stage2_loss_passes_every_weight_and_setting_on(margin):
  """Non-default weights, smoothing and margin, with i2t logits: each term is its own loss with these settings."""
  rng = np.random.default_rng(7)
  y = jnp.array([0, 0, 1, 1, 2, 2])
  scores = tuple(jnp.asarray(rng.normal(size=(6, 3)), jnp.float32) for _ in range(2))
  feats = tuple(jnp.asarray(rng.normal(size=(6, d)), jnp.float32) for d in (8, 8, 4))
  logits = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  w = losses.LossWeights(id=0.5, triplet=2.0, i2t=3.0, label_smoothing=0.2, margin=margin)
  total, comps = stage2_loss(scores, feats, y, logits, w)
  ce = lambda s: losses.cross_entropy_label_smooth(s, y, 0.2)
  ref = {"id_cls": ce(scores[0]), "id_proj": ce(scores[1]), "i2t": ce(logits)}
  ref.update({n: losses.triplet_loss(f, y, margin)[0] for n, f in zip(losses.TRIPLET_NAMES, feats)})
  assert sorted(comps) == sorted(ref)
  for n, v in ref.items():
    assert_close(comps[n], v, rtol=1e-6, atol=0, what=n)
  assert float(ref["tri_feat"]) != float(losses.triplet_loss(feats[1], y, 0.3)[0])  # the margin matters here
  expect = 0.5 * (ref["id_cls"] + ref["id_proj"]) + 2.0 * sum(ref[n] for n in losses.TRIPLET_NAMES) + 3.0 * ref["i2t"]
  assert_close(total, expect, rtol=1e-6, atol=0)


def test_float64_inputs_stay_float64():
  """Only half-precision inputs are upcast: with x64 on, float64 is kept (e.g. for float64 reference checks)."""
  rng = np.random.default_rng(8)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.normal(size=(6, 5)), jnp.float64)
    y = jnp.array([0, 0, 1, 1, 2, 2])
    d = losses.euclidean_dist(x, x)
    assert d.dtype == jnp.float64
    ref = np.sqrt(np.maximum(((np.asarray(x)[:, None] - np.asarray(x)[None]) ** 2).sum(-1), 1e-12))
    np.testing.assert_allclose(np.asarray(d), ref, rtol=1e-10, atol=1e-10)
    assert losses.cross_entropy_label_smooth(x, y).dtype == jnp.float64
    assert losses.supcon_loss(x, x, y, y).dtype == jnp.float64
