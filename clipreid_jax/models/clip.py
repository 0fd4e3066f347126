"""OpenAI CLIP in Flax linen: ViT and modified-ResNet image towers, causal text transformer.

Images are NHWC. Parameters are float32; `dtype` sets the compute dtype (bfloat16 on GPU/TPU), while
LayerNorm and BatchNorm statistics are always computed in float32, as OpenAI's code does.

Parameter names follow OpenAI's state dict (see `clipreid_jax.convert`), with Flax leaf names:
`kernel`/`bias` for Dense and Conv, `scale`/`bias` for normalisation layers, plain arrays for
`class_embedding`, `positional_embedding`, `proj`, `text_projection`, `logit_scale`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any, Optional, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


# --------------------------------------------------------------------------------------------------
# Architecture description (what OpenAI's build_model infers from a state dict).


# OpenAI's released CLIPs by (width, blocks, patch) and (width, stage depths); names as open_clip spells them.
_VIT_NAMES = {(768, 12, 32): "ViT-B-32", (768, 12, 16): "ViT-B-16", (1024, 24, 14): "ViT-L-14"}
_RN_NAMES = {(64, (3, 4, 6, 3)): "RN50", (64, (3, 4, 23, 3)): "RN101", (80, (4, 6, 10, 6)): "RN50x4",
             (96, (6, 8, 18, 8)): "RN50x16", (128, (3, 15, 36, 10)): "RN50x64"}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Sizes of a CLIP model. `vision_layers` is an int for a ViT, a 4-tuple for a ResNet."""
  embed_dim: int
  vision_layers: Any
  vision_width: int
  vision_patch_size: int = 16  # ViT only
  vision_stride: int = 16  # ViT patch stride (12 = CLIP-ReID's overlapping patches)
  vision_grid: tuple[int, int] = (14, 14)  # token grid the positional embedding is stored for
  # OpenAI's grid where `convert clip --input_size` resized the table to `vision_grid`, () where it is OpenAI's own:
  # the trainer resizes OpenAI's table once, as the official code does, and refuses a second resize.
  vision_grid_source: tuple = ()
  resnet_last_stride: int = 2  # 2 as in CLIP, 1 as CLIP-ReID uses
  context_length: int = 77
  vocab_size: int = 49408
  text_width: int = 512
  text_heads: int = 8
  text_layers: int = 12

  def __post_init__(self):  # sequences as tuples: the config is hashable (a static argument of compiled code)
    for name in ("vision_layers", "vision_grid", "vision_grid_source"):
      if isinstance(getattr(self, name), list):
        object.__setattr__(self, name, tuple(getattr(self, name)))

  @property
  def is_vit(self) -> bool:
    return isinstance(self.vision_layers, int)

  @property
  def vision_heads(self) -> int:
    # OpenAI: width // 64 for ViT; the ResNet attention pool has width * 32 channels, 64 per head.
    return self.vision_width // 64 if self.is_vit else self.vision_width * 32 // 64

  @property
  def name(self) -> str:
    """OpenAI's name of the vision tower ("ViT-B-16", "RN50", ...), or its sizes where it is none of them."""
    if self.is_vit:
      known = _VIT_NAMES.get((self.vision_width, self.vision_layers, self.vision_patch_size))
      return known or f"ViT (width {self.vision_width}, depth {self.vision_layers}, patch {self.vision_patch_size})"
    known = _RN_NAMES.get((self.vision_width, tuple(self.vision_layers)))
    return known or f"RN (width {self.vision_width}, stages {tuple(self.vision_layers)})"

  def input_size(self) -> tuple[int, int]:
    """The image size (H, W) whose token grid is `vision_grid`."""
    gh, gw = self.vision_grid
    if self.is_vit:
      s, p = self.vision_stride, self.vision_patch_size
      return ((gh - 1) * s + p, (gw - 1) * s + p)
    stride = 32 if self.resnet_last_stride == 2 else 16
    return (gh * stride, gw * stride)

  def to_json(self) -> str:
    d = dataclasses.asdict(self)
    d["vision_layers"] = self.vision_layers if self.is_vit else list(self.vision_layers)
    d["vision_grid"] = list(self.vision_grid)
    d["vision_grid_source"] = list(self.vision_grid_source)
    return json.dumps(d, indent=1)

  @classmethod
  def from_dict(cls, d: dict) -> "CLIPConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown CLIP config keys {unknown}; expected a subset of {sorted(known)}")
    return cls(**d)


