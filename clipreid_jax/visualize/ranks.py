"""Rank lists: a query and its nearest gallery images, framed green (same identity) or red, as PNGs (PIL only).

The ranking is the evaluation protocol's: L2-normalised features, squared Euclidean distance, gallery entries of
the query's identity seen by the query's camera removed, ties broken by gallery index (as `evaluation.evaluate`).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clipreid_jax.data.records import ReidDataset

MATCH_COLOR = (0, 160, 60)
MISMATCH_COLOR = (220, 30, 30)
QUERY_COLOR = (40, 90, 220)
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)


@dataclasses.dataclass(frozen=True)
class RankList:
  """The top of one query's ranking.

  Attributes:
    query: query index.
    gallery: (k,) gallery indices, nearest first, same-pid-same-camera entries removed.
    distances: (k,) squared Euclidean distances of the normalised features.
    matches: (k,) whether each entry shows the query's identity.
    ap: the query's average precision over the whole kept gallery (NaN: no true match left).
  """
  query: int
  gallery: np.ndarray
  distances: np.ndarray
  matches: np.ndarray
  ap: float


def _normalized(x) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def rank_lists(qf, gf, q_pids, g_pids, q_camids, g_camids, queries: Sequence[int], topk: int = 10) -> list[RankList]:
  """Rank lists of the chosen queries (only their distance rows are computed)."""
  from clipreid_jax.evaluation import euclidean_distance
  q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
  q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
  queries = np.asarray(queries, np.int64)
  if queries.size == 0:
    return []
  dist = euclidean_distance(_normalized(np.asarray(qf)[queries]), _normalized(gf))
  out = []
  for row, q in zip(dist, queries):
    order = np.argsort(row, kind="stable")
    keep = ~((g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q]))
    order = order[keep]
    hits = g_pids[order] == q_pids[q]
    if hits.any():
      precision = np.cumsum(hits) / np.arange(1, hits.size + 1)
      ap = float(precision[hits].mean())
    else:
      ap = float("nan")
    top = order[:topk]
    out.append(RankList(int(q), top, row[top], hits[:topk], ap))
  return out


def choose_queries(per_query_ap: np.ndarray, num: int, worst: bool = False, seed: int = 0) -> np.ndarray:
  """`num` queries with a true match: the lowest-AP ones (ties by index), or a seeded random pick in index order."""
  ap = np.asarray(per_query_ap, np.float64)
  valid = np.flatnonzero(np.isfinite(ap))
  if valid.size == 0:
    valid = np.arange(ap.size)
  num = min(num, valid.size)
  if worst:
    return valid[np.argsort(ap[valid], kind="stable")[:num]]
  return np.sort(np.random.default_rng(seed).choice(valid, num, replace=False))


# ------------------------------------------------------------------------------------------------------------------
# Drawing.


def _font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
    return ImageFont.load_default()


def _centered(draw: ImageDraw.ImageDraw, x: int, top: int, text: str, font) -> None:
  # Measured rather than anchored: text anchors need FreeType, the bitmap fallback font has none.
  left, _, right, _ = draw.textbbox((0, 0), text, font=font)
  draw.text((x - (right - left) // 2, top), text, fill=_TEXT, font=font)


@dataclasses.dataclass(frozen=True)
class RankLayout:
  """Where things go on a rank-list picture: a header line, then the query tile, a gap, and `topk` gallery tiles,
  each with its rank above and its distance and identity below. Boxes are (left, top, right, bottom), exclusive."""
  tile: tuple[int, int]  # (height, width) of every image
  topk: int
  margin: int = 6
  frame: int = 4
  gap: int = 22
  header: int = 20
  label: int = 14
  caption: int = 30

  @property
  def cell_width(self) -> int:
    return self.tile[1] + 2 * self.frame + self.margin

  @property
  def size(self) -> tuple[int, int]:
    width = self.margin + (self.topk + 1) * self.cell_width + self.gap
    height = self.header + self.label + self.tile[0] + 2 * self.frame + self.caption + self.margin
    return width, height

  def frame_box(self, k: int) -> tuple[int, int, int, int]:
    """The framed tile of the query (k = 0) or of the gallery entry at rank k (1-based)."""
    left = self.margin + k * self.cell_width + (self.gap if k > 0 else 0)
    top = self.header + self.label
    return left, top, left + self.tile[1] + 2 * self.frame, top + self.tile[0] + 2 * self.frame

  def image_box(self, k: int) -> tuple[int, int, int, int]:
    left, top, right, bottom = self.frame_box(k)
    f = self.frame
    return left + f, top + f, right - f, bottom - f


def tile_size(input_size: Sequence[int], height: int = 128) -> tuple[int, int]:
  """Tiles keep the model input's aspect ratio (persons 2:1, vehicles 1:1) at a fixed height."""
  h, w = input_size
  return height, max(8, round(height * w / h))


