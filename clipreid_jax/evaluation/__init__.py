"""Evaluation: ReID metrics (CMC, mAP, mINP), k-reciprocal re-ranking and the VehicleID protocol.

- `evaluate`: chunked, on-device CMC / mAP / mINP of query vs gallery features (official protocol);
- `eval_func`: the official algorithm on a full distance matrix in numpy (reference);
- `re_ranking` / `evaluate_reranked`: scalable k-reciprocal re-ranking; `re_ranking_exact`: the dense official
  emulation (reference);
- `vehicleid_trials`: VehicleID's averaged random-gallery protocol.
"""
from clipreid_jax.evaluation.metrics import (EvalResult, MAX_RANK, euclidean_distance, eval_func, evaluate,
                                             evaluate_distmat, evaluate_rows, l2_normalize)
from clipreid_jax.evaluation.rerank import Reranked, evaluate_reranked, re_ranking
from clipreid_jax.evaluation.rerank_exact import re_ranking_exact
from clipreid_jax.evaluation.vehicleid import VehicleIDResult, split_gallery, vehicleid_trials
