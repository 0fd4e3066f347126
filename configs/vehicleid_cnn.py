"""vehicleid with CLIP RN50 (the official VehicleID/cnn yml).

Convert OpenAI's weights once (python -m clipreid_jax.convert clip RN50.pt converted/rn50), put the
dataset under data/ (data/README.md gives the layout), then:

  python -m clipreid_jax.main --config configs/vehicleid_cnn.py --config.init.clip=converted/rn50
      paper: R1 85.2 / R5 97.1
  python -m clipreid_jax.main --config configs/vehicleid_cnn.py:baseline --config.init.clip=converted/rn50
      paper: R1 84.4 (R5 not reported)

The argument after ':' picks the variant (default: CLIP-ReID); see clipreid_jax/config_defaults.py.
"""
from clipreid_jax.config_defaults import RN50, official


def get_config(arg=None):
  return official("vehicleid", RN50, arg)
