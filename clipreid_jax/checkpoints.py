"""Model directories on disk: `config.json` (what the model is) + `variables/` (orbax pytree).

Every directory is written atomically: built under a hidden sibling name, then renamed into place, so
a crash or a bad input never leaves a half-written model behind and never clobbers a good one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import threading
import time
import uuid
from typing import Any, Callable, Iterator

import numpy as np

from clipreid_jax.data import errors

FORMAT_VERSION = 1


class CheckpointError(ValueError):
  """A model directory or source checkpoint that cannot be used; the message names the file."""


def read_config(path: str | os.PathLike) -> dict:
  path = pathlib.Path(path)
  cfg_file = path / "config.json"
  if path.is_file():  # a PyTorch checkpoint itself, given where its converted directory goes
    raise CheckpointError(f"{path}: a file; expected the directory that `python -m clipreid_jax.convert clip {path} "
                          f"DIR` (OpenAI's CLIP) or `... convert clipreid {path} DIR` (a CLIP-ReID checkpoint) writes")
  if not cfg_file.is_file():
    raise CheckpointError(f"{cfg_file}: not found; expected a directory written by `python -m clipreid_jax.convert`")
  try:
    meta = json.loads(cfg_file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
  if not isinstance(meta, dict):
    raise CheckpointError(f"{cfg_file}: expected a JSON object, got {type(meta).__name__}")
  return meta


def _checkpointer():
  # A model directory is written by one process and read by any, alone: orbax's default waits at barriers for
  # every process of a multi-host run, which the others never reach (the training state has its own manager).
  import jax
  import orbax.checkpoint as ocp
  me = jax.process_index()
  return ocp.StandardCheckpointer(
      multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}))


def restore_variables(path: str | os.PathLike) -> dict:
  """Restores the variables pytree (numpy-backed jax arrays on the default device)."""
  path = pathlib.Path(path).resolve() / "variables"
  if not path.is_dir():
    raise CheckpointError(f"{path}: not found; the model directory is incomplete")
  ckptr = _checkpointer()
  try:
    with quiet_late_reads():
      return ckptr.restore(path)
  except Exception as e:  # orbax raises many types for truncated or foreign data
    raise CheckpointError(f"{path}: cannot restore ({type(e).__name__}: {restore_reason(e)})") from None


def restore_reason(e: Exception) -> str:
  """The first line of a restore error, without TensorStore's pointer to its details (a pybind11 method repr).
  orbax's "Encountered error while reading array index: (slice(...), ...)" says neither which array nor why: the
  TensorStore error it wraps does ('Error reading "params...kernel/0.0" ...: Requested byte range ... is not valid
  for value of size 100')."""
  if str(e).startswith("Encountered error while reading") and e.__cause__ is not None:
    e = e.__cause__
  line = errors.first_line(e, limit=10_000).split(" See full TensorStore details")[0]
  return re.sub(r' in OCDBT database at local file "[^"]*"', "", line)[:300]  # the folder the message names already


def _late_read_error(e, tb) -> bool:
  """RuntimeError('Event loop is closed') raised by asyncio's closed-loop check, or a read error raised by orbax's
  array reader (a read coroutine that failed after the restore had): the innermost frame says which."""
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  if tb is None:
    return False
  code = tb.tb_frame.f_code
  if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
    return code.co_name == "_check_closed"
  return code.co_filename.replace(os.sep, "/").endswith("orbax/checkpoint/_src/serialization/serialization.py")


class _AbandonedReads(logging.Filter):
  """asyncio's report of a task that failed, or was left pending, after nobody waited for it any more: the other
  array reads of a restore that has already failed (each a traceback and TensorStore's whole spec)."""

  def filter(self, record: logging.LogRecord) -> bool:
    # asyncio names the object's class: "Task", "Future", "_GatheringFuture" (orbax gathers its reads); a read still
    # pending when its loop is collected is "Task was destroyed but it is pending!"
    first = str(record.msg).split("\n", 1)[0]
    return not (first.endswith(" exception was never retrieved") or first.startswith("Task was destroyed but it is"))


@contextlib.contextmanager
def quiet_late_reads() -> Iterator[None]:
  """Around a restore: where one read fails, the others still in flight fail around our one-line error, some before
  orbax raises, the rest after it: on the event loop orbax has closed ("Event loop is closed", through
  sys.unraisablehook, or sys.excepthook from a TensorStore thread), as read coroutines collected unfinished
  (sys.unraisablehook) or as tasks nobody awaits any more (asyncio's logger). Those, and only those, are dropped:
  from the restore's start, and after it only where it failed."""
  previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook
  abandoned = _AbandonedReads()

  def unraisable_hook(unraisable):
    if not _late_read_error(unraisable.exc_value, unraisable.exc_traceback):
      previous_unraisable(unraisable)

  def except_hook(kind, value, tb):
    if not _late_read_error(value, tb):
      previous_except(kind, value, tb)

  sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook
  logging.getLogger("asyncio").addFilter(abandoned)
  yield  # an exception propagates with the filters left in place: the late reads come after it
  sys.unraisablehook, sys.excepthook = previous_unraisable, previous_except
  logging.getLogger("asyncio").removeFilter(abandoned)


def _check_replaceable(dst: pathlib.Path) -> None:
  """Only a model directory (or an empty folder) is replaced: --overwrite pointed at a workdir or any other folder
  must not delete it."""
  if not dst.is_dir():
    raise CheckpointError(f"{dst}: exists and is not a folder; not replacing it: choose a new destination")
  entries = sorted(p.name for p in dst.iterdir())
  kind = None
  if entries == ["config.json", "variables"]:
    try:
      kind = json.loads((dst / "config.json").read_text()).get("kind")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
      kind = None
  if entries and kind not in ("clip", "clipreid"):
    listed = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    raise CheckpointError(f"{dst}: exists and is not a model directory (it holds {listed}); not replacing it: choose "
                          "a new destination")


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[pathlib.Path]:
  """Yields a staging directory that replaces `dst` only if the block finishes without error."""
  dst = pathlib.Path(dst).resolve()
  if dst.exists() and not overwrite:
    raise CheckpointError(f"{dst}: already exists; choose a new destination or pass --overwrite")
  if dst.exists():
    _check_replaceable(dst)
  try:
    dst.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:  # a file where a parent folder should be, no permission
    raise CheckpointError(f"{dst}: cannot create its folder {dst.parent} ({e.strerror or type(e).__name__})") from None
  stage = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
  stage.mkdir()
  try:
    yield stage
    if dst.exists():
      old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
      os.rename(dst, old)
      os.rename(stage, dst)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(stage, dst)
  finally:
    if stage.exists():
      shutil.rmtree(stage, ignore_errors=True)


def join_threads(threads: Callable[[], list], deadline: float) -> None:
  """Waits until no thread that `threads()` lists is alive, or the deadline. `threading.enumerate()` also lists
  threads still inside `start()`, which cannot be joined yet: they are waited for on the next round. Base
  `Thread.join`: orbax's own threads re-raise their errors from `join`, and those are reported already."""
  me = threading.current_thread()
  while time.time() < deadline:
    alive = [t for t in threads() if t is not me and (t.ident is None or t.is_alive())]
    if not alive:
      return
    for t in alive:
      if t.ident is None:  # still starting
        time.sleep(0.01)
      else:
        threading.Thread.join(t, max(0.0, deadline - time.time()))


def save_model_dir(dst: str | os.PathLike, variables: Any, config: dict, overwrite: bool = False) -> pathlib.Path:
  """Writes `config` (+ format version) and `variables` into `dst` atomically."""
  import jax
  variables = jax.tree.map(np.asarray, variables)
  with atomic_directory(dst, overwrite) as stage:
    ckptr = _checkpointer()
    before = set(threading.enumerate())
    try:
      ckptr.save(stage / "variables", variables)
      ckptr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  # tensorstore's full disk is a ValueError, not an OSError
      # orbax raises at the first failed item while its other writers may still be going: they finish before the
      # staging folder is removed.
      join_threads(lambda: [t for t in threading.enumerate() if t not in before], time.time() + 60)
      raise CheckpointError(f"cannot write the variables ({errors.io_cause(e)})") from None
    config = {"format_version": FORMAT_VERSION, **config}
    (stage / "config.json").write_text(json.dumps(config, indent=1, sort_keys=False) + "\n")
  return pathlib.Path(dst).resolve()
