"""Demo: synthetic Market-layout data, a small random CLIP, both stages and evaluation, minutes on a CPU.

  python -m clipreid_jax.main --config configs/demo.py

Expected: it writes a synthetic dataset under data/synthetic_market, trains and evaluates, and prints a
final line with mAP and R1. With random (not pretrained) CLIP weights the numbers show learning, not
the paper's accuracy.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "train"
  c.seed = 0
  c.workdir = "workdirs/demo"

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "synthetic"
  c.dataset.root = "data/synthetic_market"
  c.dataset.num_train_ids = 16
  c.dataset.num_test_ids = 8
  c.dataset.imgs_per_id = 6

  c.model = ml_collections.ConfigDict()
  c.model.backbone = "ViT-B-16"
  c.model.input_size = (64, 32)
  c.model.stride = 16
  c.model.sie_camera = False
  c.model.sie_view = False
  # A small random CLIP (no pretrained weights exist offline): width 128, 2 vision and 2 text blocks.
  c.model.random_clip = ml_collections.ConfigDict(dict(
      embed_dim=64, vision_layers=2, vision_width=128, text_width=128, text_layers=2))

  c.init = ml_collections.ConfigDict()
  c.init.clip = ""  # a converted CLIP directory; empty = the random CLIP above
  c.checkpoint = ""
  return c
