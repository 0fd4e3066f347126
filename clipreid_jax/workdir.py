"""A training run's workdir and the errors that end a run.

`Run` owns WORKDIR: config.json (the configuration a restart must match), checkpoints/ (orbax, written in the
background), metrics.jsonl and tensorboard/, and the stop signals (SIGTERM, Ctrl-C) that save a checkpoint and
exit. Nothing is written before the first record or checkpoint. The trainer (train.py) drives it.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import pathlib
import shutil
import signal
import threading
import time
import weakref
from typing import NoReturn, Optional

import jax
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clipreid_jax import checkpoints, outputs
from clipreid_jax.data import errors

log = logging.getLogger("clipreid_jax")


class ConfigError(ValueError):
  """A configuration value that cannot be used; the message names the key."""


class TrainingStopped(RuntimeError):
  """The run stopped on a condition met while training; the last good checkpoint is kept (CLI exit code 1)."""


class NonFiniteError(TrainingStopped, FloatingPointError):
  """A non-finite loss or gradient; the message names the step and every loss component."""


class SaveError(TrainingStopped):
  """A checkpoint could not be written (disk full, ...); the half-written one is removed."""


def record_counts(split_fingerprint: dict) -> str:
  """A split's size as the messages about other training records say it (from `Split.fingerprint`)."""
  return f"{split_fingerprint.get('identities')} identities, {split_fingerprint.get('images')} images"


