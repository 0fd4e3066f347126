"""Pictures of a run: rank lists, a t-SNE of image and text features, training curves.

    python -m clipreid_jax.visualize ranks --checkpoint WORKDIR/model --out DIR [--num 10] [--worst]
    python -m clipreid_jax.visualize tsne --workdir WORKDIR --out DIR
    python -m clipreid_jax.visualize curves --workdir WORKDIR --out FILE.png
    python -m clipreid_jax.visualize all --workdir WORKDIR [--out DIR]

    from clipreid_jax.visualize import render_all
    render_all(workdir, dataset)          # WORKDIR/visualizations/{ranks/*.png, tsne.png, curves.png}

Modules: `ranks` (rank lists, PIL), `tsne` (exact t-SNE in numpy), `embedding` (the t-SNE figure), `curves`
(metrics.jsonl plots), `features` (features of split images), `inputs` (workdirs, datasets, errors), `render`
(`render_all`). matplotlib draws the t-SNE and the curves (Agg, through `matplotlib.figure.Figure`, never pyplot).
Names are imported on first use, so the CLI reports bad arguments without importing JAX.
"""
import importlib

_LAZY = {
    "render_all": "render", "rank_lists_of_model": "render", "RankList": "ranks", "rank_lists": "ranks",
    "draw_rank_list": "ranks", "render_rank_lists": "ranks", "choose_queries": "ranks",
    "TSNEOptions": "tsne", "render_tsne": "embedding", "plot_curves": "curves", "VisualizeError": "inputs",
}


def __getattr__(name: str):
  if name in _LAZY:
    module = importlib.import_module(f"clipreid_jax.visualize.{_LAZY[name]}")
    return getattr(module, name)
  raise AttributeError(f"module 'clipreid_jax.visualize' has no attribute {name!r}")


__all__ = list(_LAZY)