# --------------------------------------------------------------------------------------------------
# Building blocks.


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 (eps 1e-5), output cast back to the input dtype."""
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(x.dtype)


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch semantics (eps 1e-5, momentum 0.1).

  Normalises with the biased batch variance and updates the running variance with the unbiased one,
  as torch does (Flax's own BatchNorm stores the biased variance). Statistics are in float32 and taken
  over all axes but the last: under `jax.jit` with a sharded batch this is the global batch.
  """
  use_running_average: Optional[bool] = None
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x, use_running_average: Optional[bool] = None):
    use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32) if self.use_bias else None
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    xf = x.astype(jnp.float32)
    if use_ra:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)
      if not self.is_initializing():
        n = int(np.prod([x.shape[a] for a in axes]))
        unbiased = var * (n / max(n - 1, 1))
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale
    if bias is not None:
      y = y + bias
    return y.astype(self.dtype)


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


# `implementation` of jax.nn.dot_product_attention for every attention here. "cudnn" (the default) asks for cuDNN's
# fused flash attention where it can run (an NVIDIA GPU of compute capability 8.0 or newer, bf16/fp16 inputs, head
# widths cuDNN takes, equal query and key lengths); anything else keeps XLA's. On an H200 it took the ViT-B/16
# stage-2 step from 18.0 to 14.8 ms (docs/performance.md); its backward pass is not deterministic run to run. None:
# XLA's attention everywhere (JAX's own default). Read at trace time: set it before a function is jitted.
ATTENTION_IMPLEMENTATION: Optional[str] = "cudnn"
# The config's model.attention -> ATTENTION_IMPLEMENTATION; the trainer and the benchmarks set it from here.
ATTENTION_SETTINGS = {"auto": "cudnn", "xla": None, "cudnn": "cudnn"}


# The platform the model is built for when it is not this process's (ahead-of-time compilation for a GPU or TPU that
# is not here, benchmarks/aot_report.py): 'gpu' (an NVIDIA GPU cuDNN's flash attention runs on), 'tpu' or 'cpu'.
# None: the platform new computations go to. Read at trace time, as ATTENTION_IMPLEMENTATION.
TARGET_PLATFORM: Optional[str] = None


def _target_platform() -> str:
  """TARGET_PLATFORM, else the platform new computations go to: `jax.default_device` when set (e.g. an init on the
  host CPU)."""
  if TARGET_PLATFORM is not None:
    return TARGET_PLATFORM
  dev = jax.config.jax_default_device
  if dev is None:
    return jax.default_backend()
  return dev if isinstance(dev, str) else dev.platform


@functools.lru_cache(maxsize=None)
def _cudnn_flash_attention_available() -> bool:
  """Whether the GPUs are NVIDIA GPUs that cuDNN's flash attention runs on (compute capability 8.0, Ampere, or
  newer): JAX's cuDNN attention exists for CUDA only, and older GPUs (V100, T4) or ROCm keep XLA's attention."""
  try:  # as jax's own cuDNN attention checks a GPU
    device = jax.devices("gpu")[0]
    if "cuda" not in device.client.platform_version.lower():
      return False
    return tuple(int(x) for x in device.compute_capability.split(".")) >= (8, 0)  # "9.0" on an H100
  except (RuntimeError, AttributeError, TypeError, ValueError):  # no GPU backend, or not CUDA's
    return False


def _cudnn_attention_target() -> bool:
  """Whether the model is built for a GPU cuDNN's flash attention runs on: TARGET_PLATFORM 'gpu' is taken to be one
  (there is no device to ask); otherwise the platform new computations go to, and its GPUs."""
  if TARGET_PLATFORM is not None:
    return TARGET_PLATFORM in ("gpu", "cuda")
  return _target_platform() in ("gpu", "cuda") and _cudnn_flash_attention_available()


