"""The trainer end to end on synthetic data: stage 1, stage 2, evaluation, model directory, modes, resume."""
import copy
import dataclasses
import errno
import gc
import json
import logging
import os
import pathlib
import re
import shutil
import signal

import chex
import jax
import ml_collections
import numpy as np
import pytest

from clipreid_jax import config_defaults, convert, inference, train, workdir
from clipreid_jax.checkpoints import CheckpointError
from clipreid_jax.models.clipreid import load_clipreid
from conftest import golden_root
from train_helpers import checkpoint_steps, folder_state, tensorboard_scalars, tiny_config, tiny_stage2_parts


def _variables(path):
  _, v = load_clipreid(path)
  return jax.tree.map(np.asarray, v)


def _records(workdir):
  """metrics.jsonl without the wall-clock figures."""
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in json.loads(l).items() if k not in ("time_s", "images_per_s")} for l in lines]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  root = tmp_path_factory.mktemp("run")
  config = tiny_config(root / "data")
  config.eval.period = 1  # an evaluation after stage-2 epoch 1 (not after the last: the final one is that)
  result = train.train_and_evaluate(config, str(root / "work"))
  return config, root, result


def test_end_to_end_outputs(finished):
  config, root, result = finished
  work = root / "work"
  assert set(result) >= {"mAP", "R1", "R5", "R10", "mINP"} and 0 < result["mAP"] <= 1
  records = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  stage1 = [r["epoch"] for r in records if r.get("stage") == 1]
  stage2 = [r["epoch"] for r in records if r.get("stage") == 2]
  assert stage1 == list(range(1, config.stage1.max_epochs + 1))
  assert stage2 == list(range(1, config.stage2.max_epochs + 1))
  assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
  assert {"i2t", "t2i"} <= set(records[0]) and {"id_cls", "tri_proj", "i2t", "accuracy"} <= set(records[-2])
  summary = json.loads((work / "metrics.json").read_text())
  assert summary["final"] == train.percent(result)
  assert all(v == round(v, 4) for v in summary["final"].values())  # no float32 tail (20.000000298023224)
  # What the numbers are of, as eval mode records it: a rerun with other eval settings evaluates again.
  assert summary["evaluated"] == {"checkpoint": str((work / "model").resolve()), "dataset": "synthetic",
                                  "data": str(pathlib.Path(config.dataset.root).resolve()), "flip": False,
                                  "rerank": False}
  assert config.eval.untrained and summary["untrained"]["mAP"] > 0  # the demo's settings evaluate both
  assert all("images_per_s" in r and r["images_per_s"] > 0 for r in records if r.get("stage") == 2)
  periodic = [r["epoch"] for r in records if r.get("stage") == 2 and 0 < r.get("eval_mAP", -1) <= 1]
  assert periodic == [1] and records[-1]["mAP"] == result["mAP"]  # eval.period 1; the last epoch's is the final
  events = b"".join(p.read_bytes() for p in (work / "tensorboard").glob("events.out.tfevents.*"))
  for tag in (b"stage1/loss", b"stage2/loss", b"stage2/tri_proj", b"stage2/lr", b"final/mAP"):
    assert tag in events, tag
  last = config.stage2.max_epochs
  scalars = {(tag, step): value for tag, step, value in tensorboard_scalars(work)}
  # The final evaluation at the last epoch: as final/*, and as the end of the periodic eval_* curve (it stopped an
  # epoch short, and final/* sat at step 0).
  assert scalars[("final/mAP", last)] == pytest.approx(result["mAP"]) == scalars[("stage2/eval_mAP", last)]
  assert sorted(step for tag, step in scalars if tag == "stage2/eval_mAP") == list(range(1, last + 1))
  # Stage-1 learning moves only the prompt tokens.
  s1, final = _variables(work / "stage1"), _variables(work / "model")
  assert not np.array_equal(s1["params"]["prompt_learner"]["cls_ctx"], final["params"]["image_encoder"]["proj"][:0])
  np.testing.assert_array_equal(s1["params"]["prompt_learner"]["cls_ctx"], final["params"]["prompt_learner"]["cls_ctx"])
  np.testing.assert_array_equal(final["params"]["bottleneck"]["bias"], 0)
  assert not np.array_equal(s1["params"]["image_encoder"]["proj"], final["params"]["image_encoder"]["proj"])


def test_eval_mode_on_a_full_disk_prints_the_numbers_and_leaves_no_workdir(finished, tmp_path, monkeypatch, capsys):
  """metrics.json that cannot be written: one SaveError line (exit 1; it was an OSError traceback), the numbers on
  stdout all the same, and the folders the evaluation created removed again."""
  import errno  # pylint: disable=g-import-not-at-top
  from clipreid_jax import outputs  # pylint: disable=g-import-not-at-top
  config, root, _ = finished
  c = config.copy_and_resolve_references()
  c.mode, c.checkpoint = "eval", str(root / "work" / "model")

  def full(path, text):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))
  monkeypatch.setattr(outputs, "write_atomic", full)
  with pytest.raises(workdir.SaveError, match=r"^--workdir: cannot write .*new/eval/metrics.json \(OSError: \[Errno "
                     r"28\] No space left on device"):
    inference.evaluate_checkpoint(c, str(tmp_path / "new" / "eval"))
  assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []
  assert capsys.readouterr().out.strip().splitlines()[-1].startswith("final: mAP")


def test_eval_mode_reproduces_final_metrics(finished, tmp_path):
  config, root, result = finished
  c = config.copy_and_resolve_references()
  c.mode, c.checkpoint = "eval", str(root / "work" / "model")
  again = inference.evaluate_checkpoint(c, str(tmp_path))
  assert again == pytest.approx(result, abs=1e-6)
  record = json.loads((tmp_path / "metrics.json").read_text())
  assert record["final"] == train.percent(again) and record["evaluated"]["checkpoint"] == c.checkpoint
  assert c.dataset.name == "synthetic" and record["evaluated"]["dataset"] == "synthetic"  # not its layout's name
  c.checkpoint = str(root / "work")  # the run's workdir instead of its model: the error names the model
  with pytest.raises(CheckpointError, match=r"got kind None \(a training workdir: its trained model is .*work/model\)"):
    inference.evaluate_checkpoint(c, str(tmp_path / "again"))


def test_extract_mode_and_python_api(finished, tmp_path):
  config, root, _ = finished
  c = config.copy_and_resolve_references()
  query = root / "data" / "query"
  c.mode, c.checkpoint = "extract", str(root / "work" / "model")
  c.extract.input, c.extract.output = str(query), str(tmp_path / "feats")
  inference.extract_to_files(c)
  feats = np.load(tmp_path / "feats" / "features.npy")
  names = (tmp_path / "feats" / "features_index.txt").read_text().split()
  assert feats.shape == (len(names), 64 + 32) and len(names) == len(list(query.glob("*.jpg")))
  import clipreid_jax
  direct = clipreid_jax.FeatureExtractor(c.checkpoint, batch_size=5)(names[:7])
  np.testing.assert_allclose(direct, feats[:7], rtol=1e-5, atol=1e-5)


def test_workdir_of_another_config_is_refused(finished):
  config, root, _ = finished
  c = config.copy_and_resolve_references()
  c.stage2.base_lr = 1.0
  with pytest.raises(train.ConfigError, match=r"another configuration \(differs in stage2.base_lr\)"):
    train.train_and_evaluate(c, str(root / "work"))


