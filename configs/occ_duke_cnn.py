"""occ_duke with CLIP RN50 (the official person/cnn yml).

Convert OpenAI's weights once (python -m clipreid_jax.convert clip RN50.pt converted/rn50), put the
dataset under data/ (data/README.md gives the layout), then:

  python -m clipreid_jax.main --config configs/occ_duke_cnn.py --config.init.clip=converted/rn50
      paper: mAP 53.5 / R1 61.0
  python -m clipreid_jax.main --config configs/occ_duke_cnn.py:baseline --config.init.clip=converted/rn50
      paper: mAP 47.4 / R1 54.2

The argument after ':' picks the variant (default: CLIP-ReID); see clipreid_jax/config_defaults.py.
"""
from clipreid_jax.config_defaults import RN50, official


def get_config(arg=None):
  return official("occ_duke", RN50, arg)
