"""Learning-rate schedules of the official CLIP-ReID, as per-epoch functions and as optax schedules.

The official code sets the lr once per epoch, at the *start* of the epoch, and keeps it for the whole epoch:

- stage 1: timm-style `CosineLRScheduler` (`solver/cosine_lr.py`, built by `solver/scheduler_factory.py`), called
  as `scheduler.step(epoch)` for epoch = 1..E, so epoch e runs at `_get_lr(e)`;
- stage 2 and the baseline: `WarmupMultiStepLR` (`solver/lr_scheduler.py`), whose constructor steps to
  last_epoch 0 and which is then called as `scheduler.step()` at the start of every epoch, so epoch e runs at
  last_epoch = e.

Both are reproduced here as float64 closed forms with the official operation order (`lr(epoch)`, epoch 1-based),
and `to_optax` turns either into an optax schedule over the global step: the value for optimizer step `count`
(0-based) is the value of epoch `count // steps_per_epoch + 1`.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class CosineLRSchedule:
  """timm `CosineLRScheduler` with `t_in_epochs=True` and no noise, driven by `step(epoch)`.

  Attributes:
    base_lr: the param group's initial lr (STAGE1.BASE_LR).
    t_initial: length of the first cycle in epochs (STAGE1.MAX_EPOCHS).
    lr_min: floor of the cosine (STAGE1.LR_MIN).
    warmup_t: warmup epochs (STAGE1.WARMUP_EPOCHS); epochs t < warmup_t ramp linearly from warmup_lr_init.
    warmup_lr_init: lr at t = 0 (STAGE1.WARMUP_LR_INIT).
    warmup_prefix: if True the cosine starts after the warmup (the official factory leaves it False, so the
      cosine clock includes the warmup epochs).
    t_mul: cycle length multiplier.
    decay_rate: lr_max and lr_min shrink by this per cycle.
    cycle_limit: after this many cycles the lr stays at lr_min (0 = restart forever).
  """
  base_lr: float
  t_initial: int
  lr_min: float = 0.0
  warmup_t: int = 0
  warmup_lr_init: float = 0.0
  warmup_prefix: bool = False
  t_mul: float = 1.0
  decay_rate: float = 1.0
  cycle_limit: int = 0

  def __post_init__(self):
    if self.t_initial <= 0 or self.lr_min < 0:
      raise ValueError(f"invalid cosine schedule {self}")

  def initial_lr(self) -> float:
    """lr right after construction (before the first `step`)."""
    return self.warmup_lr_init if self.warmup_t else self.base_lr

  def __call__(self, epoch: int) -> float:
    """lr after `scheduler.step(epoch)`, i.e. the lr of (1-based) epoch `epoch`."""
    t = epoch
    if t < self.warmup_t:
      step = (self.base_lr - self.warmup_lr_init) / self.warmup_t
      return self.warmup_lr_init + t * step
    if self.warmup_prefix:
      t = t - self.warmup_t
    if self.t_mul != 1:
      i = math.floor(math.log(1 - t / self.t_initial * (1 - self.t_mul), self.t_mul))
      t_i = self.t_mul**i * self.t_initial
      t_curr = t - (1 - self.t_mul**i) / (1 - self.t_mul) * self.t_initial
    else:
      i = t // self.t_initial
      t_i = self.t_initial
      t_curr = t - (self.t_initial * i)
    if self.cycle_limit > 0 and i >= self.cycle_limit:
      return self.lr_min  # not decayed: timm returns the plain lr_min after the last cycle
    gamma = self.decay_rate**i
    lr_min = self.lr_min * gamma
    lr_max = self.base_lr * gamma
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * t_curr / t_i))

  def constant_from(self) -> int | None:
    """First epoch from which the lr never changes again (None if it keeps changing)."""
    if self.cycle_limit <= 0:
      return None
    if self.t_mul == 1:
      length = self.t_initial * self.cycle_limit
    else:
      length = int(math.ceil(self.t_initial * (self.t_mul**self.cycle_limit - 1) / (self.t_mul - 1)))
    return length + (self.warmup_t if self.warmup_prefix else 0)  # from there on, t is past the last cycle


def stage1_cosine(base_lr: float, num_epochs: int, lr_min: float, warmup_lr_init: float, warmup_t: int,
                  noise_range: object = None) -> CosineLRSchedule:
  """The official `create_scheduler(optimizer, num_epochs, lr_min, warmup_lr_init, warmup_t)`.

  It fixes t_mul 1, decay_rate 0.1, cycle_limit 1 and warmup_prefix False.
  """
  if noise_range is not None:
    # timm draws the noise from a torch.Generator; not reproducible without torch, and never used by CLIP-ReID.
    raise NotImplementedError("lr noise is not supported")
  return CosineLRSchedule(base_lr=base_lr, t_initial=num_epochs, lr_min=lr_min, warmup_t=warmup_t,
                          warmup_lr_init=warmup_lr_init, t_mul=1.0, decay_rate=0.1, cycle_limit=1)


@dataclasses.dataclass(frozen=True)
class WarmupMultiStepSchedule:
  """Official `WarmupMultiStepLR` (epoch-based), lr of epoch e = lr at last_epoch = e.

  lr = base_lr * warmup(e) * gamma ** (number of milestones <= e), with warmup(e) = warmup_factor for 'constant'
  or warmup_factor * (1 - e / warmup_iters) + e / warmup_iters for 'linear' while e < warmup_iters, else 1.

  Attributes:
    base_lr: the param group's initial lr (BASE_LR, or BASE_LR * BIAS_LR_FACTOR for biases; see `scaled`).
    milestones: STEPS (increasing epochs).
    gamma: GAMMA.
    warmup_factor: WARMUP_FACTOR.
    warmup_iters: WARMUP_ITERS (epochs, despite the name).
    warmup_method: 'linear' or 'constant'.
  """
  base_lr: float
  milestones: tuple[int, ...]
  gamma: float = 0.1
  warmup_factor: float = 1.0 / 3
  warmup_iters: int = 500
  warmup_method: str = "linear"

  def __post_init__(self):
    object.__setattr__(self, "milestones", tuple(self.milestones))
    if list(self.milestones) != sorted(self.milestones):
      raise ValueError(f"milestones must be increasing, got {self.milestones}")
    if self.warmup_method not in ("constant", "linear"):
      raise ValueError(f"warmup_method must be 'constant' or 'linear', got {self.warmup_method!r}")

  def scaled(self, factor: float) -> "WarmupMultiStepSchedule":
    """Same schedule for a param group whose initial lr is base_lr * factor (e.g. BIAS_LR_FACTOR)."""
    return dataclasses.replace(self, base_lr=self.base_lr * factor)

  def initial_lr(self) -> float:
    """lr right after construction (the constructor's step to last_epoch 0)."""
    return self(0)

  def __call__(self, epoch: int) -> float:
    """lr of (1-based) epoch `epoch` (the lr after the epoch-start `scheduler.step()`)."""
    warmup = 1
    if epoch < self.warmup_iters:
      if self.warmup_method == "constant":
        warmup = self.warmup_factor
      else:
        alpha = epoch / self.warmup_iters
        warmup = self.warmup_factor * (1 - alpha) + alpha
    return self.base_lr * warmup * self.gamma**bisect.bisect_right(self.milestones, epoch)

  def constant_from(self) -> int:
    """First epoch from which the lr never changes again."""
    return max([self.warmup_iters, *self.milestones])


EpochSchedule = Callable[[int], float]


def epoch_table(schedule: EpochSchedule, num_epochs: int) -> np.ndarray:
  """float64 lr of epochs 1..num_epochs."""
  return np.array([schedule(e) for e in range(1, num_epochs + 1)], dtype=np.float64)


def to_optax(schedule: EpochSchedule, steps_per_epoch: int | Sequence[int], num_epochs: int | None = None) -> optax.Schedule:
  """Per-epoch schedule -> optax schedule over the global (0-based) optimizer step.

  Every step gets exactly its epoch's lr (rounded once to float32). Past the table the last value is held.

  Args:
    schedule: lr(epoch), epoch 1-based (e.g. `CosineLRSchedule` or `WarmupMultiStepSchedule`).
    steps_per_epoch: optimizer steps per epoch (> 0), or the length of every epoch when they differ (PK epochs
      do): step `count` then belongs to the epoch whose cumulative range holds it.
    num_epochs: table length. Defaults to the schedule's `constant_from()`, which makes the held value exact for
      every later epoch too.
  """
  lengths = None if np.ndim(steps_per_epoch) == 0 else np.asarray(steps_per_epoch, np.int64)
  if lengths is None and steps_per_epoch <= 0 or lengths is not None and (lengths.size == 0 or lengths.min() <= 0):
    raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
  if num_epochs is None:
    num_epochs = getattr(schedule, "constant_from", lambda: None)()
    if num_epochs is None:
      raise ValueError("num_epochs is required for a schedule that never becomes constant")
  if lengths is not None:
    num_epochs = max(int(num_epochs), lengths.size)
  table = jnp.asarray(epoch_table(schedule, max(int(num_epochs), 1)), dtype=jnp.float32)

  if lengths is None:
    def fn(count):
      idx = jnp.clip(jnp.asarray(count) // steps_per_epoch, 0, table.shape[0] - 1)
      return table[idx]
    return fn

  ends = jnp.asarray(np.cumsum(lengths), jnp.int32)  # first step of epoch e+1 is ends[e-1]

  def fn_uneven(count):
    idx = jnp.searchsorted(ends, jnp.asarray(count, jnp.int32), side="right")
    return table[jnp.clip(idx, 0, lengths.size - 1)]  # past the last epoch: hold its lr

  return fn_uneven
