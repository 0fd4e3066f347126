"""One official stage-1 and one stage-2 optimizer step, reproduced through our jitted train steps.

For every golden variant: losses and their components, gradients of every tracked parameter, and the
parameters after the step, at the golden README's tolerances (section 10).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipreid_jax import convert, losses, optim, steps
from golden_reid import close, converted_loader, meta, sie_inputs, variants

VARIANTS = [v for v in variants() if (v / "optim.npz").is_file()]
LOSS = dict(rtol=5e-5, atol=1e-6)
GRAD = dict(rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  return converted_loader(tmp_path_factory)


def _path(name: str, arr):
  collection, path, fn = convert.map_key(name, arr, {})
  assert collection == "params"
  return path, fn


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return np.asarray(tree)


def _is_key_bias(name, arr):
  """The k-part of an attention bias has an analytically zero gradient (softmax shift invariance)."""
  if name.endswith("attnpool.k_proj.bias"):
    return np.ones(arr.shape, bool)
  if name.endswith("attn.in_proj_bias"):
    d = arr.shape[0] // 3
    mask = np.zeros(arr.shape, bool)
    mask[d:2 * d] = True
    return mask
  return np.zeros(arr.shape, bool)


def _check_grad(name, got, ref):
  kmask = _is_key_bias(name, ref)
  if kmask.any():
    assert np.max(np.abs(got[kmask] - ref[kmask])) <= 1e-6, name  # README section 10: |got - ref| <= 1e-6
  ok, ratio = close(got[~kmask], ref[~kmask], **GRAD)
  assert ok, f"grad {name}: {ratio:.2f}x the tolerance"


def _check_step(name, before, after, ref_after, grad, wd, lr):
  """Golden rule: |update - ref_update| <= 0.1 lr + 1 ulp; where |grad + wd p| < 1e-7, up to 2 lr."""
  before = before.astype(np.float64)
  upd, ref_upd = after.astype(np.float64) - before, ref_after.astype(np.float64) - before
  ulp = np.spacing(np.abs(ref_after).astype(np.float32)).astype(np.float64)
  tiny = np.abs(grad.astype(np.float64) + wd * before) < 1e-7
  bound = np.where(tiny, 2 * lr, 0.1 * lr) + ulp
  bad = ~(np.abs(upd - ref_upd) <= bound)  # NaN is off too
  assert not bad.any(), f"{name}: {bad.sum()} elements off (max {np.max(np.abs(upd - ref_upd) / bound):.2f}x)"


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v.parent.name}/{v.name}")
def test_stage2_step(variant, converted):
  model, variables = converted(variant)
  m = meta(variant)
  inputs, outputs, opt = np.load(variant / "inputs.npz"), np.load(variant / "outputs.npz"), np.load(variant / "optim.npz")
  state_np = np.load(variant / "model_state.npz")
  cams, views = sie_inputs(variant, inputs)
  batch = {"image": inputs["images_uint8_nhwc"], "pid": inputs["labels"].astype(np.int32),
           "camid": inputs["cam_ids"].astype(np.int32), "viewid": inputs["view_ids"].astype(np.int32)}
  weights = losses.LossWeights.from_dict(m["loss_weights"])
  solver = optim.Stage2Solver.from_dict(m["stage2_optimizer"])
  tx = optim.stage2_optimizer(solver, steps_per_epoch=1)
  text = steps.text_features_all(model, variables["params"])
  state = steps.create_state(variables["params"], variables["batch_stats"], tx, text)
  step = jax.jit(steps.make_stage2_step(model, tx, weights, augment_images=False))
  new_state, metrics = step(state, batch, jax.random.PRNGKey(0))

  for ours, theirs in [("loss", "stage2_loss_total"), ("id_cls", "stage2_id_loss_cls"),
                       ("id_proj", "stage2_id_loss_cls_proj"), ("tri_last", "stage2_tri_loss_last"),
                       ("tri_feat", "stage2_tri_loss_feat"), ("tri_proj", "stage2_tri_loss_proj"),
                       ("i2t", "stage2_i2t_loss")]:
    ok, ratio = close(metrics[ours], outputs[theirs], **LOSS)
    assert ok, f"{ours}: {ratio:.2f}x the tolerance"
  # The logged accuracy is the official one: of the image-to-text logits (not of the ID classifier).
  official_acc = np.mean(np.argmax(outputs["stage2_i2t_logits"], -1) == batch["pid"])
  assert float(metrics["accuracy"]) == pytest.approx(official_acc), (float(metrics["accuracy"]), official_acc)

  # Gradients of the same loss function the step differentiates.
  images = steps.normalize(jnp.asarray(batch["image"]), model.config.pixel_mean, model.config.pixel_std)
  grads = jax.grad(lambda p: steps.stage2_loss_fn(model, p, variables["batch_stats"], images, batch["pid"],
                                                  cams, views, text, weights)[0])(variables["params"])
  lr_used = m["stage2_optimizer"]["lr_used_per_tracked_param"]
  checked = 0
  for key in opt.files:
    if not key.startswith("grad/"):
      continue
    name = key[len("grad/"):]
    path, fn = _path(name, opt[key])
    g = fn(opt[key])
    _check_grad(name, _get(grads, path), g)
    lr = lr_used.get(name, m["stage2_optimizer"]["base_lr"] * m["stage2_optimizer"]["lr_multiplier_epoch_1"]
                     * (m["stage2_optimizer"]["bias_lr_factor"] if "bias" in name else 1))
    wd = m["stage2_optimizer"]["weight_decay_bias" if "bias" in name else "weight_decay"]
    _check_step(name, fn(state_np[name]), _get(new_state.params, path), fn(opt[f"after_step/{name}"]), g, wd, lr)
    checked += 1
  assert checked
  # The logged gradient norm is over the trained leaves only: not the text side, the prompts or the BN-neck biases.
  trained = {k: v for k, v in grads.items() if k not in ("text_encoder", "prompt_learner")}
  sq = sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(trained))
  necks = [np.asarray(grads[neck]["bias"], np.float64) for neck in ("bottleneck", "bottleneck_proj")]
  assert all(np.any(g) for g in necks)  # non-zero, so leaving them out is visible
  sq -= sum(np.sum(np.square(g)) for g in necks)
  np.testing.assert_allclose(float(metrics["grad_norm"]), np.sqrt(sq), rtol=1e-4)
  # Frozen: the text side, the prompts and the BN-neck biases do not move.
  for frozen in [("bottleneck", "bias"), ("bottleneck_proj", "bias"), ("prompt_learner", "cls_ctx"),
                 ("text_encoder", "text_projection")]:
    np.testing.assert_array_equal(_get(new_state.params, frozen), _get(variables["params"], frozen))
  # BN running statistics advanced exactly once.
  for neck in ("bottleneck", "bottleneck_proj"):
    ok, _ = close(new_state.batch_stats[neck]["mean"], outputs[f"bn_after_train_forward/{neck}.running_mean"],
                  rtol=1e-5, atol=1e-7)
    assert ok


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v.parent.name}/{v.name}")
def test_stage1_step(variant, converted):
  model, variables = converted(variant)
  m = meta(variant)
  inputs, outputs, opt = np.load(variant / "inputs.npz"), np.load(variant / "outputs.npz"), np.load(variant / "optim.npz")
  state_np = np.load(variant / "model_state.npz")
  solver = optim.Stage1Solver.from_dict(m["stage1_optimizer"])
  tx = optim.stage1_optimizer(solver, steps_per_epoch=1)
  state = steps.create_state(variables["params"], variables["batch_stats"], tx)
  labels = inputs["labels"].astype(np.int32)
  # The bank entries: our own stage-1 features (the official bank is the same get_image_feature).
  feats = model.apply(variables, steps.normalize(jnp.asarray(inputs["images_uint8_nhwc"]), model.config.pixel_mean,
                                                 model.config.pixel_std), method=model.stage1_feature)
  ok, _ = close(feats, outputs["get_image_feature"], **LOSS)
  assert ok
  step = jax.jit(steps.make_stage1_step(model, tx))
  new_state, metrics = step(state, {"feature": outputs["get_image_feature"], "label": labels})
  for ours, theirs in [("loss", "stage1_loss"), ("i2t", "stage1_loss_i2t"), ("t2i", "stage1_loss_t2i")]:
    ok, ratio = close(metrics[ours], outputs[theirs], **LOSS)
    assert ok, f"{ours}: {ratio:.2f}x"
  grads = jax.grad(lambda p: steps.stage1_loss_fn(model, p, outputs["get_image_feature"], labels)[0])(variables["params"])
  name = "prompt_learner.cls_ctx"
  _check_grad(name, np.asarray(grads["prompt_learner"]["cls_ctx"]), opt[f"stage1_grad/{name}"])
  # The logged gradient norm is over the trained leaves only: in stage 1, the prompt tokens.
  np.testing.assert_allclose(float(metrics["grad_norm"]), np.linalg.norm(opt[f"stage1_grad/{name}"]), rtol=1e-4)
  _check_step(name, state_np[name], np.asarray(new_state.params["prompt_learner"]["cls_ctx"]),
              opt[f"stage1_after_step/{name}"], opt[f"stage1_grad/{name}"], m["stage1_optimizer"]["weight_decay"],
              float(opt["stage1_lr"]))
  # Everything else is frozen in stage 1.
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), new_state.params["image_encoder"],
                      variables["params"]["image_encoder"])
  assert all(jax.tree.leaves(same))


@pytest.mark.parametrize("n", [10, 8])
def test_stage1_epoch_is_its_steps_with_the_partial_last_batch(converted, n):
  """The compiled stage-1 epoch equals its batches run one by one, the last partial batch included at its own size
  (MSMT17's 32,621 images leave 45 over a batch of 64; the tiny runs' banks divide evenly)."""
  variant = VARIANTS[0]
  model, variables = converted(variant)
  solver = optim.Stage1Solver.from_dict(meta(variant)["stage1_optimizer"])
  tx = optim.stage1_optimizer(solver, steps_per_epoch=3)
  state = steps.create_state(variables["params"], variables["batch_stats"], tx)
  rng = np.random.default_rng(0)
  batch = 4
  feats = rng.standard_normal((n, model.config.clip.embed_dim)).astype(np.float32)
  labels = rng.integers(0, model.config.num_classes, n).astype(np.int32)
  perm = rng.permutation(n).astype(np.int32)
  epoch_state, epoch_metrics = jax.jit(steps.make_stage1_epoch(model, tx, batch))(state, feats, labels, perm)
  step = jax.jit(steps.make_stage1_step(model, tx))
  ref, seen = state, []
  for lo in range(0, n, batch):  # batches of 4, 4 and 2 (or 4 and 4: no empty batch)
    idx = perm[lo:lo + batch]
    ref, m = step(ref, {"feature": feats[idx], "label": labels[idx]})
    seen.append(m)
  assert len(seen) == -(-n // batch) and int(epoch_state.step) == len(seen)
  for k in epoch_metrics:
    np.testing.assert_allclose(epoch_metrics[k], np.mean([float(m[k]) for m in seen]), rtol=1e-5, err_msg=k)
  np.testing.assert_allclose(epoch_state.params["prompt_learner"]["cls_ctx"], ref.params["prompt_learner"]["cls_ctx"],
                             rtol=1e-5, atol=1e-7)


def test_stage2_step_augments_as_configured(converted):
  """The step's augmentation takes the configured probabilities and padding: flip 1 with no crop or erasing is
  the mirror image exactly; padding alone and erasing alone each change the loss."""
  variant = VARIANTS[0]
  model, variables = converted(variant)
  m = meta(variant)
  inputs = np.load(variant / "inputs.npz")
  batch = {"image": inputs["images_uint8_nhwc"], "pid": inputs["labels"].astype(np.int32),
           "camid": inputs["cam_ids"].astype(np.int32), "viewid": inputs["view_ids"].astype(np.int32)}
  weights = losses.LossWeights.from_dict(m["loss_weights"])
  tx = optim.stage2_optimizer(optim.Stage2Solver.from_dict(m["stage2_optimizer"]), steps_per_epoch=1)
  state = steps.create_state(variables["params"], variables["batch_stats"], tx,
                             steps.text_features_all(model, variables["params"]))

  def loss(batch, **augment):
    step = steps.make_stage2_step(model, tx, weights, **augment)
    return float(jax.jit(step)(state, batch, jax.random.PRNGKey(3))[1]["loss"])

  plain = loss(batch, augment_images=False)
  mirrored = loss(dict(batch, image=batch["image"][:, :, ::-1]), augment_images=False)
  np.testing.assert_allclose(loss(batch, flip_prob=1.0, padding=0, erase_prob=0.0), mirrored, rtol=1e-5)
  assert abs(mirrored - plain) > 1e-4  # the flip is visible in the loss
  assert abs(loss(batch, flip_prob=0.0, padding=10, erase_prob=0.0) - plain) > 1e-4
  assert abs(loss(batch, flip_prob=0.0, padding=0, erase_prob=1.0) - plain) > 1e-4
