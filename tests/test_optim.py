"""Optimizers vs one official Adam step (golden/vit/*, golden/rn50/*: optim.npz), plus freezing and lr rules."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clipreid_jax import optim
from conftest import golden_cases

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
BUFFERS = ("prompt_learner.token_prefix", "prompt_learner.token_suffix")


def flax_path(name: str, ndim: int) -> tuple[str, ...]:
  """Official torch parameter name -> Flax path of the lead's model (see clipreid_jax/optim.py docstring)."""
  parts = name.split(".")
  out = []
  i = 0
  while i < len(parts):
    if i + 1 < len(parts) and parts[i + 1].isdigit():  # resblocks.0 -> resblocks_0, layer1.0 -> layer1_0
      out.append(f"{parts[i]}_{parts[i + 1]}")
      i += 2
    else:
      out.append(parts[i])
      i += 1
  out = [{"downsample_0": "downsample_conv", "downsample_1": "downsample_bn"}.get(o, o) for o in out]
  if out[-1] in ("in_proj_weight", "in_proj_bias"):
    out[-1:] = ["in_proj", "kernel" if out[-1].endswith("weight") else "bias"]
  elif out[-1] == "weight":
    out[-1] = "kernel" if ndim >= 2 else "scale"  # Linear/Conv vs LayerNorm/BatchNorm
  return tuple(out)


def official_label(name: str, stage: str) -> str:
  """The official substring rules of make_optimizer_1stage / make_optimizer_2stage on a torch name."""
  if name in BUFFERS:  # torch buffers, never optimised; the Flax model keeps them in `params`
    return optim.FROZEN
  if stage == "stage1":
    return optim.TRAIN if "prompt_learner" in name else optim.FROZEN
  if "text_encoder" in name or "prompt_learner" in name or name in ("bottleneck.bias", "bottleneck_proj.bias"):
    return optim.FROZEN  # the BN-neck biases have requires_grad=False
  return optim.BIAS if "bias" in name else optim.TRAIN


def nest(flat: dict[tuple[str, ...], np.ndarray]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    assert path[-1] not in node, path
    node[path[-1]] = v
  return tree


def get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def load_variant(variant):
  """(meta, optim.npz, {official name: (flax path, torch-layout float32 array)}) for the Flax `params` leaves.

  BN running statistics are left out (they live in `batch_stats`); the prompt buffers are kept, as in the model.
  """
  meta = json.loads((variant / "meta.json").read_text())
  state = np.load(variant / "model_state.npz")
  params = {k: (flax_path(k, state[k].ndim), state[k].astype(np.float32)) for k in state.files
            if not k.endswith(BN_STATS)}
  return meta, np.load(variant / "optim.npz"), params


def _variants():
  return [pytest.param(p, id=f"{p.parent.name}/{p.name}") for backbone in ("vit", "rn50")
          for p in golden_cases(backbone) if (p / "optim.npz").is_file()]


@functools.partial(jax.jit, static_argnums=0)
def one_step(tx, params, grads):
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), updates


@functools.lru_cache(maxsize=None)
def stage2_tx(solver):
  """One transformation object per solver, so the jitted step compiles once per variant."""
  return optim.stage2_optimizer(solver, steps_per_epoch=4)


def assert_step_matches(name, before, after, ref_after, grad, lr, wd):
  """README section 10: compare updates in float64; atol 0.1 lr + 1 ulp, 2 lr where |grad + wd p| < 1e-7."""
  upd = after.astype(np.float64) - before.astype(np.float64)
  ref = ref_after.astype(np.float64) - before.astype(np.float64)
  tol = 0.1 * lr + np.spacing(np.abs(before).astype(np.float32)).astype(np.float64)
  total_grad = np.abs(grad.astype(np.float64) + wd * before.astype(np.float64))
  tol = np.where(total_grad < 1e-7, 2 * lr, tol)
  bad = ~(np.abs(upd - ref) <= tol)  # NaN is off too
  assert not bad.any(), (f"{name}: {bad.sum()} elements off, max |diff|/lr = {np.max(np.abs(upd - ref)) / lr:.3g}")


def random_grads(params, rng):
  return {k: (p, rng.normal(size=v.shape).astype(np.float32)) for k, (p, v) in params.items()}


@pytest.mark.parametrize("variant", _variants())
def test_labels_follow_official_name_rules(variant):
  _, _, params = load_variant(variant)
  tree = nest({p: v for p, v in params.values()})
  for stage in ("stage1", "stage2"):
    labels = optim.param_labels(tree, stage)
    for name, (path, _) in params.items():
      assert get(labels, path) == official_label(name, stage), (stage, name, path)
  # A leading 'params' collection key is accepted too.
  assert optim.param_labels({"params": tree}, "stage2")["params"]["bottleneck"]["bias"] == optim.FROZEN


