"""Entry point.

  python -m clipreid_jax.main --config CONFIG [--workdir DIR] [--config.KEY=VALUE ...]

Modes (`--config.mode`): `train` (stage 1, stage 2, final evaluation), `eval` (a model directory given by
`--config.checkpoint` on a dataset), `extract` (features of a folder or list of images). Bad input ends
with one line on stderr naming the file or key, and exit code 2.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and outputs (default: config.workdir; "
                                "for mode=eval config.workdir + '_eval').")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-host: address of process 0 (see docs); on TPU pods leave unset.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host with --coordinator_address: hosts in all.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host with --coordinator_address: this host's index.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Check the config (keys, types, values), print it and exit.")


# The cache's size bound (least recently used entries go first; the CPU demo writes 1.2 MB).
COMPILATION_CACHE_MAX_BYTES = 4 * 2**30


def use_compilation_cache(setting: str, multi_host: bool = False) -> str | None:
  """Points JAX's persistent compilation cache at `setting` ('auto': $XDG_CACHE_HOME/clipreid_jax/jax, by default
  ~/.cache/clipreid_jax/jax, and off for a multi-host run; '': off) unless JAX_COMPILATION_CACHE_DIR is set; returns
  the folder in use, or None.

  Why: a resumed run, an evaluation of a trained model or a second run of the same recipe compiles the same programs
  again (tens of seconds for a ViT-B/16 step on a GPU; the CPU demo's second run takes 24 s instead of 34). JAX
  writes executables that took over a second to compile (from process 0) and reads them back by their program. On
  a GPU a read-back executable also keeps the autotuner's kernel choices, so a resumed run computes with the same
  kernels. A folder that cannot be created leaves the cache off, with a warning: the run does not need it.
  Several hosts: JAX writes from process 0 only, so a folder of each host's own would give process 0 its programs
  back while the others compile (and on GPUs autotune, which XLA may share across processes) alone. 'auto' is
  therefore off there; a folder that every host shares, named explicitly, is used.
  Must be called before the process compiles anything (JAX decides at its first compilation).
  """
  import importlib.util
  import jax
  if jax.config.jax_compilation_cache_dir:  # JAX_COMPILATION_CACHE_DIR (or the caller) chose already
    return jax.config.jax_compilation_cache_dir
  if not setting:
    return None
  if setting == "auto" and multi_host:
    logging.info("compilation_cache: off for a multi-host run (--config.compilation_cache=DIR on a shared filesystem "
                 "turns it on)")
    return None
  if setting == "auto":
    setting = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "clipreid_jax", "jax")
  path = os.path.abspath(os.path.expanduser(setting))
  try:
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
      raise PermissionError(f"{path} is not writable")
  except OSError as e:
    logging.warning("compilation_cache: cannot use %s (%s); compiling without the cache", path, e)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  # The size bound needs filelock (a dependency; GPU images may lack it); a bound the user set stays.
  if importlib.util.find_spec("filelock") is not None and jax.config.jax_compilation_cache_max_size == -1:
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)
  return path


def run(config, workdir: str) -> int:
  import jax
  from clipreid_jax import inference, train
  if _DRY_RUN.value:  # every key, then the checks a real run makes before it reads or writes anything
    shown = config.copy_and_resolve_references()
    shown.workdir = workdir  # the one the run would use (--workdir, or the mode's default)
    print(shown.to_json_best_effort(indent=1, sort_keys=True), flush=True)
    train.validate_config(config)
    if config.mode in ("train", "eval"):  # the batches against this machine's devices, as the run checks them
      train.check_batch("eval.batch_size", config.eval.batch_size)
    if config.mode == "train":
      s = config.stage2
      train.check_batch("stage2.num_ids * stage2.num_instances", s.num_ids * s.num_instances)
      train.check_init_stage1(config, workdir)
      train.Run(workdir, config)  # refuses another configuration's workdir, or an evaluation's
    elif config.mode == "eval":
      inference.check_eval_workdir(workdir)
    print(f"config OK: mode {config.mode}, workdir {workdir}", flush=True)
    return 0
  train.validate_config(config)  # before anything is started, read or written
  use_compilation_cache(config.get("compilation_cache", "auto"),
                        multi_host=_DISTRIBUTED.value or bool(_COORDINATOR.value))
  if _DISTRIBUTED.value or _COORDINATOR.value:
    # Cross-process collectives of the CPU backend (tests, CPU clusters) need gloo; GPU and TPU ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if _COORDINATOR.value:  # explicit; otherwise JAX discovers Cloud TPU pods and SLURM jobs itself
      kwargs = dict(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                    process_id=_PROCESS_ID.value)
    jax.distributed.initialize(**kwargs)
  mode = config.mode
  if mode == "train":
    train.train_and_evaluate(config, workdir)
    if config.visualize and jax.process_index() == 0:
      render_pictures(config, workdir)
  elif mode == "eval":
    inference.evaluate_checkpoint(config, workdir, overrides=_overridden_keys())
  elif mode == "extract":
    inference.extract_to_files(config, overrides=_overridden_keys())
  else:
    raise train.ConfigError(f"mode: expected 'train', 'eval' or 'extract', got {mode!r}")
  return 0


# Paths the shell leaves as "~/..." after `--config.KEY=` (it expands a leading ~ only): a run trained into ./~/...
# (The workdir, from --workdir or config.workdir, is expanded where main picks it.)
_PATH_KEYS = ("dataset.root", "dataset.packed_dir", "dataset.keypoint_dir", "init.clip", "init.stage1", "checkpoint",
              "extract.input", "extract.output")


def _expand_home(config) -> None:
  for key in _PATH_KEYS:
    section, _, name = key.rpartition(".")
    node = config[section] if section else config
    if isinstance(node[name], str) and node[name].startswith("~"):
      node[name] = os.path.expanduser(node[name])


def _overridden_keys() -> frozenset:
  """The config keys set on the command line (`--config.KEY=VALUE`), as opposed to the recipe's values."""
  return frozenset(config_flags.get_override_values(flags.FLAGS["config"]))


def default_workdir(config) -> str:
  # An evaluation must not write its metrics.json over the training run of the same recipe.
  return f"{config.workdir}_eval" if config.get("mode", "train") == "eval" else config.workdir


def render_pictures(config, workdir: str) -> None:
  """Pictures of a finished run; a plotting failure must not fail a run that trained for hours."""
  from clipreid_jax import train
  from clipreid_jax.visualize import render_all
  try:
    render_all(workdir, train.load_dataset(config, everywhere=False), flip=config.eval.flip)
    print(f"pictures: {workdir}/visualizations/", flush=True)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("could not render the pictures: %s: %s", type(e).__name__, e)


def _orbax_without_traceback(record: logging.LogRecord) -> bool:
  """orbax logs each failed writer thread's error with its whole traceback (60 lines each on a full disk) before it
  raises the error, which the run then reports in one line: its log lines are kept, the tracebacks dropped."""
  if record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname:
    record.exc_info, record.exc_text = None, None
  return True


def stderr_line(text: str) -> None:
  """One line on stderr in one write: print() writes the text and its newline separately, and output that other
  threads or libraries write to the same stream in between (gloo's, on several hosts) would land inside the line."""
  sys.stderr.write(text + "\n")
  sys.stderr.flush()


def main(argv):
  if len(argv) > 1:
    stderr_line(f"error: unexpected arguments {argv[1:]}")
    return 2
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("absl").addFilter(_orbax_without_traceback)
  config = _CONFIG.value
  if config is None:
    if flags.FLAGS["config"].present:
      stderr_line(f"error: --config={flags.FLAGS['config'].config_filename}: get_config() returned None; expected a "
                  "ConfigDict")
    else:
      stderr_line("error: --config is required, e.g. --config configs/demo.py")
    return 2
  from clipreid_jax import config_defaults
  try:
    config_defaults.check_keys(config)
  except ValueError as e:
    stderr_line(f"error: --config={flags.FLAGS['config'].config_filename}: {e}")
    return 2
  from clipreid_jax import host_memory
  host_memory.keep_step_buffers_mapped()  # before JAX starts its backend
  if config.get("mode", "train") in ("eval", "extract"):
    host_memory.no_device_preallocation()  # ~2-4 GB less host memory on a GPU machine
  from clipreid_jax.checkpoints import CheckpointError
  from clipreid_jax.data.errors import DataError, DataWarning
  from clipreid_jax.workdir import ConfigError, TrainingStopped
  show = warnings.showwarning

  def one_line(message, category, *args, **kwargs):  # data warnings read like the errors: one line each
    if issubclass(category, DataWarning):
      stderr_line(f"warning: {message}")
    else:
      show(message, category, *args, **kwargs)

  warnings.showwarning = one_line
  try:
    _expand_home(config)
    return run(config, os.path.expanduser(_WORKDIR.value or default_workdir(config)))
  except (ConfigError, DataError, CheckpointError) as e:
    stderr_line(f"error: {e}")
    return 2
  except TrainingStopped as e:  # non-finite loss, failed save: the last good checkpoint is kept
    stderr_line(f"error: {e}")
    return 1
  except Exception as e:  # pylint: disable=broad-except
    if not _out_of_device_memory(e):
      raise
    # XLA's message goes on with the allocator's state, many lines; its first line says how much was asked for.
    kept = "; the training checkpoints are kept" if config.get("mode", "train") == "train" else ""
    stderr_line(f"error: the device ran out of memory ({str(e).strip().splitlines()[0]}); expected more device memory "
                "or a smaller stage2.num_ids, stage1.batch_size, eval.batch_size or model.input_size (python "
                f"benchmarks/aot_report.py reports what a config needs per device){kept}")
    return 1
  except KeyboardInterrupt:  # a second Ctrl-C (the first saves and exits 130), or one outside training
    stderr_line("error: interrupted (Ctrl-C); rerun the same command to resume a training run")
    return 130


def _out_of_device_memory(e: Exception) -> bool:
  """XLA's out-of-memory error, at compilation (the program does not fit) or at run time (an allocation failed)."""
  import jax  # pylint: disable=g-import-not-at-top  # after host_memory's settings
  return isinstance(e, jax.errors.JaxRuntimeError) and str(e).lstrip().startswith("RESOURCE_EXHAUSTED")


# The line that starts a traceback's exception text ("ValueError: ...", "pkg.CustomError: ...").
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b")


def _config_error(e: Exception, argv) -> str:
  """The line for an error of loading the config file or applying an override, naming the file or the flag."""
  arg = e.args[0] if e.args else e
  # ml_collections raises AttributeError(KeyError("'base_lrr'\nDid you mean ...")) for a near miss: str() of a
  # KeyError is its repr, one line with the newline escaped.
  text = str(arg.args[0]) if isinstance(arg, KeyError) and arg.args else str(arg)
  overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
  config_file = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
  if config_file is None and "--config" in argv[1:-1]:
    config_file = argv[argv.index("--config") + 1]
  if isinstance(e, SyntaxError):
    return f"--config={config_file}: SyntaxError: {e}"
  if isinstance(e, AttributeError) and "get_config" in text:
    return (f"--config={config_file}: defines no get_config(); expected a function get_config() that returns a "
            "ConfigDict (as configs/demo.py)")
  if isinstance(e, (AttributeError, KeyError)):  # ml_collections: an override of a key the config lacks
    key, *hint = [line.strip() for line in text.splitlines()]  # KeyError("'stage3'\nDid you mean \"stage2\" ...")
    key = key.strip("\"'")
    flag = next((f for f in overrides if key in f.split(".")), None)
    if flag:
      hint = "".join(f"; {h[:1].lower()}{h[1:]}" for h in hint)
      return f"{flag}: unknown config key {key!r}{hint}; expected one of the keys in clipreid_jax/config_defaults.py"
  if isinstance(e, TypeError) and "indices must be" in text:  # --config.stage2.steps.x: a value indexed as a section
    flag = next((f for f in overrides if f.count(".") >= 3), None)
    if flag:
      return f"{flag}: {flag[len('--config.'):].rsplit('.', 1)[0]} is a value, not a section; expected a config key"
  return f"{type(e).__name__}: {e}"


def parse_flags(argv):
  """absl's parsing, but a bad flag, config file, key or value is one line on stderr and exit code 2."""
  try:
    rest = flags.FLAGS(argv)
    config = flags.FLAGS["config"].value
    if config is not None:
      config.get("mode")  # ml_collections defers a config file that failed to load to the first access
    return rest
  except flags.Error as e:
    message = str(e)
    given = [a.split("=")[0] for a in argv[1:]]
    if "--config" not in given and any(a.startswith("--config.") for a in given):  # absl: "Unknown ... flag"
      message = "--config is required for --config.KEY overrides, e.g. --config configs/demo.py --config.seed=1"
    elif "Traceback (most recent call last)" in message:  # an exception inside get_config: its own text is the news
      head = message.split(": Error whilst parsing config file", 1)[0]
      lines = message.strip().splitlines()
      last = max((i for i, l in enumerate(lines) if _EXCEPTION_LINE.match(l)), default=len(lines) - 1)
      message = f"{head}: {' '.join(lines[last:])}"
  except OSError as e:  # the config file: not found, not readable
    text = " ".join(str(e).split())
    message = f"--config: cannot load the config file: {text[text.find('[Errno'):] if '[Errno' in text else text}"
  except (AttributeError, KeyError, TypeError, ValueError, FileNotFoundError, SyntaxError) as e:
    message = _config_error(e, argv)
  except Exception as e:  # pylint: disable=broad-except  # anything else the config file raised (NameError, ...)
    message = f"--config: {type(e).__name__}: {e}"
  stderr_line(f"error: {' '.join(message.split())}")
  sys.exit(2)


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
