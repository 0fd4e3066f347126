"""CLIP-ReID losses as the official PyTorch code computes them.

Everything here is a pure `jnp` function (jit-able, float32 friendly) that reproduces the numbers of the official
`loss/supcontrast.py`, `loss/softmax_loss.py`, `loss/triplet_loss.py` and `loss/make_loss.py` (github
Syliz517/CLIP-ReID), including their gradients:

- stage 1: `supcon_loss` / `stage1_loss` (i2t + t2i SupCon, raw dot products, temperature 1);
- stage 2: `cross_entropy_label_smooth` (ID and i2t), `triplet_loss` (batch-hard, unnormalised Euclidean),
  `i2t_logits` and `stage2_loss` (the weighted total of `make_loss.loss_func`).

Deliberate differences from the official code, none of which changes a value the official code can produce:

- `triplet_loss` mines with masks instead of reshaping the masked distance matrix, so it works for any batch
  composition (the official code needs every ID to appear equally often); on such batches the result is identical,
  ties included (the first maximum / minimum wins, as in `torch.max(dim)`). An anchor with no negative gets
  `dist_an = inf` and contributes 0 (the official code crashes).
- `supcon_loss` gives 0 to an anchor row without any positive (the official code returns NaN).

Inputs in bf16/fp16 are upcast to float32, and the small matmuls inside the losses run at `Precision.HIGHEST`:
on TPU/GPU the default fp32 matmul precision would be bf16/tf32, and `|x|^2 + |y|^2 - 2 x.y` cancels
catastrophically at that precision.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST
# `euclidean_dist` clamps squared distances here before the sqrt (the official `clamp(min=1e-12)`).
DIST_CLAMP_MIN = 1e-12


def _f32(x: Array) -> Array:
  """Upcasts bf16/fp16 inputs (mixed precision) to float32; float64 stays float64."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _matmul_t(a: Array, b: Array) -> Array:
  """a @ b.T at full fp32 precision."""
  return jnp.matmul(_f32(a), _f32(b).T, precision=_HIGHEST)


# ---------------------------------------------------------------------------------------------------------------
# Stage 1.


def supcon_loss(anchors: Array, contrast: Array, anchor_labels: Array, contrast_labels: Array) -> Array:
  """Official `SupConLoss(A, B, yA, yB)`: supervised contrastive loss over raw dot products.

  logits = A @ B.T (temperature 1, no normalisation, no logit scale); every column with the anchor's ID is a
  positive, the "diagonal" included (there is no self-exclusion). A and B may have different lengths.

  Args:
    anchors: (N, E) anchor features (images for i2t, texts for t2i).
    contrast: (M, E) features the anchors are contrasted against.
    anchor_labels: (N,) integer IDs of the anchors.
    contrast_labels: (M,) integer IDs of the contrast rows.

  Returns:
    Scalar loss: -mean_i [sum_j mask_ij log_prob_ij / sum_j mask_ij].
  """
  logits = _matmul_t(anchors, contrast)
  # Detached row max, as in the official code (value-only stabilisation; the gradient is unchanged).
  logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=1, keepdims=True))
  log_prob = logits - jnp.log(jnp.sum(jnp.exp(logits), axis=1, keepdims=True))
  mask = (anchor_labels[:, None] == contrast_labels[None, :]).astype(log_prob.dtype)
  num_pos = jnp.sum(mask, axis=1)
  # Rows without positives would be 0/0 = NaN officially; they contribute 0 here.
  mean_log_prob_pos = jnp.where(num_pos > 0, jnp.sum(mask * log_prob, axis=1) / jnp.maximum(num_pos, 1.0), 0.0)
  return -jnp.mean(mean_log_prob_pos)


def stage1_loss(image_features: Array, text_features: Array, labels: Array) -> tuple[Array, dict[str, Array]]:
  """Stage-1 loss of `processor_clipreid_stage1.py`: SupCon(img, txt) + SupCon(txt, img), both with labels y.

  Args:
    image_features: (B, E) feature-bank image features (`img_feature_proj`).
    text_features: (B, E) text features of the batch labels (one row per image).
    labels: (B,) integer IDs.

  Returns:
    (total, {'i2t': ..., 't2i': ...}).
  """
  i2t = supcon_loss(image_features, text_features, labels, labels)
  t2i = supcon_loss(text_features, image_features, labels, labels)
  return i2t + t2i, {"i2t": i2t, "t2i": t2i}


# ---------------------------------------------------------------------------------------------------------------
# Cross-entropy.