@pytest.mark.parametrize("variant", _variants())
def test_stage2_one_step_matches_official(variant):
  meta, opt, params = load_variant(variant)
  solver = optim.Stage2Solver.from_dict(meta["stage2_optimizer"])
  lr_used = meta["stage2_optimizer"]["lr_used_per_tracked_param"]
  rng = np.random.default_rng(0)
  grads = random_grads(params, rng)
  for name in meta["tracked_params"]:
    grads[name] = (params[name][0], opt[f"grad/{name}"])
  tree = nest({p: v for p, v in params.values()})
  gtree = nest({p: g for p, g in grads.values()})
  after, updates = one_step(stage2_tx(solver), tree, gtree)

  for name in meta["tracked_params"]:
    path, before = params[name]
    is_bias = official_label(name, "stage2") == optim.BIAS
    lr = solver.schedule(optim.BIAS if is_bias else optim.TRAIN)(1)
    assert lr == pytest.approx(lr_used[name], rel=1e-12), name
    wd = solver.bias_weight_decay if is_bias else solver.weight_decay
    assert_step_matches(name, before, np.asarray(get(after, path)), opt[f"after_step/{name}"], grads[name][1], lr, wd)

  # Frozen leaves (text encoder, prompt learner, BN-neck biases) get exactly zero updates despite nonzero grads.
  for name, (path, _) in params.items():
    if official_label(name, "stage2") == optim.FROZEN:
      assert not np.any(np.asarray(get(updates, path))), name


@pytest.mark.parametrize("variant", _variants())
def test_stage2_lr_per_leaf(variant):
  """Probe the lr the optimizer applies: zero params (no decay) and unit grads give an update of -lr / (1 + eps).

  rtol 2e-5: optax forms the bias corrections 1 - b**t in float32 (0.999 is not exact there), which scales the
  first Adam step by 1 - 6.4e-6 relative to torch's float64 corrections.
  """
  meta, _, params = load_variant(variant)
  solver = optim.Stage2Solver.from_dict(meta["stage2_optimizer"])
  lr_used = meta["stage2_optimizer"]["lr_used_per_tracked_param"]
  zeros = nest({p: np.zeros_like(v) for p, v in params.values()})
  ones = nest({p: np.ones_like(v) for p, v in params.values()})
  _, updates = one_step(stage2_tx(solver), zeros, ones)
  base = solver.schedule()(1)
  for name, (path, _) in params.items():
    got = -np.asarray(get(updates, path), np.float64) * (1 + optim.ADAM_EPS)
    label = official_label(name, "stage2")
    want = {optim.FROZEN: 0.0, optim.TRAIN: base, optim.BIAS: base * solver.bias_lr_factor}[label]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=0, err_msg=name)
    if name in lr_used:
      np.testing.assert_allclose(got, lr_used[name], rtol=2e-5, atol=0, err_msg=name)
  # The schedules the groups use give exactly the official lr (rounded once to float32).
  lrs = optim.stage2_lr_schedules(solver, 4)
  for name, lr in lr_used.items():
    label = official_label(name, "stage2")
    assert float(lrs[label](0)) == np.float32(lr) and float(lrs[label](3)) == np.float32(lr), name


@pytest.mark.parametrize("variant", _variants())
def test_stage1_one_step_matches_official(variant):
  meta, opt, params = load_variant(variant)
  solver = optim.Stage1Solver.from_dict(meta["stage1_optimizer"])
  lr = solver.schedule()(1)
  assert lr == pytest.approx(float(opt["stage1_lr"]), rel=1e-12)
  assert lr == pytest.approx(meta["stage1_optimizer"]["lr_at_epoch_1"], rel=1e-12)
  grads = random_grads(params, np.random.default_rng(1))
  names = [k.split("/", 1)[1] for k in opt.files if k.startswith("stage1_grad/")]
  assert names
  for name in names:
    grads[name] = (params[name][0], opt[f"stage1_grad/{name}"])
  tree = nest({p: v for p, v in params.values()})
  gtree = nest({p: g for p, g in grads.values()})
  after, updates = one_step(optim.stage1_optimizer(solver, 3), tree, gtree)
  for name in names:
    path, before = params[name]
    assert_step_matches(name, before, np.asarray(get(after, path)), opt[f"stage1_after_step/{name}"],
                        grads[name][1], lr, solver.weight_decay)
  for name, (path, _) in params.items():
    if official_label(name, "stage1") == optim.FROZEN:
      assert not np.any(np.asarray(get(updates, path))), name


