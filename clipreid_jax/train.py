"""The trainer: stage 1 (prompt tokens), stage 2 (image encoder), evaluation, checkpoints.

One readable loop in the style of big_vision: the host feeds global batches to jitted pure steps over a
`Mesh` of all devices (batch sharded on 'data', parameters replicated, state donated), metrics are
fetched only every `log_every_steps`, and orbax checkpoints at epoch ends (and on SIGTERM) make a
restarted run with the same --workdir continue where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import signal
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clipreid_jax import checkpoints, losses, optim, steps
from clipreid_jax.data import pipelines
from clipreid_jax.models import clipreid
from clipreid_jax.models.clip import CLIP, CLIPConfig, load_clip

log = logging.getLogger("clipreid_jax")


class ConfigError(ValueError):
  """A configuration value that cannot be used; the message names the key."""


# --------------------------------------------------------------------------------------------------
# Devices.


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("data",))


def compute_dtype(name: str):
  if name == "auto":
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def to_global(mesh: Mesh, local: dict) -> dict:
  """This host's slice of a batch -> one global array per field, sharded over 'data'."""
  sharding = NamedSharding(mesh, P("data"))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def replicate(mesh: Mesh, tree):
  return jax.device_put(tree, NamedSharding(mesh, P()))


def to_host(x) -> np.ndarray:
  """A (possibly multi-host) global array as a numpy array on every host."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


# --------------------------------------------------------------------------------------------------
# Data.


def load_dataset(config):
  from clipreid_jax.data import get_dataset
  ds = config.dataset
  if ds.name == "synthetic":
    from clipreid_jax.data.synthetic import write_synthetic_market
    if jax.process_index() == 0:
      write_synthetic_market(ds.root, num_train_ids=ds.num_train_ids, num_test_ids=ds.num_test_ids,
                             imgs_per_id=ds.imgs_per_id, num_cams=ds.num_cams, seed=ds.seed)
    multihost_utils.sync_global_devices("synthetic data written")
    return get_dataset("market1501", ds.root, check_counts=False)
  from clipreid_jax.data.registry import canonical_name
  name = canonical_name(ds.name)
  opts = {"check_counts": ds.check_counts}
  if name == "vehicleid":
    opts.update(test_size=ds.test_size, gallery_seed=ds.gallery_seed)
  if name == "veri" and ds.keypoint_dir:
    opts["keypoint_dir"] = ds.keypoint_dir
  return get_dataset(name, ds.root, **opts)


def check_batch(name: str, global_batch: int) -> None:
  n = jax.device_count()
  if global_batch <= 0:
    raise ConfigError(f"{name}: expected a positive batch size, got {global_batch}")
  if global_batch % n:
    raise ConfigError(f"{name}: batch {global_batch} is not divisible by the {n} devices")


# --------------------------------------------------------------------------------------------------
# Model.


def build_model(config, dataset) -> tuple[clipreid.CLIPReID, dict]:
  """CLIP-ReID initialised from a converted CLIP directory, or from a random CLIP (demo, tests)."""
  m = config.model
  dtype = compute_dtype(m.dtype)
  if config.init.clip:
    clip_model, clip_vars = load_clip(config.init.clip)
    clip_cfg = clip_model.config
    expected = "ViT" if m.backbone.startswith("ViT") else "RN"
    if clip_cfg.is_vit != (expected == "ViT"):
      raise ConfigError(f"init.clip: {config.init.clip} holds a {'ViT' if clip_cfg.is_vit else 'ResNet'} CLIP, "
                        f"but model.backbone is {m.backbone!r}")
  elif m.get("random_clip"):
    rc = m.random_clip
    vit = m.backbone.startswith("ViT")
    clip_cfg = CLIPConfig(embed_dim=rc.embed_dim, vision_layers=rc.vision_layers if vit else tuple(rc.vision_layers),
                          vision_width=rc.vision_width, text_width=rc.text_width, text_heads=max(1, rc.text_width // 64),
                          text_layers=rc.text_layers, vision_grid=(4, 4) if vit else (2, 2))
    h, w = clip_cfg.input_size()
    clip_vars = CLIP(clip_cfg).init(jax.random.PRNGKey(config.seed + 1), jnp.zeros((1, h, w, 3)),
                                    jnp.zeros((1, 4), jnp.int32))
    clip_vars = jax.tree.map(np.asarray, clip_vars)
  else:
    raise ConfigError("init.clip: expected a converted CLIP directory (python -m clipreid_jax.convert clip ...)")
  return clipreid.from_clip(
      clip_cfg, clip_vars, num_classes=dataset.num_train_pids, input_size=tuple(m.input_size), stride=m.stride,
      sie_camera=m.sie_camera, sie_view=m.sie_view, camera_num=max(dataset.num_train_cams, 1),
      view_num=max(dataset.num_train_views, 1), sie_coe=m.sie_coe, dataset=config.dataset.name,
      with_text=not m.baseline, rng=jax.random.PRNGKey(config.seed), dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Run bookkeeping: metrics.jsonl, checkpoints, pre-emption.


class Run:
  """The workdir: checkpoints/ (orbax), metrics.jsonl, config.json, stage1/ and model/ directories."""

  def __init__(self, workdir: str, config):
    import orbax.checkpoint as ocp
    self.dir = pathlib.Path(workdir).resolve()
    self.dir.mkdir(parents=True, exist_ok=True)
    self._check_config(config)
    self.manager = ocp.CheckpointManager(
        self.dir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False))
    self.preempted = False
    try:
      signal.signal(signal.SIGTERM, self._on_sigterm)
    except ValueError:  # not the main thread
      pass

  def _on_sigterm(self, *_):
    log.warning("SIGTERM: saving a checkpoint at the next step boundary, then exiting")
    self.preempted = True

  def _check_config(self, config) -> None:
    """A workdir belongs to one training configuration; another one must not overwrite or resume it."""
    mine = {k: config[k].to_dict() if hasattr(config[k], "to_dict") else config[k]
            for k in ("dataset", "model", "stage1", "stage2", "loss", "seed")}
    f = self.dir / "config.json"
    if f.is_file():
      theirs = json.loads(f.read_text())
      diff = sorted(k for k in mine if json.dumps(mine[k], sort_keys=True, default=str)
                    != json.dumps(theirs.get(k), sort_keys=True, default=str))
      if diff:
        raise ConfigError(f"{f}: the workdir holds a run of another configuration (differs in {', '.join(diff)}); "
                          "use a new --workdir")
    elif jax.process_index() == 0:
      f.write_text(json.dumps(mine, indent=1, sort_keys=True, default=str) + "\n")

  def log_metrics(self, record: dict) -> None:
    if jax.process_index() == 0:
      with open(self.dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")

  def save(self, counter: int, state, meta: dict, force: bool = False) -> None:
    import orbax.checkpoint as ocp
    self.manager.save(counter, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=force)
    self.manager.wait_until_finished()

  def latest_meta(self) -> Optional[dict]:
    import orbax.checkpoint as ocp
    step = self.manager.latest_step()
    if step is None:
      return None
    return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def restore_state(self, abstract_state):
    import orbax.checkpoint as ocp
    step = self.manager.latest_step()
    return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]


# --------------------------------------------------------------------------------------------------
# Feature extraction over a loader (stage-1 bank, evaluation).


def extract_features(mesh, model, variables, loader, kind: str) -> tuple[np.ndarray, np.ndarray]:
  """Features of every valid plan entry, in plan order: (features, record indices)."""
  fn = jax.jit(steps.make_feature_fn(model, kind))
  feats, index, mask = [], [], []
  for batch in iter(loader):
    g = to_global(mesh, {k: batch[k] for k in ("image", "camid", "viewid")})
    feats.append(fn(variables, g))
    index.append(batch["index"])
    mask.append(batch["mask"])
  feats = np.concatenate([to_host(f) for f in feats])
  idx = np.asarray(loader.plan).reshape(-1)
  valid = np.asarray(loader.mask).reshape(-1)
  return feats[valid], idx[valid]


# --------------------------------------------------------------------------------------------------
# Stages.


def stage1_solver(config) -> optim.Stage1Solver:
  s = config.stage1
  return optim.Stage1Solver(base_lr=s.base_lr, weight_decay=s.weight_decay, max_epochs=s.max_epochs,
                            warmup_lr_init=s.warmup_lr_init, lr_min=s.lr_min, warmup_epochs=s.warmup_epochs)


def stage2_solver(config) -> optim.Stage2Solver:
  s = config.stage2
  return optim.Stage2Solver(base_lr=s.base_lr, weight_decay=s.weight_decay, steps=tuple(s.steps),
                            warmup_factor=s.warmup_factor, weight_decay_bias=s.weight_decay_bias,
                            bias_lr_factor=s.bias_lr_factor, warmup_iters=s.warmup_iters,
                            warmup_method=s.warmup_method, gamma=s.gamma, max_epochs=s.max_epochs)


def loss_weights(config) -> losses.LossWeights:
  lw = config.loss
  default = losses.LossWeights.for_config(config.model.backbone)
  return losses.LossWeights(id=default.id if lw.id_weight is None else lw.id_weight, triplet=lw.triplet_weight,
                            i2t=lw.i2t_weight, label_smoothing=lw.label_smoothing, margin=lw.margin)


def run_stage1(config, run: Run, mesh, model, variables, dataset, meta: dict) -> dict:
  """Prompt learning on the cached image-feature bank. Returns the updated parameters."""
  s = config.stage1
  n = len(dataset.train)
  steps_per_epoch = -(-n // s.batch_size)
  tx = optim.stage1_optimizer(stage1_solver(config), steps_per_epoch)
  t0 = time.time()
  check_batch("eval.batch_size", config.eval.batch_size)
  loader = pipelines.stage1_loader(dataset.train, image_size=model.config.input_size, batch_size=config.eval.batch_size,
                                   process_index=jax.process_index(), process_count=jax.process_count())
  feats, idx = extract_features(mesh, model, variables, loader, "stage1")
  labels = np.asarray(dataset.train.pids)[idx].astype(np.int32)
  bank = replicate(mesh, {"feature": jnp.asarray(feats), "label": jnp.asarray(labels)})
  log.info("stage 1: feature bank of %d images in %.1fs", n, time.time() - t0)

  state = steps.create_state(variables["params"], variables["batch_stats"], tx)
  start = 1
  if meta.get("stage") == 1:
    state = run.restore_state(jax.eval_shape(lambda: state))
    start = meta["epoch"] + 1
  state = replicate(mesh, state)
  epoch_fn = jax.jit(steps.make_stage1_epoch(model, tx, s.batch_size), donate_argnums=0)
  key = jax.random.PRNGKey(config.seed)
  lr = stage1_solver(config).schedule()
  for epoch in range(start, s.max_epochs + 1):
    t = time.time()
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), n)
    state, metrics = epoch_fn(state, bank["feature"], bank["label"], perm)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    run.log_metrics({"stage": 1, "epoch": epoch, "lr": float(lr(epoch)), "time_s": time.time() - t, **metrics})
    if epoch % s.log_every_epochs == 0 or epoch == s.max_epochs:
      log.info("stage 1 epoch %d/%d: loss %.4f lr %.2e", epoch, s.max_epochs, metrics["loss"], lr(epoch))
    if epoch % config.checkpoint_every_epochs == 0 or epoch == s.max_epochs or run.preempted:
      run.save(epoch, state, {"stage": 1, "epoch": epoch})
    if run.preempted:
      raise SystemExit(143)
  params = jax.device_get(state.params)
  return {"params": params, "batch_stats": variables["batch_stats"]}


def run_stage2(config, run: Run, mesh, model, variables, dataset, meta: dict, evaluate_fn) -> dict:
  """The image side with ID + triplet (+ i2t) losses on PK batches. Returns the final variables."""
  s = config.stage2
  global_batch = s.num_ids * s.num_instances
  check_batch("stage2.num_ids * stage2.num_instances", global_batch)
  probe = pipelines.train_loader(dataset.train, image_size=model.config.input_size, num_ids=s.num_ids,
                                 num_instances=s.num_instances, seed=config.seed, epoch=1)
  steps_per_epoch = len(probe)
  baseline = not model.config.with_text
  solver = stage2_solver(config)
  tx = (optim.baseline_optimizer if baseline else optim.stage2_optimizer)(solver, steps_per_epoch)
  text = None if baseline else steps.text_features_all(model, variables["params"])
  state = steps.create_state(variables["params"], variables["batch_stats"], tx, text)
  # Checkpoint counters grow through both stages: stage-1 epochs first, then stage-2 steps.
  offset = config.stage1.max_epochs if not baseline else 0
  start, resume_at, resume_sums = 1, None, None
  if meta.get("stage") == 2:
    state = run.restore_state(jax.eval_shape(lambda: state))
    start = meta["epoch"] + 1
    if meta.get("iterator") is not None:  # stopped mid-epoch (pre-emption): continue that epoch
      resume_at, resume_sums = meta["iterator"], meta.get("sums")
  state = replicate(mesh, state)
  a = config.augment
  step = jax.jit(steps.make_stage2_step(model, tx, loss_weights(config), erase_prob=a.erase_prob,
                                        flip_prob=a.flip_prob, padding=a.padding), donate_argnums=0)
  key = jax.random.PRNGKey(config.seed + 2)
  lr = solver.schedule()
  counter = lambda: offset + 1 + int(jax.device_get(state.step))
  for epoch in range(start, s.max_epochs + 1):
    t = time.time()
    loader = pipelines.train_loader(dataset.train, image_size=model.config.input_size, num_ids=s.num_ids,
                                    num_instances=s.num_instances, seed=config.seed, epoch=epoch,
                                    process_index=jax.process_index(), process_count=jax.process_count(),
                                    worker_count=config.data_workers)
    it = iter(loader)
    sums, count = None, 0
    if resume_at is not None:
      it.set_state(resume_at)
      count = int(resume_at["next_index"])
      sums = None if resume_sums is None else {k: jnp.asarray(v, jnp.float32) for k, v in resume_sums.items()}
      resume_at = None
    for batch in it:
      g = to_global(mesh, {k: batch[k] for k in ("image", "pid", "camid", "viewid")})
      # The step's randomness is a function of the global step only, so a resumed run draws the same.
      state, metrics = step(state, g, jax.random.fold_in(key, int(count + (epoch - 1) * steps_per_epoch)))
      sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
      count += 1
      if count % config.log_every_steps == 0:
        m = {k: float(v) / count for k, v in jax.device_get(sums).items()}
        if not all(np.isfinite(list(m.values()))):
          raise FloatingPointError(f"stage 2 epoch {epoch} step {count}: non-finite loss {m}")
        log.info("stage 2 epoch %d step %d/%d: loss %.4f", epoch, count, steps_per_epoch, m["loss"])
      if run.preempted and count < steps_per_epoch:
        run.save(counter(), state, {"stage": 2, "epoch": epoch - 1, "iterator": it.get_state(),
                                    "sums": {k: float(v) for k, v in jax.device_get(sums).items()}})
        log.warning("pre-empted: saved stage 2 epoch %d at step %d", epoch, count)
        raise SystemExit(143)
    m = {k: float(v) / max(count, 1) for k, v in jax.device_get(sums).items()}
    if not all(np.isfinite(list(m.values()))):
      raise FloatingPointError(f"stage 2 epoch {epoch}: non-finite loss {m}; the last good checkpoint is kept")
    record = {"stage": 2, "epoch": epoch, "lr": float(lr(epoch)), "time_s": time.time() - t, **m}
    log.info("stage 2 epoch %d/%d: loss %.4f acc %.3f lr %.2e (%.1fs)", epoch, s.max_epochs, m["loss"],
             m["accuracy"], lr(epoch), time.time() - t)
    if config.eval.period and epoch % config.eval.period == 0 and epoch != s.max_epochs:
      res = evaluate_fn({"params": state.params, "batch_stats": state.batch_stats})
      record.update({f"eval_{k}": v for k, v in res.items()})
    run.log_metrics(record)
    if epoch % config.checkpoint_every_epochs == 0 or epoch == s.max_epochs or run.preempted:
      run.save(counter(), state, {"stage": 2, "epoch": epoch})
    if run.preempted:
      raise SystemExit(143)
  return {"params": jax.device_get(state.params), "batch_stats": jax.device_get(state.batch_stats)}


# --------------------------------------------------------------------------------------------------
# Evaluation.


def evaluate_model(config, mesh, model, variables, dataset) -> dict:
  """mAP / CMC (and mINP) of `variables` on the dataset's query and gallery, official protocol."""
  from clipreid_jax import evaluation
  check_batch("eval.batch_size", config.eval.batch_size)
  loader = pipelines.eval_loader(dataset.query, dataset.gallery, image_size=model.config.input_size,
                                 batch_size=config.eval.batch_size, process_index=jax.process_index(),
                                 process_count=jax.process_count(), worker_count=config.data_workers)
  feats, idx = extract_features(mesh, model, variables, loader, "eval")
  order = np.argsort(idx, kind="stable")
  feats = feats[order]
  nq = len(dataset.query)
  q, g = dataset.query, dataset.gallery
  if dataset.name == "vehicleid":
    # VehicleID: 10 seeded draws of a one-image-per-identity gallery over all test images; mean (and std).
    trials = evaluation.vehicleid_trials(feats, np.concatenate([q.pids, g.pids]), num_trials=config.eval.trials,
                                         seed=config.seed)
    ms = trials.mean_std()
    return {"mAP": ms["mAP"][0], "R1": ms["r1"][0], "R5": ms["r5"][0], "R10": float("nan"),
            "mAP_std": ms["mAP"][1], "R1_std": ms["r1"][1], "R5_std": ms["r5"][1], "trials": int(config.eval.trials)}
  if config.eval.rerank:
    res = evaluation.evaluate_reranked(feats[:nq], feats[nq:], q.pids, g.pids, q.camids, g.camids,
                                       k1=config.eval.k1, k2=config.eval.k2, lambda_value=config.eval.lambda_value)
  else:
    res = evaluation.evaluate(feats[:nq], feats[nq:], q.pids, g.pids, q.camids, g.camids)
  return {"mAP": float(res.mAP), "mINP": float(res.mINP), "R1": res.rank(1), "R5": res.rank(5), "R10": res.rank(10),
          "num_valid_queries": int(res.num_valid_queries)}


