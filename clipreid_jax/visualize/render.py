"""`render_all`: every picture of a finished run, for the trainer to call after its final evaluation."""
from __future__ import annotations

import os
import pathlib
from typing import Optional

import numpy as np

from clipreid_jax.data.records import ReidDataset


def rank_lists_of_model(model_dir: str | os.PathLike, dataset: ReidDataset, out_dir: str | os.PathLike,
                        num: int = 10, worst: bool = False, topk: int = 10, seed: int = 0, batch_size: int = 64,
                        features: Optional[tuple[np.ndarray, np.ndarray]] = None,
                        per_query_ap: Optional[np.ndarray] = None, flip: bool = False) -> list[pathlib.Path]:
  """Rank lists of a model directory on a dataset; features are extracted (test-time `flip` as in `eval.flip`)
  unless given as (query, gallery)."""
  from clipreid_jax.inference import FeatureExtractor
  from clipreid_jax.visualize import features as feats
  from clipreid_jax.visualize.ranks import render_rank_lists
  extractor = FeatureExtractor(model_dir, batch_size=batch_size, flip=flip)
  if features is None:
    features = feats.eval_features(extractor, dataset.query), feats.eval_features(extractor, dataset.gallery)
  qf, gf = features
  return render_rank_lists(dataset, qf, gf, out_dir, num=num, worst=worst, topk=topk, seed=seed,
                           input_size=extractor.input_size, per_query_ap=per_query_ap)


def render_all(workdir: str | os.PathLike, dataset: ReidDataset, out_dir: Optional[str | os.PathLike] = None, *,
               num_queries: int = 5, num_worst: int = 5, topk: int = 10, num_ids: int = 10, seed: int = 0,
               features: Optional[tuple[np.ndarray, np.ndarray]] = None,
               flip: bool = False) -> dict[str, list[pathlib.Path]]:
  """Rank lists (random and worst-AP queries), t-SNE and curves of the run in `workdir`.

  Writes out_dir (default WORKDIR/visualizations): ranks/query*.png, ranks/worst*.png, tsne.png, curves.png.
  `features` = (query, gallery) evaluation features of WORKDIR/model, when the caller has them, saves one
  extraction pass; otherwise they are extracted (test-time `flip` as in `eval.flip`). Run it on one process only
  (process 0): it reads and writes files.

  Returns:
    {'ranks': [...], 'tsne': [path], 'curves': [path]}.
  """
  from clipreid_jax.evaluation import evaluate
  from clipreid_jax.inference import FeatureExtractor
  from clipreid_jax.visualize import curves, embedding
  from clipreid_jax.visualize import features as feats
  from clipreid_jax.visualize.inputs import require_dir, require_model_dir
  from clipreid_jax.visualize.ranks import render_rank_lists
  workdir = require_dir(workdir, "workdir")
  out = pathlib.Path(out_dir) if out_dir is not None else workdir / "visualizations"
  model_dir = require_model_dir(workdir / "model", "workdir")
  extractor = FeatureExtractor(model_dir, flip=flip)
  if features is None:
    features = feats.eval_features(extractor, dataset.query), feats.eval_features(extractor, dataset.gallery)
  qf, gf = features
  q, g = dataset.query, dataset.gallery
  ap = evaluate(qf, gf, q.pids, g.pids, q.camids, g.camids).per_query_ap  # one evaluation for both choices
  ranks = []
  for worst, num in ((False, num_queries), (True, num_worst)):
    if num > 0:
      ranks += render_rank_lists(dataset, qf, gf, out / "ranks", num=num, worst=worst, topk=topk, seed=seed,
                                 input_size=extractor.input_size, per_query_ap=ap)
  tsne = embedding.render_tsne(workdir, dataset, out / "tsne.png", num_ids=num_ids, seed=seed)
  curve = curves.plot_curves(workdir, out / "curves.png")
  return {"ranks": ranks, "tsne": [tsne], "curves": [curve]}
