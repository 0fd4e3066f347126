"""What the demo runs until the trainer lands: a small random CLIP encodes synthetic images and texts.

Replaced by the two-stage trainer (issue 5); kept honest about what it does meanwhile.
"""
from __future__ import annotations

import time

import jax
import numpy as np

from clipreid_jax.models.clip import CLIP, CLIPConfig
from clipreid_jax.tokenizer import tokenize


def run(config, workdir: str) -> int:
  rc = config.model.random_clip
  h, w = config.model.input_size
  s = config.model.stride
  grid = ((h - 16) // s + 1, (w - 16) // s + 1)
  cfg = CLIPConfig(embed_dim=rc.embed_dim, vision_layers=rc.vision_layers, vision_width=rc.vision_width,
                   vision_stride=s, vision_grid=grid, text_width=rc.text_width, text_heads=rc.text_width // 64,
                   text_layers=rc.text_layers)
  model = CLIP(cfg)
  rng = jax.random.PRNGKey(config.seed)
  images = np.asarray(jax.random.normal(rng, (8, h, w, 3)))
  tokens = tokenize(["A photo of a X X X X person."] * 2)
  t0 = time.time()
  variables = model.init(rng, images, tokens)
  img = model.apply(variables, images, method=model.encode_image)
  txt = model.apply(variables, tokens, method=model.encode_text)
  print(f"random CLIP {cfg.vision_width}w/{cfg.vision_layers}L on {h}x{w}: image features {img.shape}, "
        f"text features {txt.shape} in {time.time() - t0:.1f}s")
  print("training and evaluation arrive with the trainer (issue 5); nothing else to run yet")
  return 0