class Run:
  """The workdir: checkpoints/ (orbax), metrics.jsonl, config.json, stage1/ and model/ directories.

  Nothing is written until the first metrics record or checkpoint, so a run that fails on its inputs (even on
  an image that only decoding finds broken, while stage 1 builds its feature bank) leaves no workdir behind.
  """

  # The sections of config.json a restarted run must match (they change the numbers), less the keys inside them
  # that do not: where the data (or its packed copy, VeRi's keypoint files: the records' view ids are in the data's
  # digest) and the CLIP live, count warnings, how often stage 1 logs and saves, the attention kernel. The data's
  # records are checked instead (`use_data`).
  _CONFIG_KEYS = ("dataset", "model", "init", "stage1", "stage2", "loss", "augment", "seed")
  _FREE_KEYS = ("dataset.root", "dataset.packed_dir", "dataset.keypoint_dir", "dataset.check_counts",
                "stage1.log_every_epochs", "stage1.checkpoint_every_epochs", "model.attention", "init.clip")

  def __init__(self, workdir: str, config):
    # Checked before the hours of work that fill it (created only at the first record or checkpoint).
    outputs.check_writable(workdir, "--workdir", ConfigError)
    self.dir = pathlib.Path(workdir).resolve()
    self.config = {k: config[k].to_dict() if hasattr(config[k], "to_dict") else config[k]
                   for k in self._CONFIG_KEYS if k in config}
    self._check_config()
    self.manager = None
    self._pending = None  # (counter, its writer threads) of the checkpoint being written in the background
    self._resumed_from = None  # (stage, epoch) of the checkpoint resumed from, until metrics.jsonl is trimmed
    self.stop_signal = 0  # the signal that asked the run to stop (SIGTERM, SIGINT); 0 while none has
    self._handlers = {}  # the handlers `catch_signals` replaced, put back by `release_signals`
    self._tb = None  # the TensorBoard writer, opened by the first record
    self._lock = None  # (process 0) the closer of the workdir's descriptor, flock()ed while this run uses it

  def catch_signals(self) -> None:
    """From now until `release_signals`, SIGTERM and a first Ctrl-C ask for a checkpoint and a clean exit."""
    for sig in (signal.SIGTERM, signal.SIGINT):
      if sig == signal.SIGINT and signal.getsignal(sig) is not signal.default_int_handler:
        continue  # Ctrl-C ignored (a background job of a script) or handled by the caller: left as it is
      try:
        self._handlers[sig] = signal.signal(sig, self._on_stop_signal)
      except ValueError:  # not the main thread
        pass

  def _on_stop_signal(self, signum, _frame=None):
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops without saving
      log.warning("Ctrl-C: saving a checkpoint at the next step boundary, then exiting (Ctrl-C again: stop without "
                  "saving)")
    else:
      log.warning("SIGTERM: saving a checkpoint at the next step boundary, then exiting")
    self.stop_signal = self.stop_signal or signum

  def end_training(self) -> None:
    """Training is over (or there is none to do): from here a signal stops the process at once, as no step boundary
    will act on it; one that came before this (after the last step's check) stops the run now."""
    stop = self.stop_agreed()
    self.release_signals()
    if stop:
      raise SystemExit(self.exit_code)

  def release_signals(self) -> None:
    """Puts back the handlers the run replaced: after training, Ctrl-C stops the process again."""
    for sig, handler in self._handlers.items():
      try:
        signal.signal(sig, handler)
      except (ValueError, TypeError):
        pass
    self._handlers = {}

  @property
  def exit_code(self) -> int:
    """The shell's code for the stop signal: 143 after SIGTERM, 130 after Ctrl-C."""
    return 128 + (self.stop_signal or signal.SIGTERM)

  def exit_preempted(self, saved: str) -> NoReturn:
    """Ends a stopped run once the checkpoint just started (of `saved`, for the log) is on disk."""
    self.wait()
    log.warning("pre-empted: saved %s", saved)
    raise SystemExit(self.exit_code)

  def stop_agreed(self) -> bool:
    """Whether any process was asked to stop (SIGTERM, Ctrl-C). Saving is collective, so hosts act on the flag
    only together: in a multi-host run this is a collective itself, called at the same point on every process."""
    if jax.process_count() == 1:
      return bool(self.stop_signal)
    flags = multihost_utils.process_allgather(np.asarray([self.stop_signal], np.int32))
    # Only ever set here: a signal handled while the flags were being gathered must stay for the next agreement.
    self.stop_signal = self.stop_signal or int(np.max(flags))
    return bool(np.any(flags))

  def _check_config(self) -> None:
    """A workdir belongs to one training configuration; another one must not overwrite or resume it."""
    f = self.dir / "config.json"
    if not f.is_file():
      if (self.dir / "metrics.json").is_file():  # eval mode's workdir: training would overwrite its metrics.json
        raise ConfigError(f"--workdir: {self.dir} holds an evaluation's metrics.json (and no training run); "
                          "expected a new workdir for training")
      return
    try:
      theirs = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ConfigError(f"{f}: unreadable ({type(e).__name__}); expected the config.json this trainer writes") from None
    data_then = theirs.get("data")
    ours, theirs = (traverse_util.flatten_dict(d, sep=".") for d in (self.config, theirs))
    # Keys a run of an older version did not record are not compared.
    diff = sorted(k for k, v in ours.items() if k in theirs and k not in self._FREE_KEYS
                  and json.dumps(v, sort_keys=True, default=str) != json.dumps(theirs[k], sort_keys=True, default=str))
    changed = sorted({k.split(".")[1] for k in diff if k.startswith("data.")})
    if changed:  # dataset.root may move between restarts; the records it holds may not change
      now = self.config["data"]
      what = "; ".join(f"{s}: {record_counts(now[s])} now, {record_counts(data_then.get(s, {}))} then"
                       + (" (other records)" if record_counts(now[s]) == record_counts(data_then.get(s, {})) else "")
                       for s in changed)
      key = "dataset.packed_dir" if self.config["dataset"].get("packed_dir") else "dataset.root"
      raise ConfigError(f"{key}: {self.config['dataset'].get(key.split('.')[1])} holds other data than the run in "
                        f"{self.dir} was trained on ({what}); expected the same records (the folder may move, its "
                        "contents may not), or a new --workdir")
    if diff:
      raise ConfigError(f"{f}: the workdir holds a run of another configuration (differs in {', '.join(diff)}); "
                        "use a new --workdir")

  def use_data(self, dataset) -> None:
    """Records the dataset's fingerprint, and refuses a workdir whose run was trained on other records."""
    self.config["data"] = dataset.fingerprint()
    self._check_config()

  def create(self) -> None:
    """Creates the workdir on first use (collective: every host calls it at the same point)."""
    if self.manager is None:
      busy = False
      if jax.process_index() == 0:
        try:
          with outputs.created_folder(self.dir):
            # Before config.json: a run started beside this one stops here, having written nothing (and without an
            # exception in this block, which would remove the folder the other run holds).
            busy = not self._lock_folder()
            f = self.dir / "config.json"
            if not busy and not f.is_file():
              outputs.write_atomic(f, json.dumps(self.config, indent=1, sort_keys=True, default=str) + "\n")
        except OSError as e:  # a full disk, a folder made read-only since the start
          raise SaveError(f"{self.dir}: cannot create the workdir ({errors.describe(e)}); rerun the same command "
                          "once it can be written") from None
      self._refuse_if_busy(busy)
      multihost_utils.sync_global_devices("workdir created")
      self._open_manager()
    if self._resumed_from is not None and jax.process_index() == 0:
      self._trim_metrics(self._resumed_from)
      self._rebuild_tensorboard()
    self._resumed_from = None

  def claim(self) -> None:
    """One run per workdir: where it exists, process 0 takes its lock (`_lock_folder`) and every host stops with
    ConfigError if another process holds it (collective). A second copy of the command, or a job requeued while the
    first still runs, would delete the other's checkpoint being written as a kill's leftover, trim its
    metrics.jsonl and save into the same checkpoints/. A workdir created later is claimed by `create`."""
    self._refuse_if_busy(jax.process_index() == 0 and self.dir.is_dir() and not self._lock_folder())

  def _refuse_if_busy(self, busy: bool) -> None:
    if jax.process_count() > 1:  # every host stops, not process 0 alone: the others would wait for it forever
      busy = bool(np.any(multihost_utils.process_allgather(np.asarray([busy], np.int32))))
    if busy:
      raise ConfigError(f"--workdir: {self.dir} is in use by another run (this command started twice, or a job "
                        "requeued while the first still runs); expected it to end first, or another --workdir")

  def _lock_folder(self) -> bool:
    """Process 0's flock on the workdir folder, held until `unlock` or the process's end; False where another process
    holds it. A folder that cannot be opened, or a filesystem without locks (some network mounts), leaves the run
    unguarded."""
    if self._lock is not None or jax.process_index() != 0 or not self.dir.is_dir():
      return True
    try:
      fd = os.open(self.dir, os.O_RDONLY)
    except OSError:
      return True
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      return False
    except OSError:
      os.close(fd)
      return True
    self._lock = weakref.finalize(self, os.close, fd)  # closing releases it; also when a Run is dropped unclosed
    return True

  def unlock(self) -> None:
    if self._lock is not None:
      self._lock()
      self._lock = None

  def _open_manager(self) -> None:
    self.manager = checkpoint_manager(self.dir / "checkpoints")

  def resume(self) -> dict:
    """Cleans up after a killed run and returns the latest checkpoint's metadata ({} to start afresh).

    A kill can leave orbax temporary directories, `.NAME.partial-*` staging directories of stage1/ or model/,
    and metrics.jsonl records (or half a line) newer than the checkpoint; all of them are dropped (the records at
    the first write, so a restart that fails on its inputs changes nothing), and the restarted run writes
    exactly what an uninterrupted one would.
    """
    if not self.dir.is_dir():
      return {}
    self.claim()
    if jax.process_index() == 0:
      self._remove_leftovers()
    multihost_utils.sync_global_devices("leftovers removed")
    if (self.dir / "checkpoints").is_dir():
      self._open_manager()
    meta = self.latest_meta() or {}
    if meta:
      where = f", step {meta['next_batch']} of epoch {meta['epoch'] + 1}" if "next_batch" in meta else ""
      log.info("resuming from %s (stage %d, epoch %d done%s)",
               self.dir / "checkpoints" / str(self.manager.latest_step()), meta["stage"], meta["epoch"], where)
    self._resumed_from = (meta.get("stage", 0), meta.get("epoch", 0))
    return meta

  def resumed_at(self, stage: int, epoch: int) -> None:
    """A run without a checkpoint that goes on from what it wrote at the end of a stage (stage1/ or model/, its
    checkpoints deleted to free the disk): its records up to there are kept."""
    self._resumed_from = (stage, epoch)

  def _remove_leftovers(self) -> None:
    for p in [*self.dir.glob(".*.partial-*"), *self.dir.glob(".*.old-*"), *self.dir.glob(".*.tmp-*"),
              *(self.dir / "checkpoints").glob("*.orbax-checkpoint-tmp*")]:
      log.warning("removing %s, left by an interrupted run", p)
      shutil.rmtree(p) if p.is_dir() else p.unlink()

  def _trim_metrics(self, done: tuple[int, int]) -> None:
    """Keeps the complete records up to `done` (stage, epoch); the final record comes again at the end."""
    f = self.dir / "metrics.jsonl"
    if not f.is_file():
      return
    text = f.read_text()
    keep = []
    for line in text.splitlines():
      try:
        r = json.loads(line)
      except json.JSONDecodeError:  # the half line of a kill
        continue
      if "stage" in r and (r["stage"], r.get("epoch", 0)) <= done:
        keep.append(line)
    trimmed = "".join(l + "\n" for l in keep)
    if trimmed != text:
      outputs.write_atomic(f, trimmed)

  def _rebuild_tensorboard(self) -> None:
    """Rewrites tensorboard/ from the trimmed metrics.jsonl: events of epochs lost to a kill would otherwise stay
    beside their re-run (TensorBoard's purge_step cannot do it: it would also hide the other stage's epochs)."""
    tb, records = self.dir / "tensorboard", self.dir / "metrics.jsonl"
    if not tb.is_dir():
      return
    self._close_tensorboard()
    shutil.rmtree(tb)
    for line in records.read_text().splitlines() if records.is_file() else []:
      self._tensorboard(json.loads(line))

  def log_metrics(self, record: dict) -> None:
    self.create()
    if jax.process_index() == 0:
      with open(self.dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
      self._tensorboard(record)

  def _tensorboard(self, record: dict) -> None:
    """The same numbers as TensorBoard scalars (WORKDIR/tensorboard), tagged stage1/, stage2/ or final/."""
    if self._tb is None:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(self.dir / "tensorboard"))
    # The final evaluation is the last stage-2 epoch's (the periodic ones skip that epoch): at that step, as final/*
    # and as the end of the stage2/eval_* curves.
    prefixes = ["final/", "stage2/eval_"] if record.get("final") else [f"stage{record.get('stage', 0)}/"]
    step = record.get("epoch", 0)
    for key, value in record.items():
      if key not in ("stage", "epoch", "final") and isinstance(value, (int, float)) and np.isfinite(value):
        for prefix in prefixes:
          self._tb.add_scalar(f"{prefix}{key}", value, step)
    self._tb.flush()

  def _close_tensorboard(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def close(self) -> None:
    """Waits for the checkpoint being written, finishes the TensorBoard file (its writer flushes on close) and lets
    another run have the workdir."""
    self.wait()
    self._close_tensorboard()
    self.unlock()

  def save(self, counter: int, state, meta: dict, force: bool = False) -> None:
    """Starts checkpoint `counter`: returns once the state is copied off the devices; the files are written in the
    background while training goes on. A failed write is raised (SaveError) by the next `save` or `wait`."""
    import orbax.checkpoint as ocp
    self.create()
    self.wait()  # the previous checkpoint first: its failure must be reported as its own
    before = set(threading.enumerate())
    self._pending = (counter, lambda: [t for t in threading.enumerate() if t not in before])
    try:
      self.manager.save(counter, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=force)
    except Exception as e:  # pylint: disable=broad-except  # orbax and tensorstore raise many types for I/O
      self._fail(e)
    # The threads this save started (its background write), not those the training starts meanwhile.
    writers = set(threading.enumerate()) - before
    self._pending = (counter, lambda: list(writers))

  def wait(self) -> None:
    """Blocks until the checkpoint being written is on disk; SaveError if its write failed."""
    if self._pending is None:
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._fail(e)
    self._pending = None

  def _fail(self, e: Exception) -> None:
    counter, writers = self._pending
    self._pending = None
    # orbax raises at the first failed item while the others may still be writing: let the save's own threads
    # finish before removing the half-written step.
    checkpoints.join_threads(writers, deadline=time.time() + 60)
    if jax.process_index() == 0:
      for p in (self.dir / "checkpoints").glob(f"{counter}.orbax-checkpoint-tmp*"):
        shutil.rmtree(p, ignore_errors=True)
    raise SaveError(f"{self.dir / 'checkpoints' / str(counter)}: cannot save ({errors.io_cause(e)}); "
                    f"{self.last_good()}; "
                    "rerun the same command to resume from it") from e

  def settle(self) -> None:
    """`wait`, for when another error is being reported: a failed write is logged, not raised."""
    try:
      self.wait()
    except SaveError as e:
      log.error("%s", e)

  def last_good(self) -> str:
    """Names the newest complete checkpoint, once the one being written (if any) has finished or failed."""
    self.settle()
    step = None if self.manager is None else self.manager.latest_step()
    if step is None:
      return "no checkpoint was saved yet"
    return f"the last good checkpoint {self.dir / 'checkpoints' / str(step)} is kept"

  def latest_meta(self) -> Optional[dict]:
    import orbax.checkpoint as ocp
    step = None if self.manager is None else self.manager.latest_step()
    if step is None:
      return None
    try:
      return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    except Exception as e:  # pylint: disable=broad-except
      raise self._unusable(step, e) from None

  def restore_state(self, like, mesh: Mesh):
    """The latest checkpoint's state, with the structure of `like`, replicated over `mesh`: a run saved on other
    devices (8 GPUs, then 4; a pod slice of another size) resumes on these (the checkpoint's own shardings name
    devices that may not exist here)."""
    import orbax.checkpoint as ocp
    step = self.manager.latest_step()
    replicated = NamedSharding(mesh, P())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          jax.eval_shape(lambda: like))
    try:
      with checkpoints.quiet_late_reads():
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    except Exception as e:  # pylint: disable=broad-except
      raise self._unusable(step, e) from None

  def _unusable(self, step: int, e: Exception) -> checkpoints.CheckpointError:
    reason = checkpoints.restore_reason(e)
    return checkpoints.CheckpointError(f"{self.dir / 'checkpoints' / str(step)}: cannot restore ({reason}); move it "
                                       "away to resume from the one before")


def checkpoint_manager(directory: pathlib.Path):
  """The trainer's orbax manager: the last two checkpoints kept; a save copies the state off the devices and
  returns, and the files are written in the background while training goes on (docs/reliability.md)."""
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      max_to_keep=2, create=True, enable_async_checkpointing=True))


def check_finite(where: str, metrics: dict, run: Run) -> None:
  """Raises NonFiniteError naming `where` and every component unless all of `metrics` are finite."""
  items = sorted(metrics.items(), key=lambda kv: kv[0] != "loss")  # the total first, then its components
  bad = [k for k, v in items if not np.isfinite(v)]
  if bad:
    values = ", ".join(f"{k} {float(v):.6g}" for k, v in items)
    raise NonFiniteError(f"{where}: non-finite {', '.join(bad)} ({values}); stopped without saving, "
                         f"{run.last_good()}")
