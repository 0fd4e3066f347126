"""A tiny end-to-end configuration (synthetic data, small random CLIP) for the trainer tests."""
import importlib.util
import pathlib

import ml_collections

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(data_root, backbone: str = "ViT-B-16"):
  spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.model.backbone = backbone
  c.dataset.root = str(data_root)
  c.dataset.num_train_ids = 8
  c.dataset.num_test_ids = 4
  c.dataset.imgs_per_id = 4
  c.dataset.num_cams = 3
  c.model.input_size = (64, 32)
  rn = backbone.startswith("RN")
  # A new ConfigDict: the demo's vision_layers is an int, which ml_collections will not turn into an RN's 4-tuple.
  c.model.random_clip = ml_collections.ConfigDict(dict(
      vision_layers=(1, 1, 1, 1) if rn else 1, vision_width=8 if rn else 64, embed_dim=32, text_width=64,
      text_layers=1))
  c.stage1.max_epochs = 2
  c.stage1.batch_size = 16
  c.stage1.checkpoint_every_epochs = 1  # exercise resuming inside stage 1
  c.stage2.num_ids = 4
  c.stage2.num_instances = 2
  c.stage2.max_epochs = 2
  c.stage2.steps = (2,)
  c.stage2.warmup_iters = 1
  c.eval.batch_size = 16
  c.log_every_steps = 2
  return c


def tiny_stage2_parts(config, dataset):
  """(model, variables, batch, tx, text features) of a tiny run's stage 2, built as the trainer builds them; the
  batch is the first PK batch of epoch 1 (4 identities x 2 images)."""
  from clipreid_jax import train  # pylint: disable=g-import-not-at-top  # config files load this module too
  model, variables = train.build_model(config, dataset)
  loader = train.pipelines.train_loader(dataset.train, image_size=model.config.input_size, num_ids=4,
                                        num_instances=2, seed=0, epoch=1)
  batch = next(iter(loader))
  batch = {k: batch[k] for k in ("image", "pid", "camid", "viewid")}
  tx = train.optim.stage2_optimizer(train.stage2_solver(config), steps_per_epoch=len(loader))
  return model, variables, batch, tx, train.steps.text_features_all(model, variables["params"])


def tensorboard_scalars(workdir) -> list[tuple[str, int, float]]:
  """Every TensorBoard scalar (tag, step, value) of the workdir's event files, wall-clock figures left out."""
  import struct  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  found = []
  for f in sorted((pathlib.Path(workdir) / "tensorboard").glob("events.out.tfevents.*")):
    data, at = f.read_bytes(), 0
    while at < len(data):  # TFRecord: length (8), its crc (4), the record, its crc (4)
      (n,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
      at += 16 + n
      found += [(v.tag, event.step, v.simple_value) for v in event.summary.value
                if not v.tag.endswith(("/time_s", "/images_per_s"))]
  return sorted(found)


# Python run before the CLI (`python -c SLOW_STEPS + CLI_MAIN ARGS`): each stage-2 batch 0.2 s late, so that a signal
# sent on seeing a logged step lands inside the epoch even when a busy test process reads the output seconds late (a
# whole tiny stage 2 takes under a second).
SLOW_STEPS = """
import time
from clipreid_jax.data import prefetch
_prefetch = prefetch.prefetch
def _slow(*args, **kwargs):
  for batch in _prefetch(*args, **kwargs):
    time.sleep(0.2)
    yield batch
prefetch.prefetch = _slow
"""

# The CLI as `python -m clipreid_jax.main` runs it.
CLI_MAIN = """
import sys
from absl import app
from clipreid_jax import main
app.run(lambda argv: sys.exit(main.main(argv)), flags_parser=main.parse_flags)
"""


def checkpoint_steps(workdir) -> list[int]:
  """The counters of the training checkpoints in `workdir`, oldest first."""
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def folder_state(folder) -> list[tuple]:
  """Every path below `folder` with its mtime and size: equal before and after means nothing was written there."""
  return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in pathlib.Path(folder).rglob("*"))