def _on_cpu_by_default(setting: Optional[bool]) -> bool:
  """A CPU-only speed setting: None follows the target platform, True / False force it."""
  return _target_platform() == "cpu" if setting is None else bool(setting)


def attention(q, k, v, *, causal: bool = False):
  impl = ATTENTION_IMPLEMENTATION
  # cuDNN's kernels: NVIDIA GPUs from Ampere on, half precision, head widths that are multiples of 8 up to 128,
  # and self-attention over equal lengths (the class-token-only last block of the ViT, one query, stays with XLA:
  # it is tiny).
  if impl == "cudnn" and (not _cudnn_attention_target()
                          or q.dtype not in (jnp.bfloat16, jnp.float16) or q.shape[-1] % 8 or q.shape[-1] > 128
                          or q.shape[1] != k.shape[1]):
    impl = None
  if impl == "cudnn" and q.shape[1] % 2:
    return even_length_attention(q, k, v, causal=causal, implementation=impl)
  if impl is None and _on_cpu_by_default(EXPLICIT_ATTENTION_GRADIENTS):
    return explicit_attention(q, k, v, causal)
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)


def even_length_attention(q, k, v, *, causal: bool = False, implementation: Optional[str] = None):
  """Self-attention over an odd length L computed at length L + 1: cuDNN's backward pass takes even lengths only
  (a ViT has 129 tokens, 211 with OLP). The extra query row is sliced off and the extra key is hidden by the
  kernel's own length mask, so every real query attends to exactly its keys: exact."""
  b, length = q.shape[:2]
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))
  lengths = jnp.full((b,), length, jnp.int32)
  out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), is_causal=causal, query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths, implementation=implementation)
  return out[:, :length]


# XLA's attention (jax.nn.dot_product_attention) leaves XLA:CPU to derive the backward pass, which then transposes the
# (batch, heads, query, key) probabilities and score gradients to feed the value and key gradients (two copies of the
# largest arrays in a block) and moves every operand between token-major and head-major order on the way. Written out,
# each product reads operands already laid out as XLA:CPU's products take them, and the only copies left are the
# token-major <-> head-major moves of (batch, tokens, heads, dim) arrays. ~8% of a ViT-B/16 step at batch 8
# (docs/performance.md). None: on the CPU backend only (XLA's own form on GPU / TPU). Read at trace time.
EXPLICIT_ATTENTION_GRADIENTS: Optional[bool] = None


