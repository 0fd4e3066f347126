"""veri with CLIP ViT-B/16 (the official veri/vit yml).

Convert OpenAI's weights once (python -m clipreid_jax.convert clip ViT-B-16.pt converted/vit), put the
dataset under data/ (data/README.md gives the layout), then:

  python -m clipreid_jax.main --config configs/veri_vit.py --config.init.clip=converted/vit
      paper: mAP 83.3 / R1 97.4
  python -m clipreid_jax.main --config configs/veri_vit.py:sie_olp --config.init.clip=converted/vit
      paper: mAP 84.5 / R1 97.3 (SIE on camera x view, as the released VeRi checkpoint)
  python -m clipreid_jax.main --config configs/veri_vit.py:baseline --config.init.clip=converted/vit
      paper: mAP 79.3 / R1 95.7

The argument after ':' picks the variant (default: CLIP-ReID); see clipreid_jax/config_defaults.py.
"""
from clipreid_jax.config_defaults import VIT, official


def get_config(arg=None):
  return official("veri", VIT, arg)
