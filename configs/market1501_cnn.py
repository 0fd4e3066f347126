"""market1501 with CLIP RN50 (the official person/cnn yml).

Convert OpenAI's weights once (python -m clipreid_jax.convert clip RN50.pt converted/rn50), put the
dataset under data/ (data/README.md gives the layout), then:

  python -m clipreid_jax.main --config configs/market1501_cnn.py --config.init.clip=converted/rn50
      paper: mAP 89.8 / R1 95.7
  python -m clipreid_jax.main --config configs/market1501_cnn.py:baseline --config.init.clip=converted/rn50
      paper: mAP 88.1 / R1 94.7

The argument after ':' picks the variant (default: CLIP-ReID); see clipreid_jax/config_defaults.py.
"""
from clipreid_jax.config_defaults import RN50, official


def get_config(arg=None):
  return official("market1501", RN50, arg)
