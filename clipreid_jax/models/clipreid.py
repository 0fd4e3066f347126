"""CLIP-ReID: the ReID image encoder (CLIP image tower + BN necks + classifiers + SIE), the prompt
learner and the text encoder, with the official code's parameter names and semantics.

Parameter tree (Flax names of the official state dict):
  image_encoder/...        CLIP image tower (ViT or modified ResNet with last stride 1)
  bottleneck, bottleneck_proj   BatchNorm1d necks (`scale`, `bias`; bias frozen at 0 by the optimizer)
  classifier, classifier_proj   bias-free Dense (`kernel`), init N(0, 0.001^2)
  cv_embed                 SIE table (rows, width), ViT only, when SIE is on
  prompt_learner/cls_ctx   (C, 4, text_width) learnable tokens, init N(0, 0.02^2) (4: model.prompt_tokens)
  prompt_learner/token_prefix, token_suffix   frozen embeddings of the template around the X tokens
  text_encoder/...         CLIP text transformer, ln_final, text_projection
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clipreid_jax.data import errors
from clipreid_jax.data.images import PIXEL_STATS
from clipreid_jax.data.registry import is_vehicle
from clipreid_jax.models.clip import BatchNorm, CLIPConfig, TextTransformer, vision_tower

Dtype = Any

N_CTX = 4  # learned tokens per identity in the official code (and the paper)
CTX_START = 5  # tokens 0..4 are [SOT, a, photo, of, a]; then the learned X tokens
MAX_PROMPT_TOKENS = 69  # with the template's other 8 tokens, CLIP's 77


def prompt_template(noun: str, tokens: int = N_CTX) -> str:
  """"A photo of a X X X X person." with `tokens` X's (one CLIP token each)."""
  return f"A photo of a {' '.join(['X'] * tokens)} {noun}."


def eot_index_of(noun: str, tokens: int = N_CTX) -> int:
  """Where the template's end token is: its text feature is read there."""
  from clipreid_jax.tokenizer import tokenize  # pylint: disable=g-import-not-at-top
  return int(tokenize(prompt_template(noun, tokens))[0].argmax())


@dataclasses.dataclass(frozen=True)
class ReIDConfig:
  """What a CLIP-ReID model is. `clip.vision_grid`/`vision_stride` are the ReID grid and patch stride."""
  clip: CLIPConfig
  num_classes: int
  sie_camera: bool = False
  sie_view: bool = False
  camera_num: int = 1
  view_num: int = 1
  sie_coe: float = 3.0
  prompt_noun: str = "person"
  with_text: bool = True  # False: the paper's baseline (image side only)
  eot_index: int = 11  # end token of the tokenized template
  image_size: tuple[int, int] = ()  # the input (H, W); OLP's grid leaves edge pixels uncovered, so keep it
  prompt_tokens: int = N_CTX  # learned X tokens per identity

  def __post_init__(self):  # as CLIPConfig's: hashable with an image size given as a list
    if isinstance(self.image_size, list):
      object.__setattr__(self, "image_size", tuple(self.image_size))

  @property
  def backbone(self) -> str:
    return self.clip.name

  @property
  def input_size(self) -> tuple[int, int]:
    return tuple(self.image_size) if self.image_size else self.clip.input_size()

  @property
  def pixel_mean(self) -> tuple[float, ...]:
    return PIXEL_STATS["vit" if self.clip.is_vit else "rn50"][0]

  @property
  def pixel_std(self) -> tuple[float, ...]:
    return PIXEL_STATS["vit" if self.clip.is_vit else "rn50"][1]

  @property
  def feature_dim(self) -> int:
    """Width of the pre-BN image feature (768 ViT-B/16, 2048 RN50)."""
    return self.clip.vision_width if self.clip.is_vit else self.clip.vision_width * 32

  @property
  def sie_rows(self) -> int:
    if not self.clip.is_vit or not (self.sie_camera or self.sie_view):
      return 0
    if self.sie_camera and self.sie_view:
      return self.camera_num * self.view_num
    return self.camera_num if self.sie_camera else self.view_num

  @property
  def template(self) -> str:
    return prompt_template(self.prompt_noun, self.prompt_tokens)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["clip"] = json.loads(self.clip.to_json())
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "ReIDConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown CLIP-ReID config keys {unknown}")
    d["clip"] = CLIPConfig.from_dict(d["clip"])
    return cls(**d)