def test_schedule_wiring_over_steps():
  """SGD without momentum/decay exposes -lr(step): the lr changes exactly at epoch boundaries, bias lr is 2x."""
  solver = optim.Stage2Solver(base_lr=1.0, weight_decay=0.0, steps=(2,), warmup_factor=0.5, warmup_iters=2,
                              optimizer_name="SGD", momentum=0.0)
  params = {"classifier": {"kernel": jnp.zeros(3)}, "image_encoder": {"ln_pre": {"bias": jnp.zeros(2)}},
            "bottleneck": {"bias": jnp.zeros(2), "scale": jnp.zeros(2)}}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optim.stage2_optimizer(solver, steps_per_epoch=2)
  state = tx.init(params)
  seen = []
  for _ in range(6):
    upd, state = tx.update(grads, state, params)
    seen.append((-float(upd["classifier"]["kernel"][0]), -float(upd["image_encoder"]["ln_pre"]["bias"][0]),
                 float(upd["bottleneck"]["bias"][0])))
  want = [solver.schedule()(e) for e in (1, 1, 2, 2, 3, 3)]
  np.testing.assert_allclose([s[0] for s in seen], want, rtol=1e-7)
  np.testing.assert_allclose([s[1] for s in seen], [2 * w for w in want], rtol=1e-7)
  assert all(s[2] == 0.0 for s in seen)


@pytest.mark.parametrize("name", ["Adam", "SGD", "AdamW"])
def test_base_optimizers_match_torch(name):
  """Three steps of torch.optim.<name>(weight_decay=wd) at a fixed lr vs the optax chain."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(2)
  p0 = rng.normal(size=(5, 4)).astype(np.float32)
  gs = [rng.normal(size=(5, 4)).astype(np.float32) for _ in range(3)]
  lr, wd = 1e-2, 5e-2
  tp = torch.nn.Parameter(torch.tensor(p0))
  kw = {"momentum": 0.9} if name == "SGD" else {}
  topt = getattr(torch.optim, name)([tp], lr=lr, weight_decay=wd, **kw)
  tx = optim._base_optimizer(name, lr, wd, 0.9)  # pylint: disable=protected-access
  p = jnp.asarray(p0)
  state = tx.init(p)
  for g in gs:
    tp.grad = torch.tensor(g)
    topt.step()
    upd, state = tx.update(jnp.asarray(g), state, p)
    p = optax.apply_updates(p, upd)
  np.testing.assert_allclose(np.asarray(p), tp.detach().numpy(), rtol=0, atol=1e-6)


def test_solver_from_yml_keys():
  s2 = optim.Stage2Solver.from_dict({"IMS_PER_BATCH": 64, "OPTIMIZER_NAME": "Adam", "BASE_LR": 5e-6,
                                     "WARMUP_METHOD": "linear", "WARMUP_ITERS": 10, "WARMUP_FACTOR": 0.1,
                                     "WEIGHT_DECAY": 1e-4, "WEIGHT_DECAY_BIAS": 1e-4, "LARGE_FC_LR": False,
                                     "MAX_EPOCHS": 60, "BIAS_LR_FACTOR": 2, "STEPS": [30, 50], "GAMMA": 0.1})
  assert s2.steps == (30, 50) and s2.schedule()(1) == pytest.approx(9.5e-7, rel=1e-12)
  s1 = optim.Stage1Solver.from_dict({"BASE_LR": 3.5e-4, "WARMUP_LR_INIT": 1e-5, "LR_MIN": 1e-6, "WEIGHT_DECAY": 1e-4,
                                     "MAX_EPOCHS": 60, "WARMUP_EPOCHS": 5})
  assert s1.schedule()(60) == 1e-6
  with pytest.raises(NotImplementedError):
    optim.Stage2Solver.from_dict({"BASE_LR": 1.0, "WEIGHT_DECAY": 0.0, "STEPS": [1], "WARMUP_FACTOR": 1.0,
                                  "LARGE_FC_LR": True})


@pytest.mark.parametrize("wd, wd_bias", [(0.0, 0.5), (0.5, 0.0)])
def test_weight_decay_bias_applies_to_bias_leaves_only(wd, wd_bias):
  # SGD without momentum, zero gradients, params 1: a leaf moves by lr * its group's decay only. Biases use
  # WEIGHT_DECAY_BIAS at lr x BIAS_LR_FACTOR; kernels WEIGHT_DECAY at BASE_LR (make_optimizer_2stage).
  solver = optim.Stage2Solver(base_lr=0.1, weight_decay=wd, weight_decay_bias=wd_bias, steps=(30,),
                              warmup_factor=1.0, bias_lr_factor=2.0, optimizer_name="SGD", momentum=0.0)
  params = {"image_encoder": {"proj": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}}
  grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  after, _ = one_step(optim.stage2_optimizer(solver, steps_per_epoch=4), params, grads)
  np.testing.assert_allclose(after["image_encoder"]["proj"]["kernel"], 1 - 0.1 * wd, rtol=1e-6)
  np.testing.assert_allclose(after["image_encoder"]["proj"]["bias"], 1 - 0.2 * wd_bias, rtol=1e-6)
  assert optim.Stage2Solver(base_lr=0.1, weight_decay=0.3, steps=(1,), warmup_factor=1.0).bias_weight_decay == 0.3
