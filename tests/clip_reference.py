"""OpenAI's PyTorch CLIP (from the `openai-clip` package) with random weights, for parity tests.

The package's __init__ imports torchvision and pkg_resources; its model file needs neither, so it is
loaded by path. Parameters that OpenAI's init leaves at exactly 0 or 1 are randomised, so a port that
swaps a weight and a bias, or forgets a term, cannot pass by accident.
"""
import importlib.util

import numpy as np
import torch


def openai_model_module():
  spec = importlib.util.find_spec("clip")
  path = spec.submodule_search_locations[0] + "/model.py"
  mod_spec = importlib.util.spec_from_file_location("_openai_clip_model", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod


def random_clip(seed: int, *, embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
                context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2):
  torch.manual_seed(seed)
  mod = openai_model_module()
  model = mod.CLIP(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
                   context_length, vocab_size, transformer_width, transformer_heads, transformer_layers)
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "bias" in name:
        p.copy_(0.05 * torch.randn(p.shape, generator=g))
      elif p.ndim == 1 and ("ln" in name or "bn" in name or "downsample.1" in name):
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(0.1 * torch.randn(b.shape, generator=g))
      elif name.endswith("running_var"):
        b.copy_(0.5 + torch.rand(b.shape, generator=g))
  return model.eval()


def state_dict_numpy(model) -> dict:
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