def cross_entropy_label_smooth(logits: Array, targets: Array, epsilon: float = 0.1,
                               num_classes: int | None = None) -> Array:
  """Official `CrossEntropyLabelSmooth(num_classes, epsilon)`; `epsilon=0` is `F.cross_entropy` (mean).

  Targets are (1 - eps) * onehot + eps / K and the loss is the sum over classes of the batch mean of
  -targets * log_softmax(logits) (log_softmax subtracts the row max, so large logits are fine).

  Args:
    logits: (B, C) raw scores.
    targets: (B,) integer class indices.
    epsilon: smoothing; 0.1 when IF_LABELSMOOTH is 'on', 0 for the plain cross-entropy of 'off'.
    num_classes: K in eps / K; defaults to C (the official code passes the classifier's class count).

  Returns:
    Scalar loss.
  """
  k = logits.shape[-1] if num_classes is None else num_classes
  log_probs = jax.nn.log_softmax(_f32(logits), axis=-1)
  onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=log_probs.dtype)
  smoothed = (1.0 - epsilon) * onehot + epsilon / k
  return jnp.sum(jnp.mean(-smoothed * log_probs, axis=0))


def i2t_logits(image_features_proj: Array, text_features: Array) -> Array:
  """Stage-2 image-to-text logits: raw `img_feature_proj @ text_features.T` against every identity's text."""
  return _matmul_t(image_features_proj, text_features)


# ---------------------------------------------------------------------------------------------------------------
# Triplet.


def euclidean_dist(x: Array, y: Array) -> Array:
  """Official `euclidean_dist`: sqrt(clamp(|x|^2 + |y|^2 - 2 x.y, min=1e-12)), shape (M, N).

  A self-distance is therefore about 1e-6, not 0. As with `torch.clamp`, the gradient passes where the squared
  distance is >= the clamp value and is 0 below it (so exact duplicates get no gradient, not NaN).
  """
  x, y = _f32(x), _f32(y)
  xx = jnp.sum(x * x, axis=1, keepdims=True)
  yy = jnp.sum(y * y, axis=1, keepdims=True).T
  d2 = (xx + yy) - 2.0 * _matmul_t(x, y)
  d2 = jnp.where(d2 < DIST_CLAMP_MIN, DIST_CLAMP_MIN, d2)
  return jnp.sqrt(d2)


def hard_example_mining(dist: Array, labels: Array) -> tuple[Array, Array]:
  """Batch-hard mining: hardest positive (max, self included) and hardest negative (min) per anchor.

  Mask-based, so any batch composition works. Exactly one entry per row is selected (the first maximum /
  minimum in column order, which is what `torch.max(dim)` picks from the official compacted row), so the gradient
  at ties goes to a single element like the official one.

  Args:
    dist: (N, N) distance matrix.
    labels: (N,) integer IDs.

  Returns:
    dist_ap, dist_an: (N,) each; dist_an is +inf for an anchor without negatives.
  """
  same = labels[:, None] == labels[None, :]
  ap_idx = jnp.argmax(jnp.where(same, dist, -jnp.inf), axis=1)
  an_idx = jnp.argmin(jnp.where(same, jnp.inf, dist), axis=1)
  dist_ap = jnp.take_along_axis(dist, ap_idx[:, None], axis=1)[:, 0]
  dist_an = jnp.take_along_axis(dist, an_idx[:, None], axis=1)[:, 0]
  has_neg = jnp.any(~same, axis=1)
  return dist_ap, jnp.where(has_neg, dist_an, jnp.inf)


def triplet_loss(feats: Array, labels: Array, margin: float | None = 0.3) -> tuple[Array, Array, Array]:
  """Official `TripletLoss(margin)(feats, labels)` (no feature normalisation, hard_factor 0).

  Args:
    feats: (N, D) features (pre-BN, unnormalised).
    labels: (N,) integer IDs.
    margin: `MarginRankingLoss(margin)`, i.e. mean(max(0, d_ap - d_an + margin)); None gives the
      `SoftMarginLoss` variant of `MODEL.NO_MARGIN`, mean(softplus(d_ap - d_an)).

  Returns:
    (loss, dist_ap, dist_an).
  """
  dist_ap, dist_an = hard_example_mining(euclidean_dist(feats, feats), labels)
  z = dist_ap - dist_an
  if margin is None:
    per_anchor = jax.nn.softplus(z)
  else:
    z = z + margin
    # torch `clamp_min_(0)`: the gradient passes at exactly 0 too.
    per_anchor = jnp.where(z < 0, 0.0, z)
  return jnp.mean(per_anchor), dist_ap, dist_an


