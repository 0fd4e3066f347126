"""One stage-2 step as 2 processes x 2 CPU devices (jax.distributed, gloo) vs. one process.

Usage: multihost_check.py DATA_ROOT PORT PROCESS_ID NUM_PROCESSES OUT_JSON (NUM_PROCESSES 1: the reference).
Each process loads only its slice of the global batch (train_loader process_index/process_count).
"""
import json
import sys

import jax
import numpy as np

root, port, pid, nproc, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if nproc > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)

from clipreid_jax import optim, steps, train  # noqa: E402
from train_helpers import tiny_config  # noqa: E402

config = tiny_config(root)
dataset = train.load_dataset(config)
model, variables = train.build_model(config, dataset)
mesh = train.make_mesh()
loader = train.pipelines.train_loader(dataset.train, image_size=model.config.input_size, num_ids=4, num_instances=2,
                                      seed=0, epoch=1, process_index=jax.process_index(),
                                      process_count=jax.process_count())
batch = next(iter(loader))
local = {k: batch[k] for k in ("image", "pid", "camid", "viewid")}
tx = optim.stage2_optimizer(train.stage2_solver(config), steps_per_epoch=len(loader))
text = np.asarray(steps.text_features_all(model, variables["params"]))
state = train.replicate(mesh, steps.create_state(variables["params"], variables["batch_stats"], tx, text))
treedef = jax.tree.structure(state)  # the trainer's call form: over the state's leaves
step = steps.loop_step(steps.make_stage2_step(model, tx, train.loss_weights(config)), treedef)
leaves, metrics = step(jax.tree.leaves(state), train.to_global(mesh, local), jax.random.PRNGKey(3))
state = jax.tree.unflatten(treedef, leaves)
kernel = train.to_host(state.params["classifier"]["kernel"])
# The trainer's checkpoint round trip: every process saves (the write goes on in the background), waits, and
# restores the way a resumed run does.
run = train.Run(out + ".work", config)
run.save(1, state, {"stage": 2, "epoch": 1})
run.close()  # the workdir's lock goes with it: the restoring Run below takes it
like = steps.create_state(variables["params"], variables["batch_stats"], tx, text)
restored = train.Run(out + ".work", config)
assert restored.resume() == {"stage": 2, "epoch": 1}
restored_kernel = train.to_host(restored.restore_state(like, mesh).params["classifier"]["kernel"])
# Evaluation features over a mesh whose device order interleaves the hosts (process 1's first device second), as
# an accelerator topology may order them: each feature must still come back with its own record index.
local_rank = lambda d: [x for x in jax.devices() if x.process_index == d.process_index].index(d)
interleaved = train.Mesh(np.asarray(sorted(jax.devices(), key=lambda d: (local_rank(d), d.process_index))), ("data",))
eval_loader = train.pipelines.eval_loader(dataset.query, dataset.gallery, image_size=model.config.input_size,
                                          batch_size=8, process_index=jax.process_index(),
                                          process_count=jax.process_count())
feats, idx = train.extract_features(interleaved, jax.jit(steps.make_feature_fn(model, "eval")),
                                    train.replicate(interleaved, variables), eval_loader)
eval_features = feats[np.argsort(idx, kind="stable")]
result = {"restored_equal": bool(np.array_equal(restored_kernel, kernel)), "devices": jax.device_count(),
          "processes": jax.process_count(), "local_batch": int(local["image"].shape[0]),
          "loss": float(metrics["loss"]), "kernel_sum": float(np.sum(kernel, dtype=np.float64)),
          "kernel": kernel.tolist(), "eval_index": np.sort(idx).tolist(), "eval_features": eval_features.tolist()}
if jax.process_index() == 0:
  with open(out, "w") as f:
    json.dump(result, f)
