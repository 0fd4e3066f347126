"""Optimizers of the official CLIP-ReID as optax transformations.

Reproduces `solver/make_optimizer_prompt.py` (stage 1 and stage 2) and `solver/make_optimizer.py` (baseline):

- `torch.optim.Adam(weight_decay=wd)` is Adam with *coupled* L2: the decay is added to the gradient before the
  moments (`add_decayed_weights` -> `scale_by_adam` -> `-lr`), not AdamW. SGD (momentum, coupled L2) and AdamW
  (decoupled) are there for OPTIMIZER_NAME, though every shipped yml uses Adam.
- The official code builds one param group per tensor. Here the groups are optax labels computed from the Flax
  parameter paths (`param_labels`), and freezing is `optax.set_to_zero()` inside `optax.multi_transform`, never
  `stop_gradient`.
- Every group's lr follows the per-epoch schedule of `clipreid_jax.schedules` (constant within an epoch).

Stage rules (the official names are substring tests on `model.named_parameters()`):

- `stage1`: `prompt_learner/cls_ctx` is 'train' (STAGE1 lr / wd); everything else is 'frozen'. (Officially every
  parameter under `prompt_learner` trains, which is only `cls_ctx`: `token_prefix` / `token_suffix` are torch
  buffers. The Flax model keeps them in `params`, so they are frozen explicitly.)
- `stage2` and `baseline`: leaves under `text_encoder` or `prompt_learner`, and `bottleneck/bias`,
  `bottleneck_proj/bias` are 'frozen'; other leaves named `bias` are 'bias' (BASE_LR x BIAS_LR_FACTOR,
  WEIGHT_DECAY_BIAS); all remaining leaves are 'train' (BASE_LR, WEIGHT_DECAY).

Name mapping, official torch name -> Flax path (the `params` collection; batch statistics live in `batch_stats`
and are never optimised):

| official | Flax |
| --- | --- |
| `<m>.weight` of Linear / Conv (`classifier`, `conv1`, `mlp.c_fc`, `attnpool.q_proj`, ...) | `<m>/kernel` |
| `<m>.weight` of LayerNorm / BatchNorm (`ln_pre`, `ln_1`, `bn1`, `bottleneck`, ...) | `<m>/scale` |
| `<m>.bias` (Linear / Conv / LN / BN) | `<m>/bias` |
| `attn.in_proj_weight`, `attn.in_proj_bias` | `attn/in_proj/kernel`, `attn/in_proj/bias` |
| `resblocks.<i>`, `layer<k>.<i>` | `resblocks_<i>`, `layer<k>_<i>` |
| `class_embedding`, `positional_embedding`, `proj`, `cv_embed`, `cls_ctx`, `text_projection` | same, plain array |

Every official parameter whose name contains "bias" maps to a Flax leaf named `bias` and no other leaf is named
`bias`, so the official `"bias" in key` rule is `leaf key == 'bias'` here. The official BN-neck biases have
`requires_grad=False` and are not in the optimizer; they are frozen here and stay 0.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import optax

from clipreid_jax import schedules

TRAIN = "train"
BIAS = "bias"
FROZEN = "frozen"
STAGES = ("stage1", "stage2", "baseline")

# torch.optim.Adam / AdamW defaults (the official code never changes them).
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8

_FROZEN_STAGE2_MODULES = ("text_encoder", "prompt_learner")
_BN_NECKS = ("bottleneck", "bottleneck_proj")


# ---------------------------------------------------------------------------------------------------------------
# Solver settings.


def _pick(cls, d: Mapping[str, Any], aliases: Mapping[str, str]) -> dict[str, Any]:
  """Fields of dataclass `cls` from yml-style keys (any case); unknown keys (batch size, periods...) are ignored."""
  names = {f.name for f in dataclasses.fields(cls)}
  out = {}
  for key, value in d.items():
    k = aliases.get(key.lower(), key.lower())
    if k in names:
      out[k] = tuple(value) if isinstance(value, list) else value
  if d.get("LARGE_FC_LR", d.get("large_fc_lr", False)):
    raise NotImplementedError("LARGE_FC_LR is not supported (False in every shipped yml)")
  return out


@dataclasses.dataclass(frozen=True)
class Stage1Solver:
  """SOLVER.STAGE1 settings. Defaults are the values every shipped CLIP-ReID yml uses (not config/defaults.py).

  Attributes:
    base_lr: BASE_LR.
    weight_decay: WEIGHT_DECAY (coupled L2 for Adam/SGD).
    max_epochs: MAX_EPOCHS (= t_initial of the cosine).
    warmup_lr_init: WARMUP_LR_INIT.
    lr_min: LR_MIN.
    warmup_epochs: WARMUP_EPOCHS (warmup_t of the cosine).
    optimizer_name: OPTIMIZER_NAME ('Adam', 'SGD' or 'AdamW').
    momentum: MOMENTUM (SGD only).
  """
  base_lr: float = 3.5e-4
  weight_decay: float = 1e-4
  max_epochs: int = 120
  warmup_lr_init: float = 1e-5
  lr_min: float = 1e-6
  warmup_epochs: int = 5
  optimizer_name: str = "Adam"
  momentum: float = 0.9

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Stage1Solver":
    return cls(**_pick(cls, d, {"name": "optimizer_name"}))

  def schedule(self) -> schedules.CosineLRSchedule:
    """The official `create_scheduler(optimizer, MAX_EPOCHS, LR_MIN, WARMUP_LR_INIT, WARMUP_EPOCHS)`."""
    return schedules.stage1_cosine(self.base_lr, self.max_epochs, self.lr_min, self.warmup_lr_init,
                                   self.warmup_epochs)


@dataclasses.dataclass(frozen=True)
class Stage2Solver:
  """SOLVER.STAGE2 settings (or the baseline's flat SOLVER block).

  Attributes:
    base_lr: BASE_LR.
    weight_decay: WEIGHT_DECAY.
    steps: STEPS (epoch milestones).
    warmup_factor: WARMUP_FACTOR.
    weight_decay_bias: WEIGHT_DECAY_BIAS; None means equal to weight_decay (as in every shipped yml).
    bias_lr_factor: BIAS_LR_FACTOR (2 in every shipped yml).
    warmup_iters: WARMUP_ITERS, in epochs (10 in every shipped yml).
    warmup_method: WARMUP_METHOD.
    gamma: GAMMA.
    max_epochs: MAX_EPOCHS (informational: the lr is constant after max(WARMUP_ITERS, last milestone)).
    optimizer_name: OPTIMIZER_NAME ('Adam', 'SGD' or 'AdamW').
    momentum: MOMENTUM (SGD only).
  """
  base_lr: float
  weight_decay: float
  steps: tuple[int, ...]
  warmup_factor: float
  weight_decay_bias: float | None = None
  bias_lr_factor: float = 2.0
  warmup_iters: int = 10
  warmup_method: str = "linear"
  gamma: float = 0.1
  max_epochs: int | None = None
  optimizer_name: str = "Adam"
  momentum: float = 0.9

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Stage2Solver":
    return cls(**_pick(cls, d, {"name": "optimizer_name"}))

  def schedule(self, group: str = TRAIN) -> schedules.WarmupMultiStepSchedule:
    """`WarmupMultiStepLR` of the 'train' group (BASE_LR) or the 'bias' group (BASE_LR x BIAS_LR_FACTOR)."""
    base = schedules.WarmupMultiStepSchedule(base_lr=self.base_lr, milestones=tuple(self.steps), gamma=self.gamma,
                                             warmup_factor=self.warmup_factor, warmup_iters=self.warmup_iters,
                                             warmup_method=self.warmup_method)
    return base.scaled(self.bias_lr_factor) if group == BIAS else base

  @property
  def bias_weight_decay(self) -> float:
    return self.weight_decay if self.weight_decay_bias is None else self.weight_decay_bias


# ---------------------------------------------------------------------------------------------------------------
# Labels.


def _key_name(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
  """jax key path -> tuple of names, without a leading 'params' collection name."""
  names = tuple(_key_name(k) for k in path)
  return names[1:] if names[:1] == ("params",) else names


def label_for_path(names: tuple[str, ...], stage: str) -> str:
  """Optimizer group of the leaf at `names` (see the module docstring for the rules)."""
  if stage == "stage1":
    return TRAIN if names[-2:] == ("prompt_learner", "cls_ctx") else FROZEN
  if stage not in STAGES:
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
  if any(m in names for m in _FROZEN_STAGE2_MODULES):
    return FROZEN
  if len(names) == 2 and names[0] in _BN_NECKS and names[1] == "bias":
    return FROZEN
  return BIAS if names[-1] == "bias" else TRAIN


def param_labels(params: Any, stage: str) -> Any:
  """Pytree of labels ('train', 'bias' or 'frozen') with the structure of `params`.

  Args:
    params: the CLIP-ReID (or baseline) `params` collection (a leading 'params' key is accepted too).
    stage: 'stage1', 'stage2' or 'baseline'.
  """
  return jax.tree_util.tree_map_with_path(lambda p, _: label_for_path(path_names(p), stage), params)


# ---------------------------------------------------------------------------------------------------------------
# Optimizers.


def _base_optimizer(name: str, learning_rate: optax.ScalarOrSchedule, weight_decay: float,
                    momentum: float) -> optax.GradientTransformation:
  """One official param group: torch.optim.<name> with its lr and weight decay."""
  if name == "Adam":  # coupled L2, as torch.optim.Adam(weight_decay=...)
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.scale_by_adam(b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS),
                       optax.scale_by_learning_rate(learning_rate))
  if name == "SGD":  # torch SGD: coupled L2, momentum buffer starts at the first gradient, no dampening
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.trace(decay=momentum, nesterov=False),
                       optax.scale_by_learning_rate(learning_rate))
  if name == "AdamW":  # decoupled: p -= lr * (adam + wd * p)
    return optax.chain(optax.scale_by_adam(b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS),
                       optax.add_decayed_weights(weight_decay), optax.scale_by_learning_rate(learning_rate))
  raise ValueError(f"unsupported OPTIMIZER_NAME {name!r}")


def _grouped(stage: str, groups: Mapping[str, optax.GradientTransformation]) -> optax.GradientTransformation:
  transforms = {FROZEN: optax.set_to_zero(), **groups}
  return optax.multi_transform(transforms, lambda params: param_labels(params, stage))


def stage1_lr_schedules(solver: Stage1Solver, steps_per_epoch: int) -> dict[str, optax.Schedule]:
  """{label: optax lr schedule} of the stage-1 optimizer."""
  return {TRAIN: schedules.to_optax(solver.schedule(), steps_per_epoch)}


def stage2_lr_schedules(solver: Stage2Solver, steps_per_epoch: int | Sequence[int]) -> dict[str, optax.Schedule]:
  """{label: optax lr schedule} of the stage-2 / baseline optimizer."""
  return {g: schedules.to_optax(solver.schedule(g), steps_per_epoch) for g in (TRAIN, BIAS)}


def stage1_optimizer(solver: Stage1Solver, steps_per_epoch: int) -> optax.GradientTransformation:
  """`make_optimizer_1stage` + the stage-1 cosine: only the prompt tokens (`cls_ctx`) train.

  Args:
    solver: SOLVER.STAGE1 settings.
    steps_per_epoch: optimizer steps per epoch (the official loop runs N // batch + 1).
  """
  lrs = stage1_lr_schedules(solver, steps_per_epoch)
  tx = _base_optimizer(solver.optimizer_name, lrs[TRAIN], solver.weight_decay, solver.momentum)
  return _grouped("stage1", {TRAIN: tx})


def _stage2_like(stage: str, solver: Stage2Solver,
                 steps_per_epoch: int | Sequence[int]) -> optax.GradientTransformation:
  lrs = stage2_lr_schedules(solver, steps_per_epoch)
  groups = {
      TRAIN: _base_optimizer(solver.optimizer_name, lrs[TRAIN], solver.weight_decay, solver.momentum),
      BIAS: _base_optimizer(solver.optimizer_name, lrs[BIAS], solver.bias_weight_decay, solver.momentum),
  }
  return _grouped(stage, groups)


def stage2_optimizer(solver: Stage2Solver, steps_per_epoch: int | Sequence[int]) -> optax.GradientTransformation:
  """`make_optimizer_2stage` + `WarmupMultiStepLR`: the image side trains, text side and BN-neck biases frozen.

  Args:
    solver: SOLVER.STAGE2 settings.
    steps_per_epoch: optimizer steps per epoch, or every epoch's length (PK epochs differ; see `schedules.to_optax`).
  """
  return _stage2_like("stage2", solver, steps_per_epoch)


def baseline_optimizer(solver: Stage2Solver, steps_per_epoch: int | Sequence[int]) -> optax.GradientTransformation:
  """`make_optimizer` of the baseline (`train.py`): the stage-2 rules on a model without a text side."""
  return _stage2_like("baseline", solver, steps_per_epoch)
