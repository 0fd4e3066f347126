"""Training curves from WORKDIR/metrics.jsonl: stage-1 losses, stage-2 loss components, learning rate, and
training accuracy with the evaluation metrics, per epoch, in one PNG.

Records are read as the trainer writes them; a resumed run logs the epochs after its checkpoint again, so the
last record of each (stage, epoch) wins, and a torn last line (a run killed mid-write) is skipped.
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
  records = []
  lines = path.read_text().splitlines()
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise VisualizeError(f"{path}: line {i + 1} is not JSON") from None
      warnings.warn(f"{path}: skipping a torn last line", stacklevel=2)
  return records


def by_epoch(records: list[dict]) -> tuple[dict[int, dict], dict[int, dict], Optional[dict]]:
  """(stage-1 records by epoch, stage-2 records by epoch, the last final record or None)."""
  stages: dict[int, dict[int, dict]] = {1: {}, 2: {}}
  final = None
  for r in records:
    if r.get("final"):
      final = r
    elif r.get("stage") in stages and "epoch" in r:
      stages[r["stage"]][int(r["epoch"])] = r
  return dict(sorted(stages[1].items())), dict(sorted(stages[2].items())), final


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


def plot_curves(workdir: str | os.PathLike, out: str | os.PathLike) -> pathlib.Path:
  """Writes the curves of the run in `workdir` to the PNG `out`."""
  from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
  from clipreid_jax.visualize.inputs import VisualizeError, require_dir
  workdir = require_dir(workdir, "--workdir")
  stage1, stage2, final = by_epoch(read_records(workdir / "metrics.jsonl"))
  if not stage1 and not stage2:
    raise VisualizeError(f"{workdir / 'metrics.jsonl'}: holds no epoch records")
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
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, facecolor="white")
  return out