def prompt_noun_for(dataset: str) -> str:
  # The registry's aliases too: --config.dataset.name=VeRi-776 reads VeRi and must learn vehicle prompts.
  return "vehicle" if is_vehicle(dataset) else "person"


class PromptLearner(nn.Module):
  """Builds "A photo of a X X X X person." embeddings with the X tokens learned per identity.

  Returns only the first `length` positions: attention is causal, so the end-token feature depends on
  positions <= eot_index alone, and the 65 padding tokens after it can be skipped exactly.
  """
  num_classes: int
  width: int
  context_length: int = 77
  tokens: int = N_CTX

  @nn.compact
  def __call__(self, labels, length: int):
    ctx = self.param("cls_ctx", nn.initializers.normal(0.02), (self.num_classes, self.tokens, self.width))
    prefix = self.param("token_prefix", nn.initializers.zeros, (1, CTX_START, self.width))
    suffix = self.param("token_suffix", nn.initializers.zeros,
                        (1, self.context_length - CTX_START - self.tokens, self.width))
    b = labels.shape[0]
    suffix = suffix[:, :max(length - CTX_START - self.tokens, 0)]
    return jnp.concatenate([jnp.broadcast_to(prefix, (b,) + prefix.shape[1:]), ctx[labels],
                            jnp.broadcast_to(suffix, (b,) + suffix.shape[1:])], axis=1)


class CLIPReID(nn.Module):
  """The official `build_transformer` model (CLIP-ReID) or, with `with_text=False`, the baseline."""
  config: ReIDConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.image_encoder = vision_tower(cfg.clip, self.dtype, name="image_encoder")
    self.bottleneck = BatchNorm()
    self.bottleneck_proj = BatchNorm()
    init = nn.initializers.normal(0.001)
    self.classifier = nn.Dense(cfg.num_classes, use_bias=False, kernel_init=init, dtype=jnp.float32)
    self.classifier_proj = nn.Dense(cfg.num_classes, use_bias=False, kernel_init=init, dtype=jnp.float32)
    if cfg.sie_rows:
      # timm's trunc_normal_(std=.02) cuts at +-2 absolute, i.e. 100 std: a plain normal, not flax's +-2 std cut.
      self.cv_embed = self.param("cv_embed", nn.initializers.normal(0.02), (cfg.sie_rows, cfg.feature_dim))
    if cfg.with_text:
      c = cfg.clip
      self.prompt_learner = PromptLearner(cfg.num_classes, c.text_width, c.context_length, cfg.prompt_tokens)
      self.text_encoder = TextTransformer(c.text_width, c.text_layers, c.text_heads, c.embed_dim,
                                          c.context_length, self.dtype)

  # -- image side ---------------------------------------------------------------------------------

  def _sie_offset(self, cams, views):
    cfg = self.config
    if not cfg.sie_rows:
      return None
    if cfg.sie_camera and cfg.sie_view:
      idx = cams * cfg.view_num + views
    else:
      idx = cams if cfg.sie_camera else views
    if idx is None:
      raise ValueError("this model uses SIE: pass camera ids" + (" and view ids" if cfg.sie_view else ""))
    return cfg.sie_coe * self.cv_embed[idx]

  def image_features(self, images, cams=None, views=None, *, train: bool = False, sie: bool = True):
    """(feature_last, feature, feature_proj), all before the BN necks.

    ViT: 11th-block CLS (no LN) / ln_post CLS / projected CLS. RN50: layer3 GAP / layer4 GAP / attnpool.
    """
    chex.assert_rank(images, 4)
    if self.config.clip.is_vit:
      offset = self._sie_offset(cams, views) if sie else None
      return self.image_encoder(images, offset)
    return self.image_encoder(images, train)

  def __call__(self, images, cams=None, views=None, *, train: bool = False):
    """Training outputs (BN necks on batch statistics when `train`; call with mutable=['batch_stats'])."""
    last, feat, proj = self.image_features(images, cams, views, train=train)
    bn_feat = self.bottleneck(feat, use_running_average=not train)
    bn_proj = self.bottleneck_proj(proj, use_running_average=not train)
    return {
        "cls_score": self.classifier(bn_feat.astype(jnp.float32)),
        "cls_score_proj": self.classifier_proj(bn_proj.astype(jnp.float32)),
        "img_feature_last": last.astype(jnp.float32),
        "img_feature": feat.astype(jnp.float32),
        "img_feature_proj": proj.astype(jnp.float32),
    }

  def eval_feature(self, images, cams=None, views=None):
    """Test feature: concat of the pre-BN feature and projected feature (1280-d ViT, 3072-d RN50)."""
    _, feat, proj = self.image_features(images, cams, views, train=False)
    return jnp.concatenate([feat, proj], axis=-1).astype(jnp.float32)

  def stage1_feature(self, images):
    """Stage-1 bank entry: projected feature, no SIE, BatchNorm on running statistics."""
    return self.image_features(images, train=False, sie=False)[2].astype(jnp.float32)

  # -- text side ----------------------------------------------------------------------------------

  def text_features(self, labels, *, full_context: bool = False):
    """Text features (B, embed_dim) of identities `labels`: the end token after ln_final, projected."""
    cfg = self.config
    if not cfg.with_text:
      raise ValueError("a baseline model has no text side")
    length = cfg.clip.context_length if full_context else cfg.eot_index + 1
    prompts = self.prompt_learner(labels, length)
    eot = jnp.full((labels.shape[0],), cfg.eot_index, jnp.int32)
    return self.text_encoder(prompts, eot).astype(jnp.float32)

  def init_all(self, images, labels, cams=None, views=None):
    """Touches every submodule (for `init`)."""
    out = self(images, cams, views, train=False)
    if self.config.with_text:
      out["text"] = self.text_features(labels)
    return out


