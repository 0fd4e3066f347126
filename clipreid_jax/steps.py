"""Pure training and inference steps. The trainer jits them over a device mesh.

Each train step is `(state, batch, rng) -> (state, metrics)`: no host work, no side effects, so it
compiles once, donates its state, and runs the same on one CPU or a pod. Frozen parameters are frozen by
the optimizer's labels (optax.multi_transform); XLA drops their unused gradients.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from clipreid_jax import losses, optim
from clipreid_jax.data.device_augment import augment, normalize
from clipreid_jax.models.clipreid import CLIPReID


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  # Stage 2: all identities' text features, computed once and frozen; None in stage 1 and the baseline.
  text_features: Optional[jax.Array] = None


def create_state(params, batch_stats, tx: optax.GradientTransformation, text_features=None) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), text_features=text_features)


def _apply_grads(state: TrainState, tx, grads, batch_stats=None) -> TrainState:
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                       batch_stats=state.batch_stats if batch_stats is None else batch_stats)


def trainable_grad_norm(grads, stage: str) -> jax.Array:
  """Global L2 norm of the gradients the optimizer uses ('stage1', 'stage2' or 'baseline' labels).

  Frozen leaves are left out: their gradients are never needed, so XLA can still drop them (the whole text
  encoder in stage 1). The trainer stops on a non-finite norm, so an inf/nan gradient is caught at its step.
  """
  labels = jax.tree.leaves(optim.param_labels(grads, stage))
  used = [g for g, label in zip(jax.tree.leaves(grads), labels) if label != optim.FROZEN]
  return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in used))


# --------------------------------------------------------------------------------------------------
# Stage 1: prompt tokens against the cached image-feature bank.


def stage1_loss_fn(model: CLIPReID, params, features, labels):
  text = model.apply({"params": params}, labels, method=CLIPReID.text_features)
  return losses.stage1_loss(features, text, labels)


def make_stage1_step(model: CLIPReID, tx) -> Callable:
  """One stage-1 step on a batch {'feature': (B, E), 'label': (B,)} drawn from the bank."""

  def step(state: TrainState, batch, rng=None):
    del rng  # stage 1 is deterministic given the batch
    (loss, comps), grads = jax.value_and_grad(
        lambda p: stage1_loss_fn(model, p, batch["feature"], batch["label"]), has_aux=True)(state.params)
    metrics = {"loss": loss, **comps, "grad_norm": trainable_grad_norm(grads, "stage1")}
    return _apply_grads(state, tx, grads), metrics

  return step


def make_stage1_epoch(model: CLIPReID, tx, batch_size: int) -> Callable:
  """A whole stage-1 epoch over the bank as one compiled loop.

  `(state, bank_features, bank_labels, perm) -> (state, mean metrics)`: batches are consecutive slices of
  `perm`, the last partial batch included (run at its own size, so its loss is exactly the official one)
  and no empty batch. The bank stays on the devices; nothing returns to the host inside the epoch.
  """
  step = make_stage1_step(model, tx)

  def epoch(state: TrainState, features, labels, perm):
    n = perm.shape[0]
    full, rest = divmod(n, batch_size)

    def body(state, i):
      idx = jax.lax.dynamic_slice_in_dim(perm, i * batch_size, batch_size)
      return step(state, {"feature": features[idx], "label": labels[idx]})

    state, metrics = jax.lax.scan(body, state, jnp.arange(full))
    metrics = jax.tree.map(lambda m: m.sum(0), metrics)
    if rest:
      idx = perm[full * batch_size:]
      state, last = step(state, {"feature": features[idx], "label": labels[idx]})
      metrics = jax.tree.map(jnp.add, metrics, last)
    return state, jax.tree.map(lambda m: m / (full + (1 if rest else 0)), metrics)

  return epoch


# --------------------------------------------------------------------------------------------------
# Stage 2 (and the baseline): the image side with ID + triplet (+ image-to-text) losses.


def stage2_loss_fn(model: CLIPReID, params, batch_stats, images, labels, cams, views, text_features,
                   weights: losses.LossWeights):
  out, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, cams, views, train=True,
                             mutable=["batch_stats"])
  logits = None if text_features is None else losses.i2t_logits(out["img_feature_proj"], text_features)
  total, comps = losses.stage2_loss((out["cls_score"], out["cls_score_proj"]),
                                    (out["img_feature_last"], out["img_feature"], out["img_feature_proj"]),
                                    labels, logits, weights)
  # The official training accuracy: of the image-to-text logits for CLIP-ReID, of the ID classifier for the baseline.
  scores = out["cls_score"] if logits is None else logits
  acc = jnp.mean((jnp.argmax(scores, -1) == labels).astype(jnp.float32))
  return total, ({**comps, "loss": total, "accuracy": acc}, updates["batch_stats"])


def make_stage2_step(model: CLIPReID, tx, weights: losses.LossWeights, *, augment_images: bool = True,
                     erase_prob: float = 0.5, flip_prob: float = 0.5, padding: int = 10) -> Callable:
  """One stage-2 step on a PK batch {'image': uint8 NHWC, 'pid', 'camid', 'viewid'}.

  Flip, pad-crop, normalisation and random erasing run here, on the device, from `rng`.
  """
  cfg = model.config

  def step(state: TrainState, batch, rng):
    if augment_images:
      images = augment(batch["image"], rng, mean=cfg.pixel_mean, std=cfg.pixel_std, flip_prob=flip_prob,
                       padding=padding, erase_prob=erase_prob)
    else:
      images = normalize(batch["image"], cfg.pixel_mean, cfg.pixel_std)
    cams = batch["camid"] if cfg.sie_camera else None
    views = batch["viewid"] if cfg.sie_view else None
    (_, (metrics, stats)), grads = jax.value_and_grad(
        lambda p: stage2_loss_fn(model, p, state.batch_stats, images, batch["pid"], cams, views,
                                 state.text_features, weights), has_aux=True)(state.params)
    # stage 2 and the baseline freeze the same leaves (the text side and the BN-neck biases)
    metrics = {**metrics, "grad_norm": trainable_grad_norm(grads, "stage2")}
    return _apply_grads(state, tx, grads, stats), metrics

  return step


# --------------------------------------------------------------------------------------------------
# The trainer's loop.


def loop_step(step: Callable, treedef, *, donate: bool = True, compiler_options: Optional[dict] = None) -> Callable:
  """`step(state, batch, rng)` compiled as the trainer's loop calls it: `leaves, metrics = fn(leaves, batch, rng)`.

  - Over the state's leaves: `leaves = jax.tree.leaves(state)`, and `jax.tree.unflatten(treedef, leaves)` is the
    state. Why: at every call jit flattens its arguments and rebuilds its outputs on the host. A train state has
    ~2,700 pytree nodes (optax's masks put a MaskedNode for every frozen leaf into each label's state); rebuilding
    them at every step fed Python's cyclic collector, whose rare full passes over the process's heap cost ~2 ms of
    host time per step on average. A list of the same arrays allocates nothing the collector tracks
    (benchmarks/dispatch_benchmark.py).
  - The step draws from `fold_in(rng, state.step)`, inside the compiled call: a function of the optimizer step only,
    so a resumed run draws the same, and no op is dispatched per step to derive it.
  """

  def fn(leaves, batch, rng):
    state = jax.tree.unflatten(treedef, leaves)
    state, metrics = step(state, batch, jax.random.fold_in(rng, state.step))
    leaves, out_def = jax.tree.flatten(state)
    if out_def != treedef:
      raise ValueError(f"the step changed the state's structure: {treedef} -> {out_def}")
    return leaves, metrics

  return jax.jit(fn, donate_argnums=0 if donate else (), compiler_options=compiler_options)


# A step's metrics added to the epoch's sums in one compiled call (jax.tree.map(jnp.add) would dispatch one op per
# metric, every step).
add_metrics = jax.jit(lambda sums, metrics: jax.tree.map(jnp.add, sums, metrics))


# --------------------------------------------------------------------------------------------------
# Inference.


def make_feature_fn(model: CLIPReID, kind: str, flip: bool = False) -> Callable:
  """`(variables, batch) -> features` for 'eval' (test feature) or 'stage1' (bank entry), on uint8 batches.

  `flip` ('eval' only): the mean of the features of each image and of its mirror image (left-right), the usual ReID
  test-time flip; not in the official code, off by default (`eval.flip`).
  'eval' computes in float32 whatever the model's compute dtype: the official evaluation runs without autocast (its
  stage-1 bank, like its training, under fp16 autocast), and eval mode, which loads float32, gives the same numbers.
  Its products are full float32 too: JAX's default would compute float32 matmuls and convolutions in TF32 on NVIDIA
  GPUs from Ampere on (one bfloat16 pass on TPU), where the official code (CUDA 10.2, before TF32) ran float32.
  """
  cfg = model.config
  if kind == "eval":
    model = model.clone(dtype=jnp.float32)

  def fn(variables, batch):
    images = normalize(batch["image"], cfg.pixel_mean, cfg.pixel_std)
    if kind == "stage1":
      return model.apply(variables, images, method=CLIPReID.stage1_feature)
    cams = batch["camid"] if cfg.sie_camera else None
    views = batch["viewid"] if cfg.sie_view else None
    # The precision is read when each product is traced, so every dot/conv traced here (under jit too) is HIGHEST.
    with jax.default_matmul_precision("float32"):
      feats = model.apply(variables, images, cams, views, method=CLIPReID.eval_feature)
      if flip:  # NHWC: axis 2 is the width
        feats = (feats + model.apply(variables, images[:, :, ::-1], cams, views, method=CLIPReID.eval_feature)) / 2
    return feats

  return fn


def text_features_all(model: CLIPReID, params, chunk: int = 64) -> jax.Array:
  """Text features of every identity, computed in chunks (the official stage-2 precompute)."""
  n = model.config.num_classes
  fn = jax.jit(lambda p, labels: model.apply({"params": p}, labels, method=CLIPReID.text_features))
  feats = [fn(params, jnp.arange(i, min(i + chunk, n))) for i in range(0, n, chunk)]
  return jnp.concatenate(feats, axis=0)
