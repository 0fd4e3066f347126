"""market1501 with CLIP ViT-B/16 (the official person/vit yml).

Convert OpenAI's weights once (python -m clipreid_jax.convert clip ViT-B-16.pt converted/vit), put the
dataset under data/ (data/README.md gives the layout), then:

  python -m clipreid_jax.main --config configs/market1501_vit.py --config.init.clip=converted/vit
      paper: mAP 89.6 / R1 95.5
  python -m clipreid_jax.main --config configs/market1501_vit.py:sie_olp --config.init.clip=converted/vit
      paper: mAP 90.5 / R1 95.4
  python -m clipreid_jax.main --config configs/market1501_vit.py:baseline --config.init.clip=converted/vit
      paper: mAP 86.4 / R1 93.3

The argument after ':' picks the variant (default: CLIP-ReID); see clipreid_jax/config_defaults.py.
"""
from clipreid_jax.config_defaults import VIT, official


def get_config(arg=None):
  return official("market1501", VIT, arg)