def init_variables(model: CLIPReID, rng, batch: int = 2) -> dict:
  return _compiled_init(model.config, model.dtype, batch, rng)


# One compiled program per configuration: run eagerly, flax's init compiles each operation of the forward pass on its
# own (the demo model: 9.8 s on the CPU, more on a GPU); compiled, the unused forward pass is dropped.
@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _compiled_init(cfg: ReIDConfig, dtype, batch: int, rng) -> dict:
  h, w = cfg.input_size
  zeros = jnp.zeros((batch,), jnp.int32)
  return CLIPReID(cfg, dtype).init(rng, jnp.zeros((batch, h, w, 3)), zeros, zeros, zeros, method=CLIPReID.init_all)


def expected_variables(cfg: ReIDConfig) -> dict:
  """The variables' structure and shapes that `cfg` describes (abstract: nothing is computed)."""
  return jax.eval_shape(lambda: init_variables(CLIPReID(cfg), jax.random.PRNGKey(0)))


# --------------------------------------------------------------------------------------------------
# Building from CLIP, loading and converting official checkpoints.


class GeometryError(ValueError):
  """An input size or patch stride the CLIP cannot take; the message starts with the argument's name."""


def reid_config(clip_cfg: CLIPConfig, *, num_classes: int, input_size: tuple[int, int], stride: int = 16,
                sie_camera=False, sie_view=False, camera_num=1, view_num=1, sie_coe=3.0, dataset: str = "market1501",
                with_text: bool = True, prompt_tokens: int = N_CTX, prompt_noun: str | None = None) -> ReIDConfig:
  """The configuration of the CLIP-ReID model `from_clip` builds on a CLIP of `clip_cfg` (its arguments).

  Raises:
    GeometryError: an input size below one token, or a stride above the patch size (it would skip pixels).
    CheckpointError: a CLIP whose token grid was resized for another geometry.
  """
  from clipreid_jax.checkpoints import CheckpointError
  from clipreid_jax.convert import grid_for, grid_unit
  if clip_cfg.is_vit and stride > clip_cfg.vision_patch_size:  # the official code has no such recipe
    raise GeometryError(f"stride: {stride} is more than the CLIP's {clip_cfg.vision_patch_size}-pixel patch, which "
                        f"would skip pixels; expected 1..{clip_cfg.vision_patch_size}")
  from clipreid_jax.tokenizer import tokenize
  if not clip_cfg.is_vit:
    clip_cfg = dataclasses.replace(clip_cfg, resnet_last_stride=1)  # CLIP-ReID's last-stride-1 ResNet
  else:
    clip_cfg = dataclasses.replace(clip_cfg, vision_stride=stride)
  grid = grid_for(clip_cfg, input_size, stride if clip_cfg.is_vit else None)
  if min(grid) < 1:
    raise GeometryError(f"input_size: {tuple(input_size)} gives no image token (grid {grid[0]}x{grid[1]}); expected "
                        f"height and width of at least {grid_unit(clip_cfg)} pixels")
  have = tuple(clip_cfg.vision_grid)
  # The official code resizes OpenAI's square table once; from a grid already resized for another geometry the
  # second resize would be silently different (up to the table's whole range). A non-square grid is always such a
  # one; a square one is known from the conversion's record (directories converted before it was kept are not).
  if have != tuple(grid) and (have[0] != have[1] or clip_cfg.vision_grid_source):
    how = ("this input size and --resnet_last_stride 1 (CLIP-ReID's ResNet keeps the last stage at stride 1)"
           if not clip_cfg.is_vit else "this input size and stride")
    raise CheckpointError(f"the converted CLIP has a {have[0]}x{have[1]} token grid (converted with --input_size for "
                          f"another geometry), this model needs {grid[0]}x{grid[1]}; expected OpenAI's square grid: "
                          f"convert without --input_size, or with {how}")
  noun = prompt_noun or prompt_noun_for(dataset)
  tokens = tokenize(prompt_template(noun, prompt_tokens))[0]
  return ReIDConfig(clip=dataclasses.replace(clip_cfg, vision_grid=grid, vision_grid_source=()),
                    num_classes=num_classes, sie_camera=sie_camera, sie_view=sie_view, camera_num=camera_num,
                    view_num=view_num, sie_coe=sie_coe, prompt_noun=noun, with_text=with_text,
                    eot_index=int(tokens.argmax()), image_size=tuple(input_size), prompt_tokens=prompt_tokens)