def distance_decimals(distances: np.ndarray) -> int:
  """Decimals that show the smallest positive distance with 3 significant digits (3 to 6)."""
  d = np.asarray(distances, np.float64)
  d = d[d > 0]
  if d.size == 0:
    return 3
  return int(np.clip(2 - np.floor(np.log10(d.min())), 3, 6))


def draw_rank_list(rank: RankList, query_image: Image.Image, gallery_images: Sequence[Image.Image],
                   query_label: tuple[int, int], gallery_labels: Sequence[tuple[int, int]],
                   tile: tuple[int, int] = (128, 64), topk: Optional[int] = None) -> Image.Image:
  """The rank-list picture. Labels are (pid, camid) pairs; camids are 0-based and shown 1-based."""
  layout = RankLayout(tile, topk or max(len(rank.gallery), 1))
  canvas = Image.new("RGB", layout.size, _BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  small, big = _font(11), _font(13)
  pid, cam = query_label
  ap = "no true match in the gallery" if not np.isfinite(rank.ap) else f"AP {100 * rank.ap:.1f}%"
  draw.text((layout.margin, 3), f"query {rank.query}: id {pid}, cam {cam + 1}  |  {ap}  |  "
            "green: same identity, red: another", fill=_TEXT, font=big)

  def tile_at(k: int, img: Image.Image, color, above: str, below: Sequence[str]) -> None:
    draw.rectangle(layout.frame_box(k), fill=color)
    left, top, right, bottom = layout.image_box(k)
    canvas.paste(img.convert("RGB").resize((right - left, bottom - top), Image.Resampling.BILINEAR), (left, top))
    fl, ft, fr, fb = layout.frame_box(k)
    _centered(draw, (fl + fr) // 2, ft - layout.label + 1, above, small)
    for i, line in enumerate(below):
      _centered(draw, (fl + fr) // 2, fb + 2 + 13 * i, line, small)

  decimals = distance_decimals(rank.distances)
  tile_at(0, query_image, QUERY_COLOR, "query", [f"id {pid}", f"cam {cam + 1}"])
  for k, (img, (gpid, gcam)) in enumerate(zip(gallery_images, gallery_labels), start=1):
    color = MATCH_COLOR if rank.matches[k - 1] else MISMATCH_COLOR
    tile_at(k, img, color, f"#{k}", [f"{rank.distances[k - 1]:.{decimals}f}", f"id {gpid} c{gcam + 1}"])
  sep = layout.frame_box(1)[0] - layout.gap // 2 - layout.margin // 2
  draw.line([(sep, layout.header + layout.label), (sep, layout.frame_box(0)[3])], fill=(160, 160, 160), width=2)
  return canvas


def render_rank_lists(dataset: ReidDataset, qf: np.ndarray, gf: np.ndarray, out_dir: str | os.PathLike,
                      num: int = 10, worst: bool = False, topk: int = 10, seed: int = 0,
                      input_size: Sequence[int] = (256, 128), queries: Optional[Sequence[int]] = None,
                      per_query_ap: Optional[np.ndarray] = None, prefix: Optional[str] = None) -> list[pathlib.Path]:
  """Writes one PNG per chosen query to out_dir; returns their paths.

  Queries are `queries` if given, else `num` of them with a true match: the worst by AP with `worst`, else a
  seeded random choice. `per_query_ap` (from `evaluation.evaluate`) saves re-evaluating when already known.
  """
  from clipreid_jax.visualize.features import split_images
  q, g = dataset.query, dataset.gallery
  if queries is None:
    if per_query_ap is None:
      from clipreid_jax.evaluation import evaluate
      per_query_ap = evaluate(qf, gf, q.pids, g.pids, q.camids, g.camids).per_query_ap
    queries = choose_queries(per_query_ap, num, worst=worst, seed=seed)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tile = tile_size(input_size)
  prefix = prefix or ("worst" if worst else "query")
  written = []
  for order, rank in enumerate(rank_lists(qf, gf, q.pids, g.pids, q.camids, g.camids, queries, topk=topk)):
    picture = draw_rank_list(rank, split_images(q, [rank.query])[0], split_images(g, rank.gallery),
                             (int(q.pids[rank.query]), int(q.camids[rank.query])),
                             [(int(g.pids[i]), int(g.camids[i])) for i in rank.gallery], tile=tile, topk=topk)
    path = out / f"{prefix}{order:02d}_q{rank.query:05d}.png"
    picture.save(path, optimize=True)
    written.append(path)
  return written