def test_workdir_accepts_keys_that_do_not_change_the_numbers(finished, tmp_path):
  """The dataset moved, stage 1 logs or saves at another period: the same run, so the workdir is accepted."""
  config, root, _ = finished
  c = config.copy_and_resolve_references()
  moved = tmp_path / "moved_data"
  moved.symlink_to(root / "data")
  c.dataset.root, c.dataset.check_counts = str(moved), not c.dataset.check_counts
  c.stage1.log_every_epochs += 1
  c.stage1.checkpoint_every_epochs += 1
  c.model.attention = "xla"  # another kernel for the same model
  train.Run(str(root / "work"), c)  # no ConfigError
  c.model.stride = 7
  with pytest.raises(train.ConfigError, match=r"differs in model.stride"):
    train.Run(str(root / "work"), c)


def test_resume_refuses_other_records_at_the_data_root(finished, tmp_path):
  """dataset.root may move between restarts; a root holding other records is refused in one line (it trained on
  the new data silently, or failed in flax with another identity count)."""
  config, root, _ = finished
  c = config.copy_and_resolve_references()
  c.dataset.root = str(tmp_path / "copy")
  shutil.copytree(root / "data", c.dataset.root)
  run = train.Run(str(root / "work"), c)
  run.use_data(train.load_dataset(c))  # a moved copy: the same records
  moved = c.copy_and_resolve_references()
  moved.dataset.keypoint_dir = str(tmp_path / "keypoints")  # VeRi's keypoint files may move too (views are records)
  train.Run(str(root / "work"), moved).use_data(train.load_dataset(c))
  train_dir = pathlib.Path(c.dataset.root, "bounding_box_train")
  first = sorted(train_dir.iterdir())[0]
  first.rename(first.with_name("9" + first.name[1:]))  # another identity for one image
  with pytest.raises(train.ConfigError, match=r"^dataset.root: .*copy holds other data than the run in .* was "
                     r"trained on \(train: 9 identities, 32 images now, 8 identities, 32 images then\); expected"):
    run.use_data(train.load_dataset(c))
  sorted(train_dir.iterdir())[-1].unlink()
  with pytest.raises(train.ConfigError, match=r"\(train: 8 identities, 31 images now, 8 identities, 32 images then"):
    train.train_and_evaluate(c, str(root / "work"))


def test_a_stage1_folder_of_another_model_is_refused(finished, tmp_path):
  config, root, _ = finished
  c = config.copy_and_resolve_references()
  c.model.sie_camera = True
  shutil.copytree(root / "work" / "stage1", tmp_path / "work" / "stage1")
  with pytest.raises(train.ConfigError, match=r"^/.*/stage1: holds a stage-1 model of another configuration \(differs "
                     r"in sie_camera: False there, True here\); expected this run's \(move it away"):
    train.train_and_evaluate(c, str(tmp_path / "work"))
  assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["stage1"]


def test_training_refuses_an_eval_workdir(finished, tmp_path):
  """Eval mode's workdir holds its metrics.json and no config.json: training there would overwrite the result."""
  config, _, _ = finished
  (tmp_path / "metrics.json").write_text('{"final": {"mAP": 22.3}}\n')
  with pytest.raises(train.ConfigError, match=r"^--workdir: .* holds an evaluation's metrics.json"):
    train.Run(str(tmp_path), config)
  assert (tmp_path / "metrics.json").read_text() == '{"final": {"mAP": 22.3}}\n'


class _Stop(Exception):
  pass


@pytest.mark.parametrize("stop_at", [(1, 1), (2, 1)], ids=["stage1", "stage2"])
def test_resume_equals_uninterrupted(finished, tmp_path, monkeypatch, stop_at):
  """A run stopped right after a checkpoint and restarted ends with bit-identical parameters (CPU)."""
  config, root, _ = finished
  original = train.Run.save

  def save_then_stop(self, counter, state, meta, force=False):
    original(self, counter, state, meta, force)
    if (meta["stage"], meta["epoch"]) == stop_at:
      raise _Stop()

  monkeypatch.setattr(train.Run, "save", save_then_stop)
  with pytest.raises(_Stop):
    train.train_and_evaluate(config, str(tmp_path / "work"))
  monkeypatch.setattr(train.Run, "save", original)
  train.train_and_evaluate(config, str(tmp_path / "work"))
  a, b = _variables(root / "work" / "model"), _variables(tmp_path / "work" / "model")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def _sigterm_at_stage2_batch(monkeypatch, n: int) -> list:
  """A SIGTERM to the run as its n-th stage-2 batch goes to the devices (`monkeypatch.undo()` ends it); returns the
  Runs created, the run's last."""
  runs, calls = [], {"n": 0}
  original_init, original_to_global = train.Run.__init__, train.to_global

  def init(self, *a, **k):
    original_init(self, *a, **k)
    runs.append(self)

  def to_global(mesh, local):
    if "pid" in local:  # a stage-2 batch
      calls["n"] += 1
      if calls["n"] == n:
        runs[-1]._on_stop_signal(signal.SIGTERM)
    return original_to_global(mesh, local)

  monkeypatch.setattr(train.Run, "__init__", init)
  monkeypatch.setattr(train, "to_global", to_global)
  return runs


@pytest.mark.parametrize("workers_before,workers_after", [(0, 1), (1, 0)])
def test_preemption_mid_epoch_resumes_exactly(finished, tmp_path, monkeypatch, caplog, workers_before, workers_after):
  """SIGTERM sets a flag; the trainer saves mid-epoch (the batches consumed) and exits 143. The resumed run equals
  the uninterrupted one, with or without grain worker processes on either side (they may change between
  restarts)."""
  config, root, _ = finished
  config = copy.deepcopy(config)
  config.data_workers = workers_before
  runs = _sigterm_at_stage2_batch(monkeypatch, 5)  # epoch 2 (3 steps an epoch here), first step
  with pytest.raises(SystemExit) as stop:
    train.train_and_evaluate(config, str(tmp_path / "work"))
  assert stop.value.code == 143
  meta = runs[-1].latest_meta()
  assert meta["stage"] == 2 and meta["epoch"] == 1 and meta["next_batch"] == 1, meta  # epoch 2's first step done
  monkeypatch.undo()
  config.data_workers = workers_after
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(config, str(tmp_path / "work"))
  assert "(stage 2, epoch 1 done, step 1 of epoch 2)" in caplog.text  # the log says where it resumes
  a, b = _variables(root / "work" / "model"), _variables(tmp_path / "work" / "model")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  # The interrupted epoch's record averages all its steps, those before the pre-emption included.
  records = [_records(w) for w in (root / "work", tmp_path / "work")]
  assert records[0] == records[1] and [r.get("epoch") for r in records[1] if r.get("stage") == 2] == [1, 2]


def test_preemption_at_the_first_stage2_step_keeps_the_stage1_checkpoints(finished, tmp_path, monkeypatch):
  """Stage-2 checkpoint counters continue after stage 1's epochs: a pre-emption right after stage 2's first step
  saves a new checkpoint (not one numbered like a stage-1 epoch), and the resumed run equals the uninterrupted one."""
  config, root, _ = finished
  runs = _sigterm_at_stage2_batch(monkeypatch, 2)
  with pytest.raises(SystemExit) as stop:
    train.train_and_evaluate(config, str(tmp_path / "work"))
  assert stop.value.code == 143
  meta = runs[-1].latest_meta()
  assert meta["stage"] == 2 and meta["epoch"] == 0 and meta["next_batch"] == 1, meta
  steps_done = checkpoint_steps(tmp_path / "work")
  assert steps_done[-2] == config.stage1.max_epochs < steps_done[-1], steps_done  # stage 1's last one is kept
  monkeypatch.undo()
  train.train_and_evaluate(config, str(tmp_path / "work"))
  a, b = _variables(root / "work" / "model"), _variables(tmp_path / "work" / "model")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_mid_epoch_position_reads_every_checkpoint_form():
  """The batch number, and the grain iterator states that checkpoints of earlier versions hold instead."""
  assert train.mid_epoch_position({"stage": 2, "epoch": 3}) is None
  assert train.mid_epoch_position({"stage": 2, "epoch": 3, "next_batch": 7}) == 7
  assert train.mid_epoch_position({"iterator": {"next_index": 5}}) == 5  # no worker processes
  with_workers = {"next_index_in_cycle": 1, "next_index_in_datasets": 2, "iterators_in_use_indices": [0, 1],
                  "iterators_in_use_states": [{"next_index": 4}, {"next_index": 3}], "exhausted": [0, 0],
                  "future_states": {}}  # grain's mp_prefetch after 7 elements, as it records them
  assert train.mid_epoch_position({"iterator": with_workers}) == 7


