"""Training curves from WORKDIR/metrics.jsonl: stage-1 losses, stage-2 loss components, learning rate, and
training accuracy with the evaluation metrics, per epoch, in one PNG.

Records are read as the trainer writes them; a resumed run logs the epochs after its checkpoint again, so the
last record of each (stage, epoch) wins, and a torn last line (a run killed mid-write), or a last line that is
JSON but not a record (not an object), is skipped with a warning; such a line elsewhere is an error.
"""
from __future__ import annotations

import json
import os
import pathlib
import warnings
from typing import Optional

# Per-epoch fields that are not loss values.
_NOT_LOSSES = frozenset({"stage", "epoch", "lr", "time_s", "images_per_s", "grad_norm", "accuracy"})


def read_records(path: str | os.PathLike) -> list[dict]:
  from clipreid_jax.visualize.inputs import VisualizeError
  path = pathlib.Path(path)
  if not path.is_file():
    raise VisualizeError(f"--workdir: {path} not found (written by training)")
  try:
    lines = path.read_text().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise VisualizeError(f"{path}: cannot read it as text ({type(e).__name__})") from None
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      problem = None if isinstance(record, dict) else "is not a JSON object"
    except json.JSONDecodeError:
      problem = "is not JSON"
    if problem is None:
      records.append(record)
    elif i != len(lines) - 1:
      raise VisualizeError(f"{path}: line {i + 1} {problem}")
    else:
      warnings.warn(f"{path}: skipping the last line, which {problem}", stacklevel=2)
  return records


def by_epoch(records: list[dict], where: str = "metrics.jsonl") -> tuple[dict[int, dict], dict[int, dict],
                                                                          Optional[dict]]:
  """(stage-1 records by epoch, stage-2 records by epoch, the last final record or None)."""
  from clipreid_jax.visualize.inputs import VisualizeError
  stages: dict[int, dict[int, dict]] = {1: {}, 2: {}}
  final = None
  for r in records:
    stage, epoch = r.get("stage"), r.get("epoch")
    if r.get("final"):
      final = r
    elif isinstance(stage, int) and stage in stages and "epoch" in r:  # isinstance: a list stage is unhashable
      if not isinstance(epoch, int) or isinstance(epoch, bool):
        raise VisualizeError(f"{where}: a stage-{stage} record has epoch {epoch!r}, expected an integer")
      stages[stage][epoch] = r
  return dict(sorted(stages[1].items())), dict(sorted(stages[2].items())), final


def curve_tables(workdir: str | os.PathLike) -> tuple[dict[int, dict], dict[int, dict], Optional[dict]]:
  """`by_epoch` of WORKDIR/metrics.jsonl; raises VisualizeError where it is missing or holds no epoch records."""
  from clipreid_jax.visualize.inputs import VisualizeError
  path = pathlib.Path(workdir) / "metrics.jsonl"
  stage1, stage2, final = by_epoch(read_records(path), str(path))
  if not stage1 and not stage2:
    raise VisualizeError(f"{path}: holds no epoch records")
  return stage1, stage2, final


def curves_path(out: str | os.PathLike) -> pathlib.Path:
  """Where `--out` writes: OUT/curves.png for a folder (existing, or given with a trailing slash), OUT.png for a
  name without a suffix (matplotlib would add it anyway), OUT for a .png name; any other suffix is an error."""
  from clipreid_jax.visualize.inputs import VisualizeError
  text = os.fspath(out)
  out = pathlib.Path(text)
  if out.is_dir() or text.endswith(("/", os.sep)):
    return out / "curves.png"
  if not out.suffix:
    return out.with_name(out.name + ".png")
  if out.suffix.lower() != ".png":
    raise VisualizeError(f"--out: expected a .png file or a folder, got {out}")
  return out


def _series(table: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
  pairs = [(e, float(r[key])) for e, r in table.items() if isinstance(r.get(key), (int, float))]
  return [e for e, _ in pairs], [v for _, v in pairs]


def _loss_keys(table: dict[int, dict]) -> list[str]:
  keys = {k for r in table.values() for k, v in r.items()
          if k not in _NOT_LOSSES and not k.startswith("eval_") and isinstance(v, (int, float))}
  return (["loss"] if "loss" in keys else []) + sorted(keys - {"loss"})


def _plot_losses(ax, table: dict[int, dict], title: str) -> None:
  from matplotlib.ticker import MaxNLocator
  ax.set_title(title, fontsize=10)
  if not table:
    ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes, color="gray")
    return
  for key in _loss_keys(table):
    x, y = _series(table, key)
    ax.plot(x, y, label=key, linewidth=2.2 if key == "loss" else 1.2, color="black" if key == "loss" else None)
  ax.set_xlabel("epoch")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.legend(fontsize=7, ncol=2)
  ax.grid(alpha=0.3)


def plot_curves(workdir: str | os.PathLike, out: str | os.PathLike,
                tables: Optional[tuple[dict[int, dict], dict[int, dict], Optional[dict]]] = None) -> pathlib.Path:
  """Writes the curves of the run in `workdir` to the PNG `out` (see `curves_path`); returns the path written.
  `tables`: `curve_tables(workdir)` where the caller has already read them."""
  from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
  from clipreid_jax.visualize.inputs import output_anchor, require_dir, save_figure
  workdir = require_dir(workdir, "--workdir")
  out = curves_path(out)
  output_anchor(out.parent, "--out")  # a bad destination fails before the drawing
  stage1, stage2, final = tables if tables is not None else curve_tables(workdir)
  fig = Figure(figsize=(11, 7.5), dpi=80)
  (a, b), (c, d) = fig.subplots(2, 2)
  _plot_losses(a, stage1, "stage 1 (prompt learning): losses")
  _plot_losses(b, stage2, "stage 2 (image encoder): losses")

  # Learning rate over both stages on one axis: stage-2 epochs follow the stage-1 ones.
  c.set_title("learning rate", fontsize=10)
  offset = max(stage1, default=0)
  for table, shift, name in ((stage1, 0, "stage 1"), (stage2, offset, "stage 2")):
    x, y = _series(table, "lr")
    if x:
      c.plot([e + shift for e in x], y, marker=".", label=name)
  if stage1 and stage2:
    c.axvline(offset + 0.5, color="gray", linestyle="--", linewidth=1)
  c.set_yscale("log")
  c.set_xlabel("epoch (stage 1, then stage 2)")
  c.legend(fontsize=8)
  c.grid(alpha=0.3, which="both")

  d.set_title("stage 2: training accuracy and evaluation (%)", fontsize=10)
  for key, label in (("accuracy", "train accuracy"), ("eval_mAP", "mAP"), ("eval_R1", "Rank-1")):
    x, y = _series(stage2, key)
    if x:
      d.plot(x, [100 * v for v in y], marker="o" if key != "accuracy" else None, markersize=4, label=label)
  if final is not None:
    last = max(stage2, default=0)
    for key, marker in (("mAP", "*"), ("R1", "^")):
      if isinstance(final.get(key), (int, float)):
        d.plot([last], [100 * final[key]], marker=marker, markersize=11, linestyle="",
               label=f"final {key} {100 * final[key]:.1f}")
  d.set_xlabel("epoch")
  d.set_ylim(0, 100)
  if d.lines:
    d.legend(fontsize=8)
  d.grid(alpha=0.3)
  fig.suptitle(f"{workdir.resolve().name}: metrics per epoch", fontsize=11)
  fig.tight_layout()
  return save_figure(fig, out, "--out")