def _attention_forward(q, k, v, causal):
  """softmax(q k^T / sqrt(d)) v over (batch, tokens, heads, dim) inputs, and what the backward pass reads."""
  dtype = q.dtype
  # q is scaled rather than the logits: the same numbers where 1/sqrt(d) is a power of two (d = 64 in OpenAI's CLIPs)
  qs = q * jnp.asarray(q.shape[-1] ** -0.5, dtype)
  q_h = qs.transpose(0, 2, 1, 3)  # (b, h, n, d)
  k_t = k.transpose(0, 2, 3, 1)  # (b, h, d, m)
  v_h = v.transpose(0, 2, 1, 3)  # (b, h, m, d)
  logits = jnp.einsum("bhnd,bhdm->bhnm", q_h, k_t, preferred_element_type=jnp.float32)
  if causal:  # query i sees keys 0..i, as jax.nn.dot_product_attention(is_causal=True)
    n, m = logits.shape[-2:]
    logits = jnp.where(jnp.tril(jnp.ones((n, m), bool)), logits, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(logits, axis=-1).astype(dtype)
  out = jnp.einsum("bhnm,bhmd->bhnd", p, v_h).transpose(0, 2, 1, 3)
  return out, (qs.transpose(0, 2, 3, 1), k_t, v_h, p)  # q^T (b, h, d, n) for the key gradient


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _explicit_attention(q, k, v, causal):
  return _attention_forward(q, k, v, causal)[0]


def _explicit_attention_bwd(causal, residuals, g):
  del causal  # masked positions have p = 0, so their score gradients are 0 already
  q_t, k_t, v_h, p = residuals
  dtype = g.dtype
  g_h = g.transpose(0, 2, 1, 3)  # (b, h, n, d)
  g_t = g.transpose(0, 2, 3, 1)  # (b, h, d, n)
  dp = jnp.einsum("bhnd,bhmd->bhnm", g_h, v_h, preferred_element_type=jnp.float32)
  pf = p.astype(jnp.float32)
  ds = (pf * (dp - jnp.sum(dp * pf, axis=-1, keepdims=True))).astype(dtype)  # the softmax's backward pass
  dq = jnp.einsum("bhnm,bhdm->bhnd", ds, k_t) * jnp.asarray(q_t.shape[2] ** -0.5, dtype)
  dk_t = jnp.einsum("bhdn,bhnm->bhdm", q_t, ds)
  dv_t = jnp.einsum("bhdn,bhnm->bhdm", g_t, p)
  return dq.transpose(0, 2, 1, 3), dk_t.transpose(0, 3, 1, 2), dv_t.transpose(0, 3, 1, 2)


_explicit_attention.defvjp(_attention_forward, _explicit_attention_bwd)


def explicit_attention(q, k, v, causal: bool = False):
  """Self-attention with the backward pass written out (see EXPLICIT_ATTENTION_GRADIENTS): the math of
  jax.nn.dot_product_attention(q, k, v, is_causal=causal) for (batch, tokens, heads, dim) inputs; q may hold fewer
  tokens than k and v (the class-token-only last ViT block).

  An even batch runs as two independent halves: XLA:CPU computes each batched product of the small per-head matrices
  on one thread, and two independent halves let it run them side by side (2-4% of a ViT-B/16 step at batch 8 on 2
  cores, docs/performance.md)."""
  b = q.shape[0]
  if b % 2 or b == 0:
    return _explicit_attention(q, k, v, causal)
  h = b // 2
  return jnp.concatenate([_explicit_attention(q[:h], k[:h], v[:h], causal),
                          _explicit_attention(q[h:], k[h:], v[h:], causal)], axis=0)


# The weight gradient of a dense layer as JAX derives it (the output gradient times the input, contracted over the
# tokens, then transposed) leads XLA:CPU to write a transposed copy of the output gradient for every layer, fused with
# whatever produced it (7-9 ms per layer for a ViT-B/16 at batch 8), and to leave the product to Eigen. Written out
# as x^T g, contracted over the token axis of both, the operands go to the product as they are (docs/performance.md).
# None: on the CPU backend only (not measured on a GPU). Read at trace time.
EXPLICIT_WEIGHT_GRADIENTS: Optional[bool] = None


@jax.custom_vjp
def dense_product(x, kernel):
  """x (..., in) @ kernel (in, out), with the backward pass written out (see EXPLICIT_WEIGHT_GRADIENTS)."""
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_product_fwd(x, kernel):
  return dense_product(x, kernel), (x, kernel)


def _dense_product_bwd(residuals, g):
  x, kernel = residuals
  dx = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
  dkernel = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), (((0,), (0,)), ((), ())))
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


dense_product.defvjp(_dense_product_fwd, _dense_product_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """The product inside the transformer's nn.Dense layers: `dense_product` where EXPLICIT_WEIGHT_GRADIENTS applies."""
  if (_on_cpu_by_default(EXPLICIT_WEIGHT_GRADIENTS) and precision is None and preferred_element_type is None
      and rhs.ndim == 2 and dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ()))):
    return dense_product(lhs, rhs)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type)


class MultiheadAttention(nn.Module):
  """Self-attention with a packed q/k/v projection (OpenAI's nn.MultiheadAttention layout).

  `num_queries`: compute the outputs of the first n positions only (keys and values still cover all).
  """
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, causal: bool = False, num_queries: Optional[int] = None):
    b, l, w = x.shape
    qkv = nn.Dense(3 * w, dtype=self.dtype, dot_general=dense_dot_general, name="in_proj")(x)
    qkv = qkv.reshape(b, l, 3, self.num_heads, w // self.num_heads)
    q, k, v = qkv[:, :num_queries, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = attention(q, k, v, causal=causal)
    out_proj = nn.Dense(w, dtype=self.dtype, dot_general=dense_dot_general, name="out_proj")
    return out_proj(out.reshape(b, q.shape[1], w))


class MLP(nn.Module):
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.width * 4, dtype=self.dtype, dot_general=dense_dot_general, name="c_fc")(x)
    return nn.Dense(self.width, dtype=self.dtype, dot_general=dense_dot_general, name="c_proj")(quick_gelu(x))


class ResidualAttentionBlock(nn.Module):
  """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

  `num_queries`: only the first n positions of the output (exact: attention still sees every position).
  """
  width: int
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, causal: bool = False, num_queries: Optional[int] = None):
    a = MultiheadAttention(self.num_heads, self.dtype, name="attn")(LayerNorm(name="ln_1")(x), causal=causal,
                                                                    num_queries=num_queries)
    x = x[:, :num_queries] + a
    return x + MLP(self.width, self.dtype, name="mlp")(LayerNorm(name="ln_2")(x))