def test_bfloat16_compute_step(tmp_path):
  """bfloat16 compute (the GPU/TPU default) trains with float32 parameters and optimizer state."""
  config = tiny_config(tmp_path / "data")
  dataset = train.load_dataset(config)
  losses_by_dtype = {}
  for dtype in ("float32", "bfloat16"):
    config.model.dtype = dtype
    model, variables, batch, tx, text = tiny_stage2_parts(config, dataset)
    state = train.steps.create_state(variables["params"], variables["batch_stats"], tx, text)
    state, metrics = jax.jit(train.steps.make_stage2_step(model, tx, train.loss_weights(config)))(
        state, batch, jax.random.PRNGKey(0))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.opt_state) if hasattr(x, "dtype") and x.ndim)
    losses_by_dtype[dtype] = float(metrics["loss"])
  assert np.isfinite(losses_by_dtype["bfloat16"])
  assert abs(losses_by_dtype["bfloat16"] - losses_by_dtype["float32"]) < 0.05 * abs(losses_by_dtype["float32"])


def _tiny_stage2(tmp_path):
  """(step, state, batch) of the tiny model: the trainer's stage-2 step, optimizer and state."""
  config = tiny_config(tmp_path / "data")
  model, variables, batch, tx, text = tiny_stage2_parts(config, train.load_dataset(config))
  state = train.steps.create_state(variables["params"], variables["batch_stats"], tx, text)
  return train.steps.make_stage2_step(model, tx, train.loss_weights(config)), state, batch


def test_loop_step_is_the_step_over_the_state_leaves(tmp_path):
  """The trainer's call form: the same new state and metrics as the step itself, its draws folded from the state's
  own step counter, so two steps draw differently and a resumed run draws the same."""
  step, state, batch = _tiny_stage2(tmp_path)
  key = jax.random.PRNGKey(7)
  state = state.replace(step=state.step + 5)  # a resumed run's counter
  treedef = jax.tree.structure(state)
  copy_of = lambda tree: jax.tree.map(np.array, tree)
  want_state, want_metrics = jax.jit(step)(copy_of(state), batch, jax.random.fold_in(key, 5))
  fn = train.steps.loop_step(step, treedef)
  leaves, metrics = fn(jax.tree.leaves(copy_of(state)), batch, key)
  assert isinstance(leaves, list) and len(leaves) == treedef.num_leaves
  got = jax.tree.unflatten(treedef, leaves)
  assert int(got.step) == 6
  chex.assert_trees_all_equal(got, want_state)  # the same program around the step: bit for bit
  chex.assert_trees_all_equal(metrics, want_metrics)
  # The next call draws other augmentations (the counter moved on): a different loss on the same batch.
  _, again = fn(leaves, batch, key)
  assert float(again["loss"]) != float(metrics["loss"])
  with pytest.raises(ValueError, match="structure"):
    train.steps.loop_step(lambda s, b, r: (s.replace(text_features=None), {}), treedef)(
        jax.tree.leaves(copy_of(state)), batch, key)


def test_loop_step_rebuilds_no_pytree_per_call(tmp_path):
  """Why the trainer calls its step over the state's leaves: jit over the TrainState rebuilds its thousand-odd
  dicts and optax MaskedNodes at every call, which runs Python's cyclic collector (whose full passes walk the whole
  heap); over the leaves a call leaves the collector idle."""
  step, state, batch = _tiny_stage2(tmp_path)
  key = jax.random.PRNGKey(0)
  treedef = jax.tree.structure(state)
  assert treedef.num_nodes > 3 * treedef.num_leaves  # what there is to rebuild
  no_work = lambda s, b, r: (s.replace(step=s.step + 1), {"loss": b["pid"][0].astype(np.float32)})
  by_form = {}
  threshold = gc.get_threshold()
  collections = []
  record = lambda phase, info: collections.append(phase) if phase == "start" else None
  try:
    gc.set_threshold(200)
    gc.callbacks.append(record)
    for form in ("pytree", "leaves"):
      fn = jax.jit(no_work, donate_argnums=0) if form == "pytree" else train.steps.loop_step(no_work, treedef)
      held = state if form == "pytree" else jax.tree.leaves(state)
      for _ in range(3):  # compile, then warm
        held, _ = fn(held, batch, key)
      collections.clear()
      for _ in range(20):
        held, _ = fn(held, batch, key)
      by_form[form] = len(collections)
      state = held if form == "pytree" else jax.tree.unflatten(treedef, held)
  finally:
    gc.callbacks.remove(record)
    gc.set_threshold(*threshold)
  assert by_form["pytree"] >= 10 and by_form["leaves"] == 0, by_form


def test_backbone_name_sets_the_random_patch_and_a_different_init_clip_is_named(tmp_path, caplog):
  """model.backbone picks the family; a random CLIP takes its patch from the name (ViT-B-32: 32 pixels) and an
  init.clip whose architecture has another name is trained with a warning naming both (it was logged as ViT-B-16)."""
  config = tiny_config(tmp_path / "data")
  dataset = train.load_dataset(config)
  config.model.backbone, config.model.stride, config.model.input_size = "ViT-B-32", 32, (128, 64)
  model, _ = train.build_model(config, dataset)
  assert (model.config.clip.vision_patch_size, model.config.clip.vision_stride) == (32, 32)
  assert model.config.backbone == "ViT (width 64, depth 1, patch 32)"
  clip_dir = tmp_path / "rn_clip"
  assert convert.main(["clip", str(golden_root() / "rn50" / "clip_openai_layout.npz"), str(clip_dir)]) == 0
  config = tiny_config(tmp_path / "data", backbone="RN50")
  config.init.clip = str(clip_dir)
  with caplog.at_level(logging.WARNING):
    model, _ = train.build_model(config, dataset)
  name = model.config.backbone
  assert name.startswith("RN (width")
  assert f"model.backbone is 'RN50' but init.clip {clip_dir} holds {name}" in caplog.text


def test_sie_view_on_a_dataset_without_views_is_warned(tmp_path, caplog):
  config = tiny_config(tmp_path / "data")
  dataset = train.load_dataset(config)
  config.model.sie_camera = True
  train.check_data(config, dataset)
  assert not caplog.records
  config.model.sie_view = True
  train.check_data(config, dataset)
  assert "model.sie_view: market1501 has no view labels" in caplog.text