def from_clip(clip_cfg: CLIPConfig, clip_variables: dict, *, num_classes: int, input_size: tuple[int, int],
              stride: int = 16, sie_camera=False, sie_view=False, camera_num=1, view_num=1, sie_coe=3.0,
              dataset: str = "market1501", with_text: bool = True, prompt_tokens: int = N_CTX, rng=None,
              dtype=jnp.float32, prompt_noun: str | None = None):
  """A CLIP-ReID model initialised from converted CLIP variables, as the official `make_model` does.

  The image positional embedding is resized to the ReID grid; heads, SIE and prompt tokens are drawn
  fresh from `rng`; the prompt's prefix/suffix come from CLIP's token embedding. `prompt_noun`: the prompt's last
  word(s) (default: the dataset's, `prompt_noun_for`). Raises what `reid_config` raises.
  """
  from clipreid_jax.convert import resize_pos_embed
  from clipreid_jax.tokenizer import tokenize
  cfg = reid_config(clip_cfg, num_classes=num_classes, input_size=input_size, stride=stride, sie_camera=sie_camera,
                    sie_view=sie_view, camera_num=camera_num, view_num=view_num, sie_coe=sie_coe, dataset=dataset,
                    with_text=with_text, prompt_tokens=prompt_tokens, prompt_noun=prompt_noun)
  grid = tuple(cfg.clip.vision_grid)
  tokens = tokenize(prompt_template(cfg.prompt_noun, prompt_tokens))[0]
  model = CLIPReID(cfg, dtype)
  variables = jax.tree.map(np.asarray, init_variables(model, rng if rng is not None else jax.random.PRNGKey(0)))
  params, stats = variables["params"], variables.get("batch_stats", {})
  cp = clip_variables["params"]
  visual = jax.tree.map(np.asarray, cp["visual"])
  key = "positional_embedding"
  if clip_cfg.is_vit:
    visual[key] = resize_pos_embed(visual[key], grid, tuple(clip_cfg.vision_grid))
  else:
    visual["attnpool"][key] = resize_pos_embed(visual["attnpool"][key], grid, tuple(clip_cfg.vision_grid))
  params["image_encoder"] = visual
  if "visual" in clip_variables.get("batch_stats", {}):
    stats["image_encoder"] = jax.tree.map(np.asarray, clip_variables["batch_stats"]["visual"])
  if with_text:
    params["text_encoder"] = jax.tree.map(np.asarray, cp["text"])
    emb = np.asarray(cp["token_embedding"]["embedding"])[tokens]
    params["prompt_learner"]["token_prefix"] = emb[None, :CTX_START]
    params["prompt_learner"]["token_suffix"] = emb[None, CTX_START + prompt_tokens:]
  return model, {"params": params, "batch_stats": stats}