# On XLA:CPU the backward pass of an unrolled stack fuses the residual stream's gradient (a chain of cheap adds and
# layer-norm terms through every later block) into each of its consumers instead of writing it once, so every block
# re-computes the chain behind it: quadratic in depth, a third of a ViT-B/16 step (docs/performance.md). A barrier
# on the gradient at each block boundary makes XLA write it once. None: barriers on the CPU backend only (whether
# the GPU needs them is not measured yet: `profile_step.py --variants default,barriers`). Read at trace time.
GRADIENT_BARRIERS: Optional[bool] = None


@jax.custom_vjp
def gradient_barrier(x):
  """The identity; its backward pass materialises the incoming gradient (see GRADIENT_BARRIERS)."""
  return x


def _gradient_barrier_fwd(x):
  return x, None


def _gradient_barrier_bwd(_, g):
  if _target_platform() != "cpu":  # XLA:GPU and TPU remove optimization barriers only after fusion
    return (jax.lax.optimization_barrier(g),)
  # XLA:CPU removes optimization barriers before fusion, but keeps a conditional whose predicate is only known at run
  # time: `first == first` is false only for NaN. Both branches return g exactly (x + -0.0 == x for every float, -0.0
  # and NaN included); they must differ, or XLA merges them and drops the conditional.
  first = g[(0,) * g.ndim]
  return (jax.lax.cond(first == first, lambda t: t, lambda t: t + jnp.asarray(-0.0, t.dtype), g),)


gradient_barrier.defvjp(_gradient_barrier_fwd, _gradient_barrier_bwd)


class Transformer(nn.Module):
  """A stack of blocks. Returns the stream after every block but the last, and after the last.

  `last_queries`: the last block computes only the first n positions (the rest of its output is never used).
  """
  width: int
  layers: int
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, causal: bool = False, last_queries: Optional[int] = None):
    barrier = gradient_barrier if _on_cpu_by_default(GRADIENT_BARRIERS) else (lambda t: t)
    block = lambda i: ResidualAttentionBlock(self.width, self.num_heads, self.dtype, name=f"resblocks_{i}")
    for i in range(self.layers - 1):
      x = block(i)(barrier(x), causal=causal)
    x = barrier(x)
    return x, block(self.layers - 1)(x, causal=causal, num_queries=last_queries)


# --------------------------------------------------------------------------------------------------
# Image towers. Both return three features (B, ·): the "last-but-one" feature, the final feature and
# the projected embedding, which is what CLIP-ReID's heads and triplet losses consume.


