"""dukemtmc with CLIP ViT-B/16 (the official person/vit yml).

Convert OpenAI's weights once (python -m clipreid_jax.convert clip ViT-B-16.pt converted/vit), put the
dataset under data/ (data/README.md gives the layout), then:

  python -m clipreid_jax.main --config configs/dukemtmc_vit.py --config.init.clip=converted/vit
      paper: mAP 82.5 / R1 90.0
  python -m clipreid_jax.main --config configs/dukemtmc_vit.py:sie_olp --config.init.clip=converted/vit
      paper: mAP 83.1 / R1 90.8
  python -m clipreid_jax.main --config configs/dukemtmc_vit.py:baseline --config.init.clip=converted/vit
      paper: mAP 80.0 / R1 88.8

The argument after ':' picks the variant (default: CLIP-ReID); see clipreid_jax/config_defaults.py.
"""
from clipreid_jax.config_defaults import VIT, official


def get_config(arg=None):
  return official("dukemtmc", VIT, arg)
