"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 (by tests/test_multidevice.py).

Prints one JSON line: a stage-2 step on a mesh of 8 CPU devices against the same step on 1 device, and
a tiny end-to-end training run on all 8.
"""
import json
import sys
import tempfile

import jax
import numpy as np
from jax.sharding import Mesh

from clipreid_jax import steps, train
from train_helpers import tiny_config, tiny_stage2_parts


def main():
  assert jax.device_count() == 8, jax.devices()
  tmp = tempfile.mkdtemp()
  config = tiny_config(f"{tmp}/data")
  dataset = train.load_dataset(config)
  model, variables, batch, tx, text = tiny_stage2_parts(config, dataset)
  text = np.asarray(text)  # a host copy: the step donates its state
  results = {}
  for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
    mesh = Mesh(np.asarray(devices), ("data",))
    state = train.replicate(mesh, steps.create_state(variables["params"], variables["batch_stats"], tx, text))
    treedef = jax.tree.structure(state)  # the trainer's call form: over the state's leaves
    step = steps.loop_step(steps.make_stage2_step(model, tx, train.loss_weights(config)), treedef)
    g = train.to_global(mesh, batch)
    grad_fn = jax.jit(jax.grad(lambda p, s, b: steps.stage2_loss_fn(
        model, p, s, steps.normalize(b["image"], model.config.pixel_mean, model.config.pixel_std), b["pid"], None,
        None, text, train.loss_weights(config))[0]))
    grads = jax.device_get(grad_fn(state.params, state.batch_stats, g))
    leaves, metrics = step(jax.tree.leaves(state), g, jax.random.PRNGKey(3))
    state = jax.tree.unflatten(treedef, leaves)
    results[name] = (jax.device_get(state.params), jax.device_get(state.batch_stats),
                     {k: float(v) for k, v in metrics.items()}, len(g["image"].sharding.device_set), grads)
  p1, b1, m1, n1, g1 = results["one"]
  p8, b8, m8, n8, g8 = results["eight"]
  grad_rel = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-30))
                 for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)) if np.max(np.abs(a)) > 0)
  param_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
  stats_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(b1), jax.tree.leaves(b8)))
  loss_diff = max(abs(m1[k] - m8[k]) for k in m1)
  result = train.train_and_evaluate(config, f"{tmp}/work")
  print(json.dumps({"devices": [n1, n8], "loss_diff": loss_diff, "param_diff": param_diff, "stats_diff": stats_diff, "grad_rel": grad_rel,
                    "lr": float(config.stage2.base_lr), "final": result, "tmp": tmp}))


if __name__ == "__main__":
  sys.exit(main())