class VisionTransformer(nn.Module):
  """CLIP ViT. `cls_offset` (B, width), e.g. a SIE embedding, is added to the class token only."""
  width: int
  layers: int
  num_heads: int
  patch_size: int
  stride: int
  grid: tuple[int, int]
  output_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, cls_offset=None):
    b = images.shape[0]
    x = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.stride,) * 2, padding="VALID",
                use_bias=False, dtype=self.dtype, name="conv1")(images.astype(self.dtype))
    gh, gw = x.shape[1:3]
    if (gh, gw) != tuple(self.grid):
      raise ValueError(f"image {images.shape[1:3]} gives a {gh}x{gw} token grid; the model's positional "
                       f"embedding is for {self.grid[0]}x{self.grid[1]} (input size {self._input_size()})")
    x = x.reshape(b, gh * gw, self.width)  # row-major over (h, w), as torch's flatten(2)
    scale = self.width ** -0.5
    cls_emb = self.param("class_embedding", nn.initializers.normal(scale), (self.width,))
    pos = self.param("positional_embedding", nn.initializers.normal(scale), (gh * gw + 1, self.width))
    cls = jnp.broadcast_to(cls_emb.astype(self.dtype), (b, 1, self.width))
    if cls_offset is not None:
      cls = cls + cls_offset[:, None, :].astype(self.dtype)
    x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)
    x = LayerNorm(name="ln_pre")(x)
    # Only the class token is used downstream, so the last block computes it alone (exact); ln_post and proj act
    # per token.
    x_last, x = Transformer(self.width, self.layers, self.num_heads, self.dtype, name="transformer")(
        x, last_queries=1)
    feat = LayerNorm(name="ln_post")(x[:, 0])
    proj = self.param("proj", nn.initializers.normal(scale), (self.width, self.output_dim))
    return x_last[:, 0], feat, feat @ proj.astype(self.dtype)

  def _input_size(self):
    return tuple((g - 1) * self.stride + self.patch_size for g in self.grid)