def test_baseline_mode_trains_the_image_side_only(tmp_path):
  """model.baseline: the paper's baseline rows: no prompts, no text encoder, no stage 1, no i2t loss."""
  config = tiny_config(tmp_path / "data")
  config.model.baseline = True
  result = train.train_and_evaluate(config, str(tmp_path / "work"))
  assert 0 < result["mAP"] <= 1
  assert not (tmp_path / "work" / "stage1").exists()
  model, variables = load_clipreid(tmp_path / "work" / "model")
  assert not model.config.with_text
  assert "prompt_learner" not in variables["params"] and "text_encoder" not in variables["params"]
  records = [json.loads(l) for l in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
  assert not [r for r in records if r.get("stage") == 1]
  stage2 = [r for r in records if r.get("stage") == 2]
  assert len(stage2) == config.stage2.max_epochs and all("i2t" not in r and "id_cls" in r for r in stage2)


def test_model_attention_sets_the_kernel(monkeypatch):
  from clipreid_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(clip_lib, "ATTENTION_IMPLEMENTATION", None)
  c = tiny_config("unused")
  c.model.attention = "cudnn"
  train.use_attention(c)
  assert clip_lib.ATTENTION_IMPLEMENTATION == "cudnn"
  c.model.attention = "xla"
  train.use_attention(c)
  assert clip_lib.ATTENTION_IMPLEMENTATION is None
  c.model.attention = "auto"  # the default: cuDNN where it can run
  train.use_attention(c)
  assert clip_lib.ATTENTION_IMPLEMENTATION == "cudnn"
  assert config_defaults.recipe("market1501").model.attention == "auto"


class _SlowOrFullDisk:
  """Patches orbax's JSON writer (it writes a checkpoint's metadata, after its arrays): the write of epoch `block`
  waits for `release`; the write of epoch `full` fails as on a full disk."""

  def __init__(self, monkeypatch, block=None, full=None):
    import threading
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler
    self.release, self.started = threading.Event(), threading.Event()
    original = handler.JsonCheckpointHandler._save_fn

    async def save_fn(handler_self, x, directory):
      if isinstance(x, dict) and x.get("epoch") == block:
        self.started.set()
        assert self.release.wait(timeout=60), "never released"
      if isinstance(x, dict) and x.get("epoch") == full:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      return await original(handler_self, x, directory)

    monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", save_fn)


def _small_state():
  return {"w": jax.numpy.arange(4096.0).reshape(64, 64), "n": jax.numpy.zeros((), jax.numpy.int32)}


def test_save_returns_before_the_write_and_the_checkpoint_holds_the_saved_values(tmp_path, monkeypatch):
  """A save copies the state and returns; the files are written while training goes on (and donates the state)."""
  disk = _SlowOrFullDisk(monkeypatch, block=1)
  run = train.Run(str(tmp_path / "work"), tiny_config(tmp_path / "data"))
  state = _small_state()
  saved = jax.tree.map(np.asarray, state)
  step = jax.jit(lambda s: {"w": s["w"] * 2 + 1, "n": s["n"] + 1}, donate_argnums=0)
  run.save(1, state, {"stage": 1, "epoch": 1})
  assert disk.started.wait(timeout=60)  # the write is under way in the background, and `save` has returned
  checkpoints = tmp_path / "work" / "checkpoints"
  assert list(checkpoints.glob("1.orbax-checkpoint-tmp*")) and not (checkpoints / "1").exists()
  for _ in range(3):  # training goes on, donating the buffers that were saved
    state = step(state)
  jax.block_until_ready(state)
  disk.release.set()
  run.wait()
  assert (checkpoints / "1").is_dir() and not list(checkpoints.glob("*tmp*"))
  restored = run.restore_state(_small_state(), train.make_mesh())
  for k in saved:
    np.testing.assert_array_equal(np.asarray(restored[k]), saved[k])
  assert int(state["n"]) == 3


def test_the_last_two_checkpoints_are_kept(tmp_path):
  """Each save past the second deletes the oldest checkpoint (docs/reliability.md): a long run's disk holds two
  states, the newest and the one before it (kept while the newest is written), and resumes from the newest."""
  work = tmp_path / "work"
  run = train.Run(str(work), tiny_config(tmp_path / "data"))
  for counter in (1, 2, 3, 4):
    run.save(counter, _small_state(), {"stage": 1, "epoch": counter})
  run.close()
  assert checkpoint_steps(work) == [3, 4]
  again = train.Run(str(work), tiny_config(tmp_path / "data"))
  assert again.resume()["epoch"] == 4
  again.close()


def test_a_failed_background_write_is_reported_by_the_next_save(tmp_path, monkeypatch):
  _SlowOrFullDisk(monkeypatch, full=2)
  work = tmp_path / "work"
  run = train.Run(str(work), tiny_config(tmp_path / "data"))
  run.save(1, _small_state(), {"stage": 1, "epoch": 1})
  run.save(2, _small_state(), {"stage": 1, "epoch": 2})  # fails in the background
  with pytest.raises(workdir.SaveError) as e:
    run.save(3, _small_state(), {"stage": 1, "epoch": 3})
  message = str(e.value)
  assert message.startswith(f"{work / 'checkpoints' / '2'}: cannot save (") and "No space left on device" in message
  assert f"the last good checkpoint {work / 'checkpoints' / '1'} is kept" in message
  assert run.manager.latest_step() == 1 and not list((work / "checkpoints").glob("2*"))
  run.wait()  # the failure was reported once; nothing is pending
  # A failure found while another error is reported (non-finite loss) is logged, and the last good one named.
  run.save(4, _small_state(), {"stage": 1, "epoch": 2})
  assert run.last_good() == f"the last good checkpoint {work / 'checkpoints' / '1'} is kept"


def test_stage1_does_not_depend_on_the_eval_batch_size(tmp_path):
  """eval.batch_size may change between restarts: the stage-1 bank is built in stage 1's batches (as the official
  code does), so the prompts learnt are the same bits (with eval batches they differed at float rounding)."""
  config = tiny_config(tmp_path / "data")
  dataset = train.load_dataset(config)
  mesh = train.make_mesh()
  learnt = []
  for eval_batch in (4, 16):
    config.eval.batch_size = eval_batch
    model, variables = train.build_model(config, dataset)
    run = train.Run(str(tmp_path / f"work{eval_batch}"), config)
    out = train.run_stage1(config, run, mesh, model, variables, dataset, {})
    run.close()
    learnt.append(np.asarray(out["params"]["prompt_learner"]["cls_ctx"]))
  np.testing.assert_array_equal(learnt[0], learnt[1])


def test_stage1_reshuffles_every_epoch_and_steps_at_its_epochs_lr(tmp_path, monkeypatch):
  """Each stage-1 epoch draws its own order of the bank (the official loader reshuffles every epoch), and every
  optimizer step of epoch e, the partial last batch included (ceil(N / batch) steps an epoch), runs at lr(e)."""
  config = tiny_config(tmp_path / "data")
  dataset = train.load_dataset(config)
  n = len(dataset.train)
  config.stage1.batch_size = next(b for b in range(5, n) if n % b)  # a partial last batch
  steps_per_epoch = -(-n // config.stage1.batch_size)
  perms, schedules = [], []
  permutation, lr_schedules = jax.random.permutation, train.optim.stage1_lr_schedules

  def record_permutation(key, x, *args, **kwargs):
    out = permutation(key, x, *args, **kwargs)
    if isinstance(x, int) and x == n:
      perms.append(np.asarray(out))
    return out

  def record_schedules(*args, **kwargs):
    schedules.append(lr_schedules(*args, **kwargs))
    return schedules[-1]

  monkeypatch.setattr(jax.random, "permutation", record_permutation)
  monkeypatch.setattr(train.optim, "stage1_lr_schedules", record_schedules)
  model, variables = train.build_model(config, dataset)
  run = train.Run(str(tmp_path / "work"), config)
  train.run_stage1(config, run, train.make_mesh(), model, variables, dataset, {})
  run.close()
  assert len(perms) == config.stage1.max_epochs == 2
  assert sorted(perms[0]) == list(range(n)) and not np.array_equal(perms[0], perms[1])
  lr_of_epoch = train.stage1_solver(config).schedule()
  assert lr_of_epoch(1) != lr_of_epoch(2)
  (sched,) = [s[train.optim.TRAIN] for s in schedules]
  for epoch in (1, 2):
    for i in range(steps_per_epoch):
      assert float(sched((epoch - 1) * steps_per_epoch + i)) == np.float32(lr_of_epoch(epoch)), (epoch, i)


def test_stage2_augments_with_the_configured_settings(tmp_path, monkeypatch):
  """augment.flip_prob, augment.padding and augment.erase_prob reach stage 2's step (not the step's defaults)."""
  config = tiny_config(tmp_path / "data")
  config.augment.update(flip_prob=0.25, padding=3, erase_prob=0.75)
  dataset = train.load_dataset(config)
  model, variables = train.build_model(config, dataset)
  made = []

  def record(*args, **kwargs):
    made.append(kwargs)
    raise _Stop()

  monkeypatch.setattr(train.steps, "make_stage2_step", record)
  run = train.Run(str(tmp_path / "work"), config)
  with pytest.raises(_Stop):
    train.run_stage2(config, run, train.make_mesh(), model, variables, dataset, {}, None)
  run.close()
  assert len(made) == 1
  assert {k: made[0].get(k) for k in ("flip_prob", "padding", "erase_prob")} == {
      "flip_prob": 0.25, "padding": 3, "erase_prob": 0.75}


def test_init_stage1_reuses_another_runs_prompts(finished, tmp_path):
  """init.stage1: stage 2 alone from another run's stage1/ (a sweep over stage-2 settings). With the same settings
  the result is that run's model, bit for bit; the prompts are copied into the workdir, so it resumes alone."""
  config, root, _ = finished
  c = config.copy_and_resolve_references()
  c.init.stage1 = str(shutil.copytree(root / "work" / "stage1", tmp_path / "sweep" / "stage1"))
  c.eval.untrained = False
  work = tmp_path / "work"
  train.train_and_evaluate(c, str(work))
  a, b = _variables(root / "work" / "model"), _variables(work / "model")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(_variables(work / "stage1")["params"]["prompt_learner"]["cls_ctx"],
                                _variables(root / "work" / "stage1")["params"]["prompt_learner"]["cls_ctx"])
  records = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  assert not [r for r in records if r.get("stage") == 1] and [r for r in records if r.get("stage") == 2]
  assert json.loads((work / "config.json").read_text())["init"]["stage1"] == c.init.stage1
  # The source deleted: the same command goes on from the workdir's copy (it was refused: "expected the stage1/
  # directory of a finished stage 1"); a new run from it is told it is not found.
  shutil.rmtree(tmp_path / "sweep")
  train.train_and_evaluate(c, str(work))
  with pytest.raises(train.ConfigError, match=r"^init.stage1: .*sweep/stage1: not found; expected the stage1/ "):
    train.train_and_evaluate(c, str(tmp_path / "new"))
  assert not (tmp_path / "new").exists()
  # The source is recorded: the workdir refuses to go on without it (or with another), not silently.
  c.init.stage1 = ""
  with pytest.raises(train.ConfigError, match=r"another configuration \(differs in init.stage1\)"):
    train.train_and_evaluate(c, str(work))


def test_init_stage1_of_other_data_or_model_is_refused(finished, tmp_path):
  config, root, _ = finished
  source = root / "work" / "stage1"
  c = config.copy_and_resolve_references()
  c.init.stage1 = str(source)
  c.dataset.root, c.dataset.seed = str(tmp_path / "other"), c.dataset.seed + 1  # the same counts, other records
  with pytest.raises(train.ConfigError, match=r"^init.stage1: .*stage1: its prompts were learnt on other training "
                     r"records \(.*config.json recorded 8 identities, 32 images; this dataset has 8 identities, 32 "
                     r"images \(as many, but other file names or labels\)\)"):
    train.train_and_evaluate(c, str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()
  c = config.copy_and_resolve_references()
  c.init.stage1, c.model.sie_camera = str(source), True
  with pytest.raises(train.ConfigError, match=r"^init.stage1: .*stage1: holds a stage-1 model of another "
                     r"configuration \(differs in sie_camera: False there, True here\); expected the stage1/ of a "
                     r"run with this run's model settings"):
    train.train_and_evaluate(c, str(tmp_path / "work"))
  # A trained model/ is a CLIP-ReID model directory too; stage 2 would have started from its fine-tuned encoder.
  assert json.loads((root / "work" / "model" / "config.json").read_text())["trained"] == "stage2"
  assert json.loads((source / "config.json").read_text())["trained"] == "stage1"
  for override, expected in (({"init.stage1": str(root / "work")}, "the stage1/ directory of a finished stage 1"),
                             ({"init.stage1": str(root / "work" / "model")},
                              "the stage1/ directory .*, not a trained model"),
                             ({"init.stage1": str(source), "model.baseline": True}, "'' for a baseline")):
    c = config.copy_and_resolve_references()
    for k, v in override.items():
      section, key = k.split(".")
      c[section][key] = v
    with pytest.raises(train.ConfigError, match=r"^init.stage1: expected " + expected):
      train.validate_config(c)
      train.check_init_stage1(c, str(tmp_path / "new"))
  # What the settings alone decide is refused before the data is read, so --dry_run says it too.
  c = config.copy_and_resolve_references()
  c.init.stage1, c.model.stride, c.model.input_size = str(source), 12, (64, 48)
  with pytest.raises(train.ConfigError, match=r"^init.stage1: .*stage1: holds a stage-1 model of another "
                     r"configuration \(differs in image_size: \[64, 32\] there, \[64, 48\] here; "
                     r"clip.vision_stride: 16 there, 12 here\); expected the stage1/ of a run with this run's"):
    train.check_init_stage1(c, str(tmp_path / "new"))


def test_init_clip_of_a_clipreid_model_fine_tunes_its_encoders(finished, tmp_path):
  """init.clip may name a CLIP-ReID model (trained or converted): another dataset's run starts from its encoders and
  fixed prompt tokens; prompts, classifiers, necks and SIE are fresh for the new identities."""
  config, root, _ = finished
  source = root / "work" / "model"
  c = config.copy_and_resolve_references()
  c.init.clip = str(source)
  c.dataset.root, c.dataset.seed, c.dataset.num_train_ids = str(tmp_path / "other"), 7, 6
  c.stage1.max_epochs = c.stage2.max_epochs = 1
  c.eval.untrained = False
  dataset = train.load_dataset(c)
  model, variables = train.build_model(c, dataset)
  src = _variables(source)
  for part in ("image_encoder", "text_encoder"):
    for x, y in zip(jax.tree.leaves(src["params"][part]), jax.tree.leaves(variables["params"][part])):
      np.testing.assert_array_equal(x, y)
  for k in ("token_prefix", "token_suffix"):
    np.testing.assert_array_equal(src["params"]["prompt_learner"][k], variables["params"]["prompt_learner"][k])
  assert variables["params"]["prompt_learner"]["cls_ctx"].shape[0] == 6 == model.config.num_classes
  assert variables["params"]["classifier"]["kernel"].shape[-1] == 6
  result = train.train_and_evaluate(c, str(tmp_path / "work"))
  assert 0 < result["mAP"] <= 1
  tuned = _variables(tmp_path / "work" / "model")
  assert not np.array_equal(tuned["params"]["image_encoder"]["proj"], src["params"]["image_encoder"]["proj"])
  # Another geometry than the model was trained at: its positional table fits one grid only.
  c.model.input_size = (96, 32)
  with pytest.raises(train.ConfigError, match=r"^model.input_size: \(96, 32\) differs from the CLIP-ReID model's "
                     r"\(64, 32\); expected the size it was trained at"):
    train.build_model(c, dataset)


def test_fine_tuning_needs_a_text_encoder_and_the_same_prompt_noun(finished):
  config, root, _ = finished
  source, variables = load_clipreid(root / "work" / "model")
  from clipreid_jax.models import clipreid
  kw = dict(num_classes=3, input_size=(64, 32))
  with pytest.raises(CheckpointError, match="a model of person prompts, this run's are vehicle prompts; expected a "
                     "model trained on vehicles, model.prompt_noun='person', or a converted CLIP"):
    clipreid.from_clipreid(source.config, variables, dataset="veri", **kw)
  model, _ = clipreid.from_clipreid(source.config, variables, dataset="veri", prompt_noun="person", **kw)
  assert model.config.prompt_noun == "person"
  baseline = dataclasses.replace(source.config, with_text=False)
  with pytest.raises(CheckpointError, match=r"a baseline model \(no text encoder\)"):
    clipreid.from_clipreid(baseline, variables, **kw)
  with pytest.raises(CheckpointError, match=r"a model of 4 prompt tokens per identity, this run asks for 2; expected "
                     r"model.prompt_tokens=4"):
    clipreid.from_clipreid(source.config, variables, prompt_tokens=2, **kw)
  model, _ = clipreid.from_clipreid(source.config, variables, dataset="veri", with_text=False, **kw)
  assert model.config.prompt_noun == "vehicle" and not model.config.with_text  # the image side alone: any dataset


def test_stage1_learns_prompts_of_another_length(tmp_path):
  """model.prompt_tokens: stage 1 learns that many tokens per identity and trains nothing else."""
  config = tiny_config(tmp_path / "data")
  config.model.prompt_tokens, config.stage1.max_epochs = 2, 1
  dataset = train.load_dataset(config)
  model, variables = train.build_model(config, dataset)
  assert model.config.prompt_tokens == 2 and model.config.eot_index == 9
  run = train.Run(str(tmp_path / "work"), config)
  out = train.run_stage1(config, run, train.make_mesh(), model, variables, dataset, {})
  run.close()
  before, after = (jax.tree.map(np.asarray, v["params"]) for v in (variables, out))
  assert after["prompt_learner"]["cls_ctx"].shape[1] == 2
  assert not np.array_equal(before["prompt_learner"]["cls_ctx"], after["prompt_learner"]["cls_ctx"])
  np.testing.assert_array_equal(before["image_encoder"]["proj"], after["image_encoder"]["proj"])


def test_prompt_noun_of_your_own(tmp_path):
  """model.prompt_noun: a custom set of vehicles learns "A photo of a X X X X vehicle." prompts (auto gave person
  prompts to every custom set); several words work; a bad value is refused before anything is read."""
  from clipreid_jax import steps  # pylint: disable=g-import-not-at-top
  from clipreid_jax.models import clipreid  # pylint: disable=g-import-not-at-top
  from clipreid_jax.tokenizer import tokenize  # pylint: disable=g-import-not-at-top
  config = tiny_config(tmp_path / "data")
  dataset = train.load_dataset(config)
  made = {}
  for noun in ("auto", "vehicle", "red panda"):
    config.model.prompt_noun = noun
    train.validate_config(config)
    model, variables = train.build_model(config, dataset)
    want = "person" if noun == "auto" else noun
    assert model.config.prompt_noun == want
    assert model.config.eot_index == int(tokenize(clipreid.prompt_template(want))[0].argmax())
    made[want] = (model, variables, np.asarray(variables["params"]["prompt_learner"]["token_suffix"])[0])
  # The fixed tokens after the X's: the noun's own, then the same "." and end token (CLIP's token embeddings).
  person, vehicle, panda = (made[n][2] for n in ("person", "vehicle", "red panda"))
  assert not np.array_equal(person[0], vehicle[0]) and not np.array_equal(vehicle[0], panda[0])
  np.testing.assert_array_equal(person[1:3], vehicle[1:3])
  np.testing.assert_array_equal(person[1:3], panda[2:4])
  assert made["red panda"][0].config.eot_index == made["vehicle"][0].config.eot_index + 1
  features = [np.asarray(steps.text_features_all(m, v["params"])) for m, v, _ in made.values()]
  assert not np.allclose(features[0], features[1]) and not np.allclose(features[1], features[2])
  for bad, why in (("Vehicle", "lowercase words"), ("", "lowercase words"), (" ".join(["zebra"] * 70), "77 tokens")):
    config.model.prompt_noun = bad
    with pytest.raises(train.ConfigError, match=f"model.prompt_noun: expected .*{why}"):
      train.validate_config(config)


def test_a_random_rn_clip_from_one_stage_depth(tmp_path):
  """The command line cannot give a tuple: model.random_clip.vision_layers=N builds an RN of N blocks per stage (the
  demo's ViT sizes with --config.model.backbone=RN50 failed with "expected 4 stage depths")."""
  config = tiny_config(tmp_path / "data")  # a ViT
  config.model.backbone = "RN50"
  config.model.random_clip.vision_layers = 2
  train.validate_config(config)
  model, _ = train.build_model(config, train.load_dataset(config))
  assert not model.config.clip.is_vit and tuple(model.config.clip.vision_layers) == (2, 2, 2, 2)
  config.model.random_clip = ml_collections.ConfigDict({**config.model.random_clip.to_dict(), "vision_layers": (1, 2)})
  with pytest.raises(train.ConfigError, match=r"model.random_clip.vision_layers: expected 4 stage depths \(or one "
                     r"for all four\) for an RN, got \(1, 2\)"):
    train.validate_config(config)


def test_restart_drops_the_records_and_files_a_kill_left(tmp_path):
  """metrics.jsonl keeps the records up to the checkpoint resumed from (stage, epoch), never half a line; the
  staging, replaced and temporary files of a killed run go, the run's own files stay."""
  config = tiny_config(tmp_path / "data")
  work = tmp_path / "work"
  records = [{"stage": 1, "epoch": 1, "loss": 1.0}, {"stage": 1, "epoch": 2, "loss": 0.9},
             {"stage": 2, "epoch": 1, "loss": 3.0}, {"stage": 2, "epoch": 2, "loss": 2.0},
             {"final": True, "mAP": 0.1}]
  text = "".join(json.dumps(r) + "\n" for r in records) + '{"stage": 2, "epoch": 3, "lo'
  leftovers = [work / ".stage1.partial-1a2b3c4d", work / ".model.old-1a2b3c4d", work / "checkpoints" /
               "5.orbax-checkpoint-tmp-1700000000"]
  kept = [work / "stage1", work / "checkpoints" / "4", work / "checkpoints" / "3"]
  for d in leftovers + kept:
    d.mkdir(parents=True)
  (work / ".metrics.jsonl.tmp-4242").write_text("{}")
  run = train.Run(str(work), config)
  run._remove_leftovers()
  assert sorted(p.name for p in work.iterdir()) == ["checkpoints", "stage1"]
  assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["3", "4"]
  for done, expected in (((2, 2), records[:4]), ((2, 1), records[:3]), ((1, 2), records[:2]), ((0, 0), [])):
    (work / "metrics.jsonl").write_text(text)
    run._trim_metrics(done)
    lines = (work / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l) for l in lines] == expected, done


def test_restart_rewrites_tensorboard_from_the_kept_records(tmp_path):
  """The epochs a kill lost (logged after the checkpoint resumed from) leave TensorBoard too: its events are
  rewritten from the trimmed metrics.jsonl, so the re-run epochs are not shown twice."""
  config = tiny_config(tmp_path / "data")
  work = tmp_path / "work"
  run = train.Run(str(work), config)
  for stage, epoch, loss in ((1, 1, 4.0), (1, 2, 3.0), (2, 1, 2.0)):
    run.log_metrics({"stage": stage, "epoch": epoch, "loss": loss})
  run.close()
  assert tensorboard_scalars(work) == [("stage1/loss", 1, 4.0), ("stage1/loss", 2, 3.0), ("stage2/loss", 1, 2.0)]
  again = train.Run(str(work), config)
  again.resumed_at(1, 1)
  again.log_metrics({"stage": 1, "epoch": 2, "loss": 2.5})
  again.close()
  assert tensorboard_scalars(work) == [("stage1/loss", 1, 4.0), ("stage1/loss", 2, 2.5)]
  assert [json.loads(l)["loss"] for l in (work / "metrics.jsonl").read_text().splitlines()] == [4.0, 2.5]


def test_percent_and_format_metrics():
  """metrics.json holds rates (and their VehicleID spreads) in percent and counts as they are; the log line the same."""
  m = {"mAP": 0.5, "mINP": 0.25, "R1": 0.625, "R5": 0.75, "R10": 0.875, "mAP_std": 0.0125, "R1_std": 0.02,
       "R5_std": 0.03, "R10_std": 0.04, "num_valid_queries": 7, "trials": 10}
  assert train.percent(m) == pytest.approx({"mAP": 50.0, "mINP": 25.0, "R1": 62.5, "R5": 75.0, "R10": 87.5,
                                            "mAP_std": 1.25, "R1_std": 2.0, "R5_std": 3.0, "R10_std": 4.0,
                                            "num_valid_queries": 7, "trials": 10})
  assert train.format_metrics(m) == "mAP 50.0 ± 1.2  R1 62.5 ± 2.0  R5 75.0 ± 3.0  R10 87.5 ± 4.0"
  assert train.format_metrics({"mAP": 0.5, "R1": 0.25, "R5": float("nan")}) == "mAP 50.0  R1 25.0"


@pytest.mark.parametrize("name", ["market1501", "vehicleid"])
def test_evaluate_model_orders_the_features_and_follows_the_protocol(tmp_path, monkeypatch, name):
  """The features come back in the loader's (host-interleaved) order with their record indices: they are put in
  query + gallery order before the protocol (VehicleID: eval.trials seeded draws from the config's seed, over the
  images in path order)."""
  from clipreid_jax import evaluation  # pylint: disable=g-import-not-at-top
  from clipreid_jax.data.records import ReidDataset, Split  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  pids = np.repeat(np.arange(6), 3)
  cams = np.tile([0, 1, 2], 6)
  split = lambda sel: Split(str(tmp_path), np.asarray([f"{i:03d}.jpg" for i in np.flatnonzero(sel)]), pids[sel],
                            cams[sel], np.zeros(sel.sum(), np.int32))
  query = np.zeros(pids.size, bool)
  query[::3] = True
  dataset = ReidDataset(name, split(np.ones(pids.size, bool)), split(query), split(~query))
  feats = (np.eye(6)[pids] + 0.7 * rng.standard_normal((pids.size, 6))).astype(np.float32)
  ordered = np.concatenate([feats[query], feats[~query]])
  shuffle = rng.permutation(pids.size)
  monkeypatch.setattr(train, "extract_features", lambda *a: (ordered[shuffle], shuffle.astype(np.int64)))
  config = tiny_config(tmp_path / "data")
  config.seed, config.eval.trials = 3, 4
  model = type("Model", (), {"config": type("Config", (), {"input_size": (32, 16)})()})()
  got = train.evaluate_model(config, None, model, None, dataset, feature_fn=lambda *a: None)
  q, g = dataset.query, dataset.gallery
  if name == "vehicleid":
    # VehicleID draws its trials over the test images in path order (here the original one), whatever the split.
    ms = evaluation.vehicleid_trials(feats, pids, num_trials=4, seed=3).mean_std()
    assert got == {"mAP": ms["mAP"][0], "R1": ms["r1"][0], "R5": ms["r5"][0], "R10": ms["r10"][0],
                   "mAP_std": ms["mAP"][1], "R1_std": ms["r1"][1], "R5_std": ms["r5"][1], "R10_std": ms["r10"][1],
                   "trials": 4}
    assert len({ms["mAP"][0], ms["r1"][0], ms["r5"][0]}) > 1  # the keys are not interchangeable here
  else:
    res = evaluation.evaluate(ordered[:len(q)], ordered[len(q):], q.pids, g.pids, q.camids, g.camids)
    assert got == {"mAP": float(res.mAP), "mINP": float(res.mINP), "R1": res.rank(1), "R5": res.rank(5),
                   "R10": res.rank(10), "num_valid_queries": int(res.num_valid_queries)}
    assert res.rank(1) < 1  # a ranking the order of the features changes


def test_checkpoint_and_evaluation_cadence(tmp_path, monkeypatch):
  """Checkpoints every stage1.checkpoint_every_epochs (stage 1) and checkpoint_every_epochs (stage 2) epochs and
  at the last epoch of each stage; periodic evaluations every eval.period stage-2 epochs but the last."""
  config = tiny_config(tmp_path / "data")
  config.stage1.max_epochs, config.stage1.checkpoint_every_epochs = 4, 3
  config.stage2.max_epochs, config.checkpoint_every_epochs, config.eval.period = 3, 2, 2
  config.stage2.steps, config.eval.untrained = (3,), False
  saved, original = [], train.Run.save

  def save(self, counter, state, meta, force=False):
    saved.append((meta["stage"], meta["epoch"], counter))
    original(self, counter, state, meta, force)

  monkeypatch.setattr(train.Run, "save", save)
  train.train_and_evaluate(config, str(tmp_path / "work"))
  assert [(s, e) for s, e, _ in saved] == [(1, 3), (1, 4), (2, 2), (2, 3)]
  assert [c for s, _, c in saved if s == 1] == [3, 4] and all(c > 4 for s, _, c in saved if s == 2)
  records = [json.loads(l) for l in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records if r.get("stage") == 2 and "eval_mAP" in r] == [2]


def test_stage1_batch_may_hold_every_training_image(tmp_path):
  config = tiny_config(tmp_path / "data")
  dataset = train.load_dataset(config)
  config.stage1.batch_size = len(dataset.train)  # one full batch an epoch
  train.check_data(config, dataset)
  config.stage1.batch_size += 1
  with pytest.raises(train.ConfigError, match=f"^stage1.batch_size: {len(dataset.train) + 1} is more than the "
                     f"{len(dataset.train)} training images"):
    train.check_data(config, dataset)


def test_a_restart_before_the_first_checkpoint_starts_metrics_afresh(tmp_path):
  """Killed after stage-1 epoch 1 was logged but before its checkpoint: the restart trains epoch 1 again, and its
  record must not follow the stale one."""
  config = tiny_config(tmp_path / "data")
  work = tmp_path / "work"
  work.mkdir()
  (work / "metrics.jsonl").write_text('{"stage": 1, "epoch": 1, "loss": 9.0}\n')
  run = train.Run(str(work), config)
  assert run.resume() == {}
  run.log_metrics({"stage": 1, "epoch": 1, "loss": 1.0})
  run.close()
  assert [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()] == [
      {"stage": 1, "epoch": 1, "loss": 1.0}]


def test_a_workdir_is_used_by_one_run_at_a_time(tmp_path, monkeypatch):
  """A second run of the same workdir (the command started twice, a job requeued while the first still runs) deleted
  the first's checkpoint being written as a kill's leftover and trimmed its metrics.jsonl: it is refused, whether
  the workdir exists (at `resume`) or the two runs start together (at its creation), until the first ends."""
  config = tiny_config(tmp_path / "data")
  work = tmp_path / "work"
  first, second = train.Run(str(work), config), train.Run(str(work), config)
  assert first.resume() == {} and second.resume() == {}  # no workdir yet: nothing to guard
  first.create()
  with pytest.raises(train.ConfigError, match=f"^--workdir: {re.escape(str(work.resolve()))} is in use by another "
                     "run .*; expected it to end first, or another --workdir$"):
    second.create()
  assert sorted(p.name for p in work.iterdir()) == ["checkpoints", "config.json"]
  # Both start on a new workdir: the one refused must not remove the folder the other has just made and locked.
  other, late = tmp_path / "other", [train.Run(str(tmp_path / "other"), config) for _ in range(2)]
  real = late[1]._lock_folder
  late[1]._lock_folder = lambda: late[0]._lock_folder() and real()  # the first locks it between mkdir and lock
  with pytest.raises(train.ConfigError, match="is in use by another run"):
    late[1].create()
  assert other.is_dir()
  late[0].create()
  assert sorted(p.name for p in other.iterdir()) == ["checkpoints", "config.json"]
  third = train.Run(str(work), config)
  with pytest.raises(train.ConfigError, match="is in use by another run"):
    third.resume()
  first.unlock()
  assert third.resume() == {}
  third.close()
  fourth = train.Run(str(work), config)
  fourth.resume()
  del fourth  # dropped without close: its descriptor closes, and the lock with it
  gc.collect()
  fifth = train.Run(str(work), config)
  fifth.resume()

  def no_locks(fd, operation):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

  monkeypatch.setattr(workdir.fcntl, "flock", no_locks)  # a network mount without locks: the run goes on unguarded
  assert train.Run(str(work), config).resume() == {}


def test_the_first_stop_signal_sets_the_exit_code_and_a_second_ctrl_c_is_not_caught(tmp_path):
  """SIGTERM then Ctrl-C before the step boundary: the run exits 143 (the pre-emption asked first), not 130. A first
  Ctrl-C puts Python's handler back, so a second one stops at once instead of waiting for the checkpoint; a Ctrl-C
  that the caller ignores (a background job) stays ignored. `release_signals` puts every handler back."""
  run = train.Run(str(tmp_path / "work"), tiny_config(tmp_path / "data"))
  other = None
  previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    run.catch_signals()
    assert signal.getsignal(signal.SIGTERM) == run._on_stop_signal == signal.getsignal(signal.SIGINT)
    run._on_stop_signal(signal.SIGTERM)
    run._on_stop_signal(signal.SIGINT)
    assert run.stop_signal == signal.SIGTERM and run.exit_code == 143 and run.stop_agreed()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    run.release_signals()
    assert signal.getsignal(signal.SIGTERM) == previous[signal.SIGTERM]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    other = train.Run(str(tmp_path / "work"), tiny_config(tmp_path / "data"))
    other.catch_signals()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and other.stop_signal == 0 and not other.stop_agreed()
    other._on_stop_signal(signal.SIGINT)
    assert other.exit_code == 130
    other.release_signals()
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
    for r in (run, other):
      if r is not None:
        r.close()


def test_ctrl_c_after_training_stops_at_once(finished, tmp_path, monkeypatch):
  """Once training is over, a first Ctrl-C (during the model's save or the final evaluation) stops the run at once:
  it was announced as "saving at the next step boundary, then exiting" and ignored, the run going on to exit 0. The
  rerun saves the model and evaluates from the last checkpoint."""
  config, root, _ = finished
  config = config.copy_and_resolve_references()
  config.eval.untrained = False  # one evaluation: one Ctrl-C (a second one stops anyway)
  work = tmp_path / "work"
  shutil.copytree(root / "work", work)
  shutil.rmtree(work / "model")
  (work / "metrics.json").unlink()
  original = train.evaluate_model

  def ctrl_c_then_evaluate(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    return original(*args, **kwargs)

  monkeypatch.setattr(train, "evaluate_model", ctrl_c_then_evaluate)
  # Ctrl-C as a terminal's foreground job has it (a suite started in the background ignores SIGINT).
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(KeyboardInterrupt):
      train.train_and_evaluate(config, str(work))
  finally:
    signal.signal(signal.SIGINT, previous)
  assert not (work / "metrics.json").exists()
  monkeypatch.setattr(train, "evaluate_model", original)
  train.train_and_evaluate(config, str(work))
  final = json.loads((root / "work" / "metrics.json").read_text())["final"]
  summary = json.loads((work / "metrics.json").read_text())
  assert summary["final"] == final and set(summary) == {"final", "evaluated"}


def test_a_finished_run_without_its_checkpoints_is_evaluated_not_trained_again(finished, tmp_path, monkeypatch):
  """checkpoints/ deleted after the run finished (to free the disk), then the same command again: it trained stage 2
  afresh and replaced model/ (on a GPU, with another model) and dropped every record from metrics.jsonl. Now model/
  is evaluated again, untouched, and the records stay; without model/ too, stage 2 trains again from stage1/ and
  stage 1's records stay."""
  config, root, _ = finished
  config = config.copy_and_resolve_references()
  work = tmp_path / "work"
  shutil.copytree(root / "work", work)
  shutil.rmtree(work / "checkpoints")
  model_files, records = folder_state(work / "model"), _records(root / "work")

  def trains(*args, **kwargs):
    raise AssertionError("trained again")

  with monkeypatch.context() as m:
    m.setattr(train, "run_stage1", trains)
    m.setattr(train, "run_stage2", trains)
    train.train_and_evaluate(config, str(work))
  assert folder_state(work / "model") == model_files
  assert _records(work) == records
  assert json.loads((work / "metrics.json").read_text())["final"] == json.loads(
      (root / "work" / "metrics.json").read_text())["final"]
  assert tensorboard_scalars(work) == tensorboard_scalars(root / "work")

  # A SIGTERM at its start stops it there (exit 143), as one after training does: it was evaluated to the end.
  summary = (work / "metrics.json").stat().st_mtime_ns
  resume = train.Run.resume

  def resume_then_sigterm(self):
    meta = resume(self)
    os.kill(os.getpid(), signal.SIGTERM)
    return meta

  with monkeypatch.context() as m:
    m.setattr(train.Run, "resume", resume_then_sigterm)
    m.setattr(train, "evaluate_model", trains)
    with pytest.raises(SystemExit) as e:
      train.train_and_evaluate(config, str(work))
  assert e.value.code == 143 and (work / "metrics.json").stat().st_mtime_ns == summary

  shutil.rmtree(work / "model")
  shutil.rmtree(work / "checkpoints")
  with monkeypatch.context() as m:
    m.setattr(train, "run_stage1", trains)  # its prompts are in stage1/
    train.train_and_evaluate(config, str(work))
  assert _records(work) == records  # stage 1's kept, stage 2's the same again (CPU)
  assert json.loads((work / "metrics.json").read_text())["final"] == json.loads(
      (root / "work" / "metrics.json").read_text())["final"]


@pytest.mark.parametrize("key,value,expected", [
    ("sie_camera", True, "model.sie_camera: expected False for an RN backbone (SIE is ViT-only), got True"),
    ("sie_view", True, "model.sie_view: expected False for an RN backbone (SIE is ViT-only), got True"),
    ("stride", 12, "model.stride: expected 16 for an RN backbone (the patch stride, OLP, is ViT-only), got 12")])
def test_vit_only_options_on_an_rn_are_refused(tmp_path, key, value, expected):
  """They trained silently as a no-op, and the model's config.json recorded SIE it never had."""
  config = tiny_config(tmp_path / "data", "RN50")
  config.model[key] = value
  with pytest.raises(train.ConfigError, match="^" + re.escape(expected) + "$"):
    train.validate_config(config)


def test_eval_geometry_override_of_a_trained_model_says_it_was_trained_so(finished):
  """Only a converted checkpoint's geometry is chosen at conversion: a trained model's error pointed at convert."""
  config, root, _ = finished
  c = config.copy_and_resolve_references()
  c.checkpoint, c.model.input_size = str(root / "work" / "model"), (96, 32)
  model, _ = load_clipreid(c.checkpoint)
  with pytest.raises(train.ConfigError, match=r"^model.input_size: \(96, 32\) contradicts the checkpoint .*, which "
                     r"has \(64, 32\); eval and extract use the checkpoint's \(it was trained so\)$"):
    inference.check_overrides(c, model, frozenset({"model.input_size"}))