# ---------------------------------------------------------------------------------------------------------------
# Stage 2 total.


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """The MODEL.* loss settings of one config.

  Attributes:
    id: ID_LOSS_WEIGHT (on the sum of both classifiers' CE).
    triplet: TRIPLET_LOSS_WEIGHT (on the sum of the three triplet losses).
    i2t: I2T_LOSS_WEIGHT.
    label_smoothing: epsilon of every CE term; 0.0 when IF_LABELSMOOTH is 'off' (plain cross-entropy).
    margin: SOLVER.MARGIN; None for MODEL.NO_MARGIN (soft-margin triplet).
  """
  id: float
  triplet: float = 1.0
  i2t: float = 1.0
  label_smoothing: float = 0.1
  margin: float | None = 0.3

  @classmethod
  def for_config(cls, model_name: str, label_smoothing: bool = True) -> "LossWeights":
    """Weights of the shipped CLIP-ReID ymls: ViT-B-16 has ID 0.25, RN50 1.0; triplet and i2t are 1.0.

    Args:
      model_name: MODEL.NAME ('ViT-B-16' or 'RN50'; other ViT-*/RN* names follow the same rule).
      label_smoothing: IF_LABELSMOOTH == 'on' (off only in VehicleID/cnn_clipreid.yml and the VehicleID baselines).
    """
    if model_name.startswith("ViT"):
      id_weight = 0.25
    elif model_name.startswith("RN"):
      id_weight = 1.0
    else:
      raise ValueError(f"unknown MODEL.NAME {model_name!r}")
    return cls(id=id_weight, label_smoothing=0.1 if label_smoothing else 0.0)

  @classmethod
  def from_dict(cls, d: Mapping[str, object]) -> "LossWeights":
    """From yml-style keys (ID_LOSS_WEIGHT, TRIPLET_LOSS_WEIGHT, I2T_LOSS_WEIGHT, IF_LABELSMOOTH, MARGIN...)."""
    get = {k.upper(): v for k, v in d.items()}.get
    smooth = get("IF_LABELSMOOTH", "on") == "on"
    eps = float(get("LABEL_SMOOTHING_EPSILON", 0.1)) if smooth else 0.0
    margin = get("TRIPLET_MARGIN", get("MARGIN", 0.3))
    if get("NO_MARGIN", False):
      margin = None
    return cls(id=float(get("ID_LOSS_WEIGHT", 1.0)), triplet=float(get("TRIPLET_LOSS_WEIGHT", 1.0)),
               i2t=float(get("I2T_LOSS_WEIGHT", 1.0)), label_smoothing=eps,
               margin=None if margin is None else float(margin))


ID_NAMES = ("id_cls", "id_proj")
TRIPLET_NAMES = ("tri_last", "tri_feat", "tri_proj")


def stage2_loss(cls_scores: Sequence[Array], feats: Sequence[Array], labels: Array, i2t_logits_: Array | None,
                weights: LossWeights) -> tuple[Array, dict[str, Array]]:
  """Official stage-2 `loss_func(score, feat, target, target_cam, i2tscore)`.

  total = id * (CE(cls_score) + CE(cls_score_proj)) + triplet * (T(last) + T(feat) + T(proj)) + i2t * CE(i2t),
  where both ID terms and the three triplet terms are *summed* (not averaged), and every CE uses the same
  variant (label-smoothed or plain). Without i2t logits (the baseline), the i2t term is left out.

  Args:
    cls_scores: (cls_score, cls_score_proj), each (B, C), from the BN'd features.
    feats: (img_feature_last, img_feature, img_feature_proj), the pre-BN features.
    labels: (B,) integer IDs.
    i2t_logits_: (B, C) `img_feature_proj @ text_features.T`, or None for the baseline.
    weights: the config's loss weights.

  Returns:
    (total, components): components are the unweighted id_cls, id_proj, tri_last, tri_feat, tri_proj and i2t
    (the last only with i2t logits).
  """
  if len(cls_scores) != len(ID_NAMES) or len(feats) != len(TRIPLET_NAMES):
    raise ValueError(f"expected {len(ID_NAMES)} scores and {len(TRIPLET_NAMES)} features, "
                     f"got {len(cls_scores)} and {len(feats)}")
  eps = weights.label_smoothing
  comps = {n: cross_entropy_label_smooth(s, labels, eps) for n, s in zip(ID_NAMES, cls_scores)}
  comps.update({n: triplet_loss(f, labels, weights.margin)[0] for n, f in zip(TRIPLET_NAMES, feats)})
  id_sum = sum(comps[n] for n in ID_NAMES)
  tri_sum = sum(comps[n] for n in TRIPLET_NAMES)
  total = weights.id * id_sum + weights.triplet * tri_sum
  if i2t_logits_ is not None:
    comps["i2t"] = cross_entropy_label_smooth(i2t_logits_, labels, eps)
    total = weights.i2t * comps["i2t"] + total
  return total, comps