class Bottleneck(nn.Module):
  """ResNet bottleneck with anti-aliased downsampling (avgpool before the strided path)."""
  planes: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    def bn(name):
      return BatchNorm(use_running_average=not train, dtype=self.dtype, name=name)

    def conv(features, k, name):
      return nn.Conv(features, (k, k), padding=[(k // 2, k // 2)] * 2, use_bias=False, dtype=self.dtype, name=name)

    out = nn.relu(bn("bn1")(conv(self.planes, 1, "conv1")(x)))
    out = nn.relu(bn("bn2")(conv(self.planes, 3, "conv2")(out)))
    if self.stride > 1:
      out = nn.avg_pool(out, (self.stride,) * 2, strides=(self.stride,) * 2)
    out = bn("bn3")(conv(self.planes * 4, 1, "conv3")(out))
    identity = x
    if self.stride > 1 or x.shape[-1] != self.planes * 4:
      if self.stride > 1:
        identity = nn.avg_pool(identity, (self.stride,) * 2, strides=(self.stride,) * 2)
      identity = conv(self.planes * 4, 1, "downsample_conv")(identity)
      identity = bn("downsample_bn")(identity)
    return nn.relu(out + identity)


class AttentionPool2d(nn.Module):
  """CLIP's attention pooling, evaluated for the mean token only (the only output CLIP uses)."""
  num_heads: int
  output_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
    pos = self.param("positional_embedding", nn.initializers.normal(c ** -0.5), (h * w + 1, c))
    x = x + pos.astype(x.dtype)
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)
    hd = c // self.num_heads
    q = dense(c, "q_proj")(x[:, :1]).reshape(b, 1, self.num_heads, hd)
    k = dense(c, "k_proj")(x).reshape(b, h * w + 1, self.num_heads, hd)
    v = dense(c, "v_proj")(x).reshape(b, h * w + 1, self.num_heads, hd)
    out = attention(q, k, v).reshape(b, c)
    return dense(self.output_dim, "c_proj")(out)


class ModifiedResNet(nn.Module):
  """CLIP's ResNet: 3-conv stem, anti-aliased bottlenecks, attention pooling.

  Returns (global average of layer3, global average of layer4, attention-pool output).
  """
  layers: Sequence[int]
  width: int
  output_dim: int
  num_heads: int
  last_stride: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    def stem(x, features, stride, i):
      x = nn.Conv(features, (3, 3), strides=(stride, stride), padding=[(1, 1), (1, 1)], use_bias=False,
                  dtype=self.dtype, name=f"conv{i}")(x)
      return nn.relu(BatchNorm(use_running_average=not train, dtype=self.dtype, name=f"bn{i}")(x))

    x = images.astype(self.dtype)
    x = stem(x, self.width // 2, 2, 1)
    x = stem(x, self.width // 2, 1, 2)
    x = stem(x, self.width, 1, 3)
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    feats = []
    for i, (n, planes, stride) in enumerate(zip(self.layers, [1, 2, 4, 8], [1, 2, 2, self.last_stride])):
      for j in range(n):
        x = Bottleneck(self.width * planes, stride if j == 0 else 1, self.dtype, name=f"layer{i + 1}_{j}")(x, train)
      feats.append(x)
    pooled = AttentionPool2d(self.num_heads, self.output_dim, self.dtype, name="attnpool")(x)
    return feats[2].mean(axis=(1, 2)), feats[3].mean(axis=(1, 2)), pooled


def vision_tower(cfg: CLIPConfig, dtype: Dtype = jnp.float32, name: str = "visual") -> nn.Module:
  if cfg.is_vit:
    return VisionTransformer(cfg.vision_width, cfg.vision_layers, cfg.vision_heads, cfg.vision_patch_size,
                             cfg.vision_stride, tuple(cfg.vision_grid), cfg.embed_dim, dtype, name=name)
  return ModifiedResNet(tuple(cfg.vision_layers), cfg.vision_width, cfg.embed_dim, cfg.vision_heads,
                        cfg.resnet_last_stride, dtype, name=name)


# --------------------------------------------------------------------------------------------------
# Text tower.


class TextTransformer(nn.Module):
  """Causal text transformer over token embeddings; returns the projected feature at `eot_index`.

  Because attention is causal, the feature at position t depends only on positions <= t, so callers
  may pass just the first `eot_index + 1` positions: the result is exactly the same.
  """
  width: int
  layers: int
  num_heads: int
  embed_dim: int
  context_length: int = 77
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, eot_index):
    chex.assert_rank(x, 3)
    l = x.shape[1]
    pos = self.param("positional_embedding", nn.initializers.normal(0.01), (self.context_length, self.width))
    x = x.astype(self.dtype) + pos[:l].astype(self.dtype)
    _, x = Transformer(self.width, self.layers, self.num_heads, self.dtype, name="transformer")(x, causal=True)
    x = LayerNorm(name="ln_final")(x)
    x = jnp.take_along_axis(x, jnp.asarray(eot_index).reshape(-1, 1, 1), axis=1)[:, 0]
    proj = self.param("text_projection", nn.initializers.normal(self.width ** -0.5), (self.width, self.embed_dim))
    return x @ proj.astype(self.dtype)


class CLIP(nn.Module):
  """The two towers. `encode_image(images)` (NHWC) and `encode_text(token_ids)` return embeddings."""
  config: CLIPConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.visual = vision_tower(cfg, self.dtype)
    self.token_embedding = nn.Embed(cfg.vocab_size, cfg.text_width, dtype=self.dtype)
    self.text = TextTransformer(cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.embed_dim,
                                cfg.context_length, self.dtype)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(np.log(1 / 0.07)), ())

  def encode_image(self, images, train: bool = False):
    chex.assert_rank(images, 4)
    if self.config.is_vit:
      return self.visual(images)[2]
    return self.visual(images, train)[2]

  def encode_text(self, tokens, truncate: bool = True):
    """Embeddings of token ids (B, context). The end token is the largest id (49407), as in OpenAI's code.

    With concrete `tokens` and `truncate`, the transformer runs only up to the last end token: exact,
    since attention is causal, and several times cheaper for short texts.
    """
    eot = jnp.argmax(tokens, axis=-1)
    if truncate:
      try:
        tokens = tokens[:, :int(np.max(np.asarray(eot))) + 1]
      except jax.errors.TracerArrayConversionError:
        pass  # traced tokens: keep the full context
    return self.text(self.token_embedding(tokens), eot)

  def __call__(self, images, tokens):
    img = self.encode_image(images)
    txt = self.encode_text(tokens)
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
    return jnp.exp(self.logit_scale) * img @ txt.T


def load_clip(path: str | pathlib.Path, dtype: Dtype = jnp.float32):
  """Loads a directory written by `python -m clipreid_jax.convert clip`: returns (model, variables)."""
  from clipreid_jax import checkpoints  # local import: keeps this module free of orbax at import time
  path = pathlib.Path(path)
  meta = checkpoints.read_config(path)
  if meta.get("kind") != "clip":
    raise ValueError(f"{path}: expected a converted CLIP directory (config.json kind 'clip'), got kind {meta.get('kind')!r}")
  cfg = CLIPConfig.from_dict(meta["clip"])
  variables = checkpoints.restore_variables(path)
  return CLIP(cfg, dtype=dtype), variables
