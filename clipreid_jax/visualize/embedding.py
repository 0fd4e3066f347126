"""t-SNE of image features (dots) and text features (pentagons) of a few training identities, as the paper's
Figure 1: one panel after stage 1 (WORKDIR/stage1) and one after stage 2 (WORKDIR/model).

Image features are the projected ones (`stage1_feature`), which share the text features' space; both are
L2-normalised before the joint t-SNE. Each panel is its own t-SNE run (the layouts are not aligned).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Optional, Sequence

import numpy as np

from clipreid_jax.data.records import ReidDataset, Split
from clipreid_jax.visualize import tsne as tsne_lib


@dataclasses.dataclass(frozen=True)
class IdentitySample:
  """Which training images a t-SNE shows: `labels` (k,) identities, and `indices` of their images with `owner`,
  the position in `labels` of each image's identity."""
  labels: np.ndarray
  indices: np.ndarray
  owner: np.ndarray


def sample_identities(split: Split, num_ids: int = 10, max_per_id: int = 40, seed: int = 0) -> IdentitySample:
  """`num_ids` random identities of `split` (sorted) and up to `max_per_id` random images of each (index order)."""
  pids = np.asarray(split.pids)
  rng = np.random.default_rng(seed)
  uniq = np.unique(pids)
  labels = np.sort(rng.choice(uniq, min(num_ids, uniq.size), replace=False))
  indices, owner = [], []
  for k, label in enumerate(labels):
    own = np.flatnonzero(pids == label)
    if own.size > max_per_id:
      own = np.sort(rng.choice(own, max_per_id, replace=False))
    indices.append(own)
    owner.append(np.full(own.size, k))
  return IdentitySample(labels, np.concatenate(indices), np.concatenate(owner))


@dataclasses.dataclass(frozen=True)
class Panel:
  """One t-SNE layout: 2-D image points coloured by `owner`, text points (one per identity) or None."""
  title: str
  image_xy: np.ndarray
  owner: np.ndarray
  text_xy: Optional[np.ndarray]


def embed_model(model_dir: str | os.PathLike, split: Split, sample: IdentitySample, title: str,
                options: tsne_lib.TSNEOptions = tsne_lib.TSNEOptions()) -> Panel:
  """Features of the sample from one model directory, laid out by t-SNE."""
  from clipreid_jax.models.clipreid import load_clipreid
  from clipreid_jax.visualize import features
  model, variables = load_clipreid(model_dir)
  image = features.l2_normalize(features.projected_features(model, variables, split, sample.indices))
  points = image
  text = None
  if model.config.with_text:  # a baseline model has no text side: dots only
    text = features.l2_normalize(features.text_features(model, variables, sample.labels))
    points = np.concatenate([image, text])
  xy = tsne_lib.tsne(points, options)
  n = image.shape[0]
  return Panel(title, xy[:n], sample.owner, None if text is None else xy[n:])


def plot_panels(panels: Sequence[Panel], labels: Sequence[int], out: str | os.PathLike,
                caption: str = "") -> pathlib.Path:
  """Side-by-side t-SNE panels in one PNG; colours follow the identities across panels."""
  from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
  from matplotlib.lines import Line2D
  from clipreid_jax.visualize.inputs import save_figure
  colors = _identity_colors(len(labels))
  fig = Figure(figsize=(4.2 * len(panels) + 1.6, 4.4), dpi=90)
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, panel in zip(axes, panels):
    ax.scatter(panel.image_xy[:, 0], panel.image_xy[:, 1], c=colors[panel.owner], s=14, alpha=0.85,
               linewidths=0)
    if panel.text_xy is not None:
      ax.scatter(panel.text_xy[:, 0], panel.text_xy[:, 1], c=colors[:len(panel.text_xy)], marker="p", s=190,
                 edgecolors="black", linewidths=1.0)
    ax.set_title(panel.title, fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
  handles = [Line2D([], [], color=colors[k], marker="o", linestyle="", markersize=6, label=f"id {label}")
             for k, label in enumerate(labels)]
  handles += [Line2D([], [], color="gray", marker="o", linestyle="", markersize=5, label="image"),
              Line2D([], [], color="gray", marker="p", markeredgecolor="black", linestyle="", markersize=10,
                     label="text")]
  fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
  if caption:
    fig.suptitle(caption, fontsize=10)
  fig.tight_layout(rect=(0, 0, 1 - 1.4 / fig.get_figwidth(), 1))
  return save_figure(fig, out, "--out")


def _identity_colors(n: int) -> np.ndarray:
  """(n, 4) RGBA: tab10 for up to 10 identities, then evenly spaced hues."""
  from matplotlib import colormaps
  if n <= 10:
    return colormaps["tab10"](np.arange(n))
  return colormaps["hsv"](np.arange(n) / n)


def tsne_stages(workdir: str | os.PathLike) -> list[tuple[pathlib.Path, str]]:
  """(model directory, panel title) of WORKDIR/stage1 and WORKDIR/model, those present; VisualizeError if none."""
  from clipreid_jax.visualize.inputs import VisualizeError
  workdir = pathlib.Path(workdir)
  stages = [(workdir / "stage1", "after stage 1 (prompts learned)"),
            (workdir / "model", "after stage 2 (image encoder tuned)")]
  stages = [(d, t) for d, t in stages if (d / "config.json").is_file()]
  if not stages:
    raise VisualizeError(f"--workdir: {workdir} holds neither stage1/ nor model/ (a model directory)")
  return stages


def render_tsne(workdir: str | os.PathLike, dataset: ReidDataset, out: str | os.PathLike, num_ids: int = 10,
                max_per_id: int = 40, seed: int = 0) -> pathlib.Path:
  """WORKDIR/stage1 and WORKDIR/model (those present) as t-SNE panels of `num_ids` training identities."""
  from clipreid_jax.visualize.inputs import output_anchor
  stages = tsne_stages(workdir)
  output_anchor(pathlib.Path(out).parent, "--out")  # a bad destination fails before the t-SNE
  sample = sample_identities(dataset.train, num_ids, max_per_id, seed)
  options = tsne_lib.TSNEOptions(seed=seed)
  panels = [embed_model(d, dataset.train, sample, t, options) for d, t in stages]
  caption = f"{dataset.name}: {len(sample.labels)} training identities, {len(sample.indices)} images"
  return plot_panels(panels, sample.labels, out, caption)
