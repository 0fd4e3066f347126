"""msmt17 with CLIP ViT-B/16 (the official person/vit yml).

Convert OpenAI's weights once (python -m clipreid_jax.convert clip ViT-B-16.pt converted/vit), put the
dataset under data/ (data/README.md gives the layout), then:

  python -m clipreid_jax.main --config configs/msmt17_vit.py --config.init.clip=converted/vit
      paper: mAP 73.4 / R1 88.7
  python -m clipreid_jax.main --config configs/msmt17_vit.py:sie_olp --config.init.clip=converted/vit
      paper: mAP 75.8 / R1 89.7
  python -m clipreid_jax.main --config configs/msmt17_vit.py:baseline --config.init.clip=converted/vit
      paper: mAP 66.1 / R1 84.4

The argument after ':' picks the variant (default: CLIP-ReID); see clipreid_jax/config_defaults.py.
"""
from clipreid_jax.config_defaults import VIT, official


def get_config(arg=None):
  return official("msmt17", VIT, arg)
