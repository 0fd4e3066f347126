"""Pieces shared by step_benchmark.py and recipe_benchmark.py.

- full-size random CLIP weights: from OpenAI's PyTorch CLIP (openai-clip package, loaded by path as in
  tests/clip_reference.py) when it is importable, so both contenders get the same weights; otherwise drawn with
  numpy from the Flax parameter shapes (GPU machines have no openai-clip unless it is carried, see gpu_all.sh);
- CLIP-ReID models built through `clipreid.from_clip`, as the trainer builds them;
- timing and device helpers.

Nothing here imports clipreid_jax.train: it needs ml_collections, which the GPU benchmark machines lack.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import sys
import time
import types

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
# Carried dependencies for the GPU machine (gpu_all.sh): openai-clip, ftfy, wcwidth, copied from this venv.
_DEVDEPS = os.path.join(REPO, ".devdeps")
if os.path.isdir(_DEVDEPS) and _DEVDEPS not in sys.path:
  sys.path.append(_DEVDEPS)


def guard_ftfy() -> None:
  """The tokenizer imports ftfy, which the GPU machines lack. It only ever sees our ASCII prompt template here,
  where `ftfy.fix_text` is the identity, so a stand-in keeps `from_clip` working there."""
  try:
    import ftfy  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
  except ImportError:
    stub = types.ModuleType("ftfy")
    stub.fix_text = lambda text: text
    sys.modules["ftfy"] = stub


guard_ftfy()

# MSMT17 as the official reader sees it (train = list_train + list_val).
MSMT17 = dict(num_train=32_621, num_ids=1_041, num_query=11_659, num_gallery=82_161, num_test_ids=3_060,
              num_cams=15)
NUM_CLASSES = MSMT17["num_ids"]


def msmt17_pids(num_images: int, num_ids: int, seed: int = 0) -> np.ndarray:
  """Identity labels with MSMT17's counts and a heavy-tailed spread of images per identity (at least 2 each)."""
  rng = np.random.default_rng(seed)
  w = rng.lognormal(0.0, 0.8, num_ids)
  counts = 2 + np.floor(w / w.sum() * (num_images - 2 * num_ids)).astype(int)
  counts[: num_images - counts.sum()] += 1
  return np.repeat(np.arange(num_ids), counts)


def gaussian_eval_case(scale: float, dim: int, seed: int = 0) -> dict:
  """An evaluation problem of `scale` x MSMT17's test split: isotropic Gaussian features, labels from one
  heavy-tailed pool of the test identities split into query and gallery, random cameras. Many true matches per
  query (44 on average at full size): recipe_benchmark.py's metric, eval_benchmark.py --case gaussian."""
  rng = np.random.default_rng(seed)
  nq, ng = max(64, round(scale * MSMT17["num_query"])), max(256, round(scale * MSMT17["num_gallery"]))
  n_ids = MSMT17["num_test_ids"] if nq + ng > 4 * MSMT17["num_test_ids"] else (nq + ng) // 4
  pids = msmt17_pids(nq + ng, n_ids, seed=3)[rng.permutation(nq + ng)]
  cams = rng.integers(0, MSMT17["num_cams"], nq + ng)
  feats = rng.standard_normal((nq + ng, dim), dtype=np.float32)
  return dict(qf=feats[:nq], gf=feats[nq:], q_pids=pids[:nq], g_pids=pids[nq:], q_camids=cams[:nq],
              g_camids=cams[nq:])

# OpenAI's ViT-B/16 and RN50 sizes (clip.model.CLIP arguments).
OPENAI_SIZES = {
    "vit": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16),
    "rn50": dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                 vision_patch_size=None),
}
TEXT_SIZES = dict(context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                  transformer_layers=12)


def has_openai_clip() -> bool:
  return importlib.util.find_spec("clip") is not None


def openai_model_module():
  """clip/model.py of the openai-clip package, without running the package __init__ (torchvision, pkg_resources)."""
  spec = importlib.util.find_spec("clip")
  if spec is None:
    raise ImportError("the PyTorch reference needs the openai-clip package (pip install openai-clip==1.0.1)")
  path = os.path.join(spec.submodule_search_locations[0], "model.py")
  mod = types.ModuleType("_openai_clip_model")
  mod.__file__ = path
  with open(path, "rb") as f:
    exec(compile(f.read(), path, "exec"), mod.__dict__)  # pylint: disable=exec-used
  return mod