def format_metrics(m: dict) -> str:
  parts = [f"{k} {100 * m[k]:.1f}" + (f" ± {100 * m[k + '_std']:.1f}" if k + "_std" in m else "")
           for k in ("mAP", "R1", "R5", "R10") if np.isfinite(m.get(k, float("nan")))]
  return "  ".join(parts)


# --------------------------------------------------------------------------------------------------
# Entry.


def train_and_evaluate(config, workdir: str) -> dict:
  dataset = load_dataset(config)
  mesh = make_mesh()
  run = Run(workdir, config)
  model, variables = build_model(config, dataset)
  log.info("model %s, %d identities, input %s, grid %s, SIE %s/%s, %d devices", model.config.backbone,
           model.config.num_classes, model.config.input_size, model.config.clip.vision_grid, model.config.sie_camera,
           model.config.sie_view, jax.device_count())
  meta = run.latest_meta() or {}
  stage1_dir = run.dir / "stage1"
  if model.config.with_text and meta.get("stage", 1) == 1:
    if stage1_dir.is_dir():
      _, variables = clipreid.load_clipreid(stage1_dir)
    else:
      variables = run_stage1(config, run, mesh, model, variables, dataset, meta)
      if jax.process_index() == 0:
        checkpoints.save_model_dir(stage1_dir, variables, {"kind": "clipreid", "reid": model.config.to_dict()})
      meta = {}
  elif model.config.with_text and stage1_dir.is_dir():
    _, variables = clipreid.load_clipreid(stage1_dir)  # stage 2 resumes from its own checkpoint below
  evaluate_fn = lambda v: evaluate_model(config, mesh, model, v, dataset)
  variables = run_stage2(config, run, mesh, model, variables, dataset, meta, evaluate_fn)
  if jax.process_index() == 0:
    checkpoints.save_model_dir(run.dir / "model", variables, {"kind": "clipreid", "reid": model.config.to_dict()},
                               overwrite=True)
  result = evaluate_fn(variables)
  if jax.process_index() == 0:
    (run.dir / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
  run.log_metrics({"final": True, **result})
  print(f"final: {format_metrics(result)}", flush=True)
  return result
