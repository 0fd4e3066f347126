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
  unless given as (query, gallery). The PNGs reach `out_dir` together at the end, or not at all on an error."""
  from clipreid_jax.inference import FeatureExtractor
  from clipreid_jax.visualize import features as feats
  from clipreid_jax.train import check_sie_fits
  from clipreid_jax.visualize.inputs import VisualizeError, require_valid_queries, staged_folder
  from clipreid_jax.visualize.ranks import render_rank_lists
  require_valid_queries(dataset)
  out = pathlib.Path(out_dir)
  with staged_folder(out, "--out") as stage:
    extractor = FeatureExtractor(model_dir, batch_size=batch_size, flip=flip)
    check_sie_fits(extractor.model.config, dataset, f"--checkpoint: {model_dir}",
                   f"dataset {dataset.name} (query under {dataset.query.root})", VisualizeError)
    if features is None:
      features = feats.eval_features(extractor, dataset.query), feats.eval_features(extractor, dataset.gallery)
    qf, gf = features
    written = render_rank_lists(dataset, qf, gf, stage, num=num, worst=worst, topk=topk, seed=seed,
                                input_size=extractor.input_size, per_query_ap=per_query_ap)
    return [out / p.relative_to(stage) for p in written]


def render_all(workdir: str | os.PathLike, dataset: ReidDataset, out_dir: Optional[str | os.PathLike] = None, *,
               num_queries: int = 5, num_worst: int = 5, topk: int = 10, num_ids: int = 10, seed: int = 0,
               features: Optional[tuple[np.ndarray, np.ndarray]] = None,
               flip: bool = False) -> dict[str, list[pathlib.Path]]:
  """Rank lists (random and worst-AP queries), t-SNE and curves of the run in `workdir`.

  Writes out_dir (default WORKDIR/visualizations): ranks/query*.png, ranks/worst*.png, tsne.png, curves.png.
  Every input the pictures need is checked before anything is computed, and the pictures are drawn into a
  staging folder that reaches out_dir only when all are done: an error leaves out_dir as it was.
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
  from clipreid_jax.train import check_sie_fits
  from clipreid_jax.visualize.inputs import (VisualizeError, require_dir, require_model_dir, require_valid_queries,
                                             staged_folder)
  from clipreid_jax.visualize.ranks import render_rank_lists
  workdir = require_dir(workdir, "--workdir")
  out = pathlib.Path(out_dir) if out_dir is not None else workdir / "visualizations"
  model_dir = require_model_dir(workdir / "model", "--workdir")
  tables = curves.curve_tables(workdir)  # before the long work: a bad metrics.jsonl fails first
  require_valid_queries(dataset)
  embedding.tsne_stages(workdir)
  with staged_folder(out, "--out") as stage:
    extractor = FeatureExtractor(model_dir, flip=flip)
    check_sie_fits(extractor.model.config, dataset, f"--workdir: {model_dir}",
                   f"dataset {dataset.name} (query under {dataset.query.root})", VisualizeError)
    if features is None:
      features = feats.eval_features(extractor, dataset.query), feats.eval_features(extractor, dataset.gallery)
    qf, gf = features
    q, g = dataset.query, dataset.gallery
    ap = evaluate(qf, gf, q.pids, g.pids, q.camids, g.camids).per_query_ap  # one evaluation for both choices
    ranks = []
    for worst, num in ((False, num_queries), (True, num_worst)):
      if num > 0:
        ranks += render_rank_lists(dataset, qf, gf, stage / "ranks", num=num, worst=worst, topk=topk, seed=seed,
                                   input_size=extractor.input_size, per_query_ap=ap)
    tsne = embedding.render_tsne(workdir, dataset, stage / "tsne.png", num_ids=num_ids, seed=seed)
    curve = curves.plot_curves(workdir, stage / "curves.png", tables)
    written = {"ranks": ranks, "tsne": [tsne], "curves": [curve]}
  return {k: [out / p.relative_to(stage) for p in paths] for k, paths in written.items()}