def torch_clip(backbone: str, seed: int = 0):
  """OpenAI's CLIP (ViT-B/16 or RN50) with OpenAI's random init, on the CPU, float32."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  mod = openai_model_module()
  return mod.CLIP(**OPENAI_SIZES[backbone], **TEXT_SIZES).float()


def clip_config(backbone: str):
  from clipreid_jax.models.clip import CLIPConfig  # pylint: disable=g-import-not-at-top
  if backbone == "vit":
    return CLIPConfig(embed_dim=512, vision_layers=12, vision_width=768, vision_patch_size=16, vision_grid=(14, 14))
  return CLIPConfig(embed_dim=1024, vision_layers=(3, 4, 6, 3), vision_width=64, vision_grid=(7, 7))


def _numpy_clip_variables(cfg, seed: int) -> dict:
  """Random variables of `CLIP(cfg)` without running its init (a full-size init is slow un-jitted on a CPU):
  normalisation scales 1, biases 0, running variance 1, everything else N(0, 0.02^2)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from clipreid_jax.models.clip import CLIP  # pylint: disable=g-import-not-at-top
  h, w = cfg.input_size()
  shapes = jax.eval_shape(lambda: CLIP(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, h, w, 3)),
                                                 jnp.zeros((1, 4), jnp.int32)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name in ("scale", "var"):
      return np.ones(leaf.shape, np.float32)
    if name in ("bias", "mean"):
      return np.zeros(leaf.shape, np.float32)
    return (0.02 * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


_WEIGHTS = {}


def clip_weights(backbone: str, seed: int = 0):
  """(CLIPConfig, Flax variables) of a random full-size CLIP: OpenAI's init when openai-clip is there.

  Cached per process (numpy arrays, never donated): profile_step.py builds several variants from one draw."""
  if (backbone, seed) not in _WEIGHTS:
    _WEIGHTS[backbone, seed] = _draw_clip_weights(backbone, seed)
  return _WEIGHTS[backbone, seed]


def _draw_clip_weights(backbone: str, seed: int):
  from clipreid_jax import convert  # pylint: disable=g-import-not-at-top
  cfg = clip_config(backbone)
  if has_openai_clip():
    sd = {k: v.detach().numpy() for k, v in torch_clip(backbone, seed).state_dict().items()}
    for k in ("input_resolution", "context_length", "vocab_size"):
      sd.pop(k, None)
    return cfg, convert.clip_variables(sd, cfg)[1], "openai-init"
  return cfg, _numpy_clip_variables(cfg, seed), "numpy-init"


def reid_model(backbone: str, *, stride: int = 16, dtype=None, input_size=(256, 128), num_classes=NUM_CLASSES,
               seed: int = 0):
  """(model, variables, weight source) of a full-size CLIP-ReID from a random CLIP, via `from_clip`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from clipreid_jax.models import clipreid  # pylint: disable=g-import-not-at-top
  cfg, variables, source = clip_weights(backbone, seed)
  # On the host CPU: the init and the weights stay off the accelerator until the benchmark puts them there.
  with jax.default_device(jax.devices("cpu")[0]):
    model, variables = clipreid.from_clip(cfg, variables, num_classes=num_classes, input_size=input_size,
                                          stride=stride, dataset="msmt17", rng=jax.random.PRNGKey(seed),
                                          dtype=jnp.float32 if dtype is None else dtype)
  return model, jax.tree.map(np.asarray, variables), source


def on_gpu_machine() -> bool:
  """An NVIDIA driver's device files are here (without asking JAX, which would start its backend)."""
  return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


def default_dtype():
  """What the trainer's model.dtype 'auto' picks: bfloat16 compute on GPU/TPU, float32 on CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32


def device_name() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  d = jax.devices()[0]
  if d.platform == "cpu":
    return f"CPU ({os.cpu_count()} cores, {_cpu_model()})"
  return f"{d.device_kind} ({d.platform})"


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown CPU"


def rss_gb() -> dict:
  """Current RSS, its anonymous / file-backed parts and the high-water mark, in GB (Linux /proc; {} elsewhere)."""
  out = {}
  try:
    with open("/proc/self/status") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
          out[key] = int(value.split()[0]) * 1024 / 1e9
  except OSError:
    pass
  return out


def top_mappings(n: int = 8) -> list:
  """The n largest resident mappings, by file (or [anon]), in GB: what a process's RSS is made of."""
  sizes, name = {}, None
  try:
    with open("/proc/self/smaps") as f:
      for line in f:
        parts = line.split()
        if parts and "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
          name = parts[5] if len(parts) > 5 else "[anon]"
        elif parts and parts[0] == "Rss:":
          sizes[name] = sizes.get(name, 0) + int(parts[1]) * 1024
  except OSError:
    return []
  return [(os.path.basename(k), v / 1e9) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])[:n]]


def peak_bytes():
  """Process-wide high-water mark of device memory (None on backends without memory stats, e.g. the CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def buffer_bytes(compiled) -> int | None:
  """XLA's own account of one compiled call: arguments + outputs + temporaries - donated aliases."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


def median_time(fn, iters: int, warmup: int, sync) -> tuple[float, list[float]]:
  """Median seconds of `fn()` over `iters` timed calls after `warmup` calls; `sync(result)` waits for the device."""
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times)), times


def fmt_ms(s) -> str:
  return "-" if s is None else f"{1e3 * s:,.1f}"


def fmt_gib(b) -> str:
  return "-" if b is None else f"{b / 2**30:.2f}"


def goal_line(name: str, measured: float, target: float, *, at_most: bool, unit: str = "") -> str:
  met = measured <= target if at_most else measured >= target
  shown = f"{measured:,.0f}" if abs(measured) >= 1000 else f"{measured:.3g}"  # 3,346 img/s, not 3.35e+03
  return f"goal {name}: measured {shown}{unit} target {target:g}{unit} {'met' if met else 'not met'}"


class Cut(BaseException):
  """SIGTERM (gpu_all.sh's `timeout`): the benchmark stops and prints what it has measured (BaseException, so no
  `except Exception` swallows it)."""


def _raise_cut(signum, frame):
  del signum, frame
  raise Cut


def cut_on_sigterm() -> None:
  """From now on SIGTERM raises Cut in the main thread (a subprocess.run in progress kills its child first)."""
  signal.signal(signal.SIGTERM, _raise_cut)