def from_clipreid(source: ReIDConfig, source_variables: dict, *, num_classes: int, input_size: tuple[int, int],
                  stride: int = 16, sie_camera=False, sie_view=False, camera_num=1, view_num=1, sie_coe=3.0,
                  dataset: str = "market1501", with_text: bool = True, prompt_tokens: int = N_CTX, rng=None,
                  dtype=jnp.float32, prompt_noun: str | None = None):
  """A CLIP-ReID model whose encoders start from a trained CLIP-ReID model's (fine-tuning on another dataset):
  the image encoder, the text encoder and the prompt's fixed tokens are copied; the prompt tokens, classifiers,
  BN necks and SIE table are drawn fresh from `rng` for this dataset's identities and cameras.

  Raises:
    GeometryError: another input size or patch stride than the source's (its positional table is resized for it).
    CheckpointError: a source without a text encoder (a baseline) for a model with one, or of another prompt noun.
  """
  from clipreid_jax.checkpoints import CheckpointError
  if tuple(input_size) != tuple(source.input_size):
    raise GeometryError(f"input_size: {tuple(input_size)} differs from the CLIP-ReID model's "
                        f"{tuple(source.input_size)}; expected the size it was trained at")
  if source.clip.is_vit and stride != source.clip.vision_stride:
    raise GeometryError(f"stride: {stride} differs from the CLIP-ReID model's {source.clip.vision_stride}; expected "
                        "the stride it was trained with")
  noun = prompt_noun or prompt_noun_for(dataset)
  if with_text and not source.with_text:
    raise CheckpointError("a baseline model (no text encoder); expected a CLIP-ReID model, or model.baseline=True")
  if with_text and noun != source.prompt_noun:
    raise CheckpointError(f"a model of {source.prompt_noun} prompts, this run's are {noun} prompts; expected a "
                          f"model trained on {noun}s, model.prompt_noun={source.prompt_noun!r}, or a converted CLIP")
  if with_text and prompt_tokens != source.prompt_tokens:  # its fixed tokens are stored around that many X's
    raise CheckpointError(f"a model of {source.prompt_tokens} prompt tokens per identity, this run asks for "
                          f"{prompt_tokens}; expected model.prompt_tokens={source.prompt_tokens}")
  cfg = dataclasses.replace(source, num_classes=num_classes, sie_camera=sie_camera, sie_view=sie_view,
                            camera_num=camera_num, view_num=view_num, sie_coe=sie_coe, prompt_noun=noun,
                            with_text=with_text, image_size=tuple(input_size))
  model = CLIPReID(cfg, dtype)
  variables = jax.tree.map(np.asarray, init_variables(model, rng if rng is not None else jax.random.PRNGKey(0)))
  params, stats = variables["params"], variables.get("batch_stats", {})
  sp = jax.tree.map(np.asarray, source_variables["params"])
  params["image_encoder"] = sp["image_encoder"]
  if "image_encoder" in source_variables.get("batch_stats", {}):
    stats["image_encoder"] = jax.tree.map(np.asarray, source_variables["batch_stats"]["image_encoder"])
  if with_text:
    params["text_encoder"] = sp["text_encoder"]
    for k in ("token_prefix", "token_suffix"):
      params["prompt_learner"][k] = sp["prompt_learner"][k]
  return model, {"params": params, "batch_stats": stats}


def load_clipreid(path: str | pathlib.Path, dtype: Dtype = jnp.float32):
  """Loads a directory written by `convert clipreid` or by training: returns (model, variables)."""
  from clipreid_jax import checkpoints
  path = pathlib.Path(path)
  meta = checkpoints.read_config(path)
  if meta.get("kind") != "clipreid":
    hint = ""
    if meta.get("kind") is None and (path / "model" / "config.json").is_file():  # a training run's workdir
      hint = f" (a training workdir: its trained model is {path / 'model'})"
    raise checkpoints.CheckpointError(f"{path}: expected a CLIP-ReID model directory (config.json kind 'clipreid'), "
                                      f"got kind {meta.get('kind')!r}{hint}")
  try:
    cfg = ReIDConfig.from_dict(meta["reid"])
    # The shapes it describes; a config.json that does not fit the saved tensors would fail deep inside the first
    # forward pass (or build a model that cannot run, e.g. an image size its positional embedding lacks).
    expected = expected_variables(cfg)
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise checkpoints.CheckpointError(f"{path / 'config.json'}: not a usable CLIP-ReID configuration "
                                      f"({errors.describe(e)})") from None
  variables = checkpoints.restore_variables(path)
  from clipreid_jax.convert import check_variables  # pylint: disable=g-import-not-at-top
  check_variables(str(path), variables, expected)
  return CLIPReID(cfg, dtype), variables
