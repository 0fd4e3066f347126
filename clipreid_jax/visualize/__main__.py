"""python -m clipreid_jax.visualize {ranks,tsne,curves,all} ...: pictures of a run (see the package docstring).

--dataset/--root/--packed_dir default to the dataset the run was trained on (WORKDIR/config.json; for `ranks`, the
workdir holding --checkpoint), read as the trainer reads it: its packed copy where it trained on one. Bad input
ends with one line on stderr naming the path or option, and exit code 2.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Optional, Sequence


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m clipreid_jax.visualize", description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="command", required=True)

  def dataset_args(s):
    s.add_argument("--dataset", help="dataset name (default: the one the run was trained on)")
    s.add_argument("--root", help="dataset root, read instead of a packed copy (default: the run's)")
    s.add_argument("--packed_dir", metavar="DIR", help="read the dataset's packed copy in DIR (python -m "
                   "clipreid_jax.data.prepare ... --data_dir DIR) instead of its root (default: the run's, if any)")
    s.add_argument("--seed", type=int, default=0, help="seeds the random choices")

  r = sub.add_parser("ranks", help="rank lists: a query and its top gallery images, green = same identity")
  r.add_argument("--checkpoint", required=True, help="model directory (e.g. WORKDIR/model)")
  r.add_argument("--out", required=True, help="output folder (one PNG per query)")
  r.add_argument("--num", type=int, default=10, help="queries to draw")
  r.add_argument("--worst", action="store_true", help="the queries of lowest AP instead of random ones")
  r.add_argument("--topk", type=int, default=10, help="gallery images per query")
  r.add_argument("--batch-size", type=int, default=64, help="feature extraction batch")
  r.add_argument("--flip", action="store_true", help="test-time flip, as --config.eval.flip=True")
  dataset_args(r)

  t = sub.add_parser("tsne", help="t-SNE of image (dots) and text (pentagons) features after stages 1 and 2")
  t.add_argument("--workdir", required=True, help="training workdir (uses stage1/ and model/)")
  t.add_argument("--out", required=True, help="output folder (writes tsne.png)")
  t.add_argument("--ids", type=int, default=10, help="training identities to show")
  dataset_args(t)

  c = sub.add_parser("curves", help="losses, learning rate and evaluation metrics per epoch")
  c.add_argument("--workdir", required=True, help="training workdir (reads metrics.jsonl)")
  c.add_argument("--out", required=True,
                 help="output PNG file (.png added to a name without a suffix), or a folder: writes curves.png there")

  a = sub.add_parser("all", help="all of the above into one folder (what the trainer writes)")
  a.add_argument("--workdir", required=True, help="training workdir")
  a.add_argument("--out", help="output folder (default: WORKDIR/visualizations)")
  a.add_argument("--num", type=int, default=5, help="random queries, and as many worst-AP queries")
  a.add_argument("--flip", action="store_true", help="test-time flip, as --config.eval.flip=True")
  dataset_args(a)
  return p


def _positive(name: str, value: int) -> None:
  from clipreid_jax.visualize.inputs import VisualizeError
  if value < 1:
    raise VisualizeError(f"{name}: expected a positive number, got {value}")


def run(args: argparse.Namespace) -> list[pathlib.Path]:
  from clipreid_jax.visualize import inputs
  if args.command == "curves":
    from clipreid_jax.visualize.curves import plot_curves
    return [plot_curves(args.workdir, args.out)]
  if args.command == "ranks":
    _positive("--num", args.num)
    _positive("--topk", args.topk)
    _positive("--batch-size", args.batch_size)
    model_dir = inputs.require_model_dir(args.checkpoint, "--checkpoint")
    dataset = inputs.dataset_for(args.dataset, args.root, model_dir.resolve().parent, args.packed_dir)
    from clipreid_jax.visualize.render import rank_lists_of_model
    return rank_lists_of_model(model_dir, dataset, args.out, num=args.num, worst=args.worst, topk=args.topk,
                               seed=args.seed, batch_size=args.batch_size, flip=args.flip)
  if args.command == "all":
    _positive("--num", args.num)
  workdir = inputs.require_dir(args.workdir, "--workdir")
  dataset = inputs.dataset_for(args.dataset, args.root, workdir, args.packed_dir)
  if args.command == "tsne":
    _positive("--ids", args.ids)
    from clipreid_jax.visualize.embedding import render_tsne
    return [render_tsne(workdir, dataset, pathlib.Path(args.out) / "tsne.png", num_ids=args.ids, seed=args.seed)]
  from clipreid_jax.visualize.render import render_all
  written = render_all(workdir, dataset, args.out, num_queries=args.num, num_worst=args.num, seed=args.seed,
                       flip=args.flip)
  return [p for paths in written.values() for p in paths]


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parser().parse_args(argv)
  from clipreid_jax.checkpoints import CheckpointError
  from clipreid_jax.data.errors import DataError, warnings_as_lines
  from clipreid_jax.visualize.inputs import VisualizeError
  try:
    with warnings_as_lines():
      written = run(args)
  except (VisualizeError, DataError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for path in written:
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
