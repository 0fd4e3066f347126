"""vehicleid with CLIP ViT-B/16 (the official VehicleID/vit yml).

Convert OpenAI's weights once (python -m clipreid_jax.convert clip ViT-B-16.pt converted/vit), put the
dataset under data/ (data/README.md gives the layout), then:

  python -m clipreid_jax.main --config configs/vehicleid_vit.py --config.init.clip=converted/vit
      paper: R1 85.3 / R5 97.6
  python -m clipreid_jax.main --config configs/vehicleid_vit.py:sie_olp --config.init.clip=converted/vit
      paper: R1 85.5 / R5 97.2 (OLP only: VehicleID's training set has one camera, so no SIE)
  python -m clipreid_jax.main --config configs/vehicleid_vit.py:baseline --config.init.clip=converted/vit
      paper: R1 84.2 / R5 96.6

The argument after ':' picks the variant (default: CLIP-ReID); see clipreid_jax/config_defaults.py.
"""
from clipreid_jax.config_defaults import VIT, official


def get_config(arg=None):
  return official("vehicleid", VIT, arg)
