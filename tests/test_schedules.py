"""Schedules vs the official per-epoch learning rates in golden/schedules/schedules.json."""
import json
import math

import numpy as np
import pytest

from clipreid_jax import schedules
from conftest import golden_root

RTOL = 1e-12  # closed forms in float64 with the official operation order


def _entries():
  p = golden_root() / "schedules" / "schedules.json"
  if not p.is_file():
    return []
  return [pytest.param(k, v, id=k) for k, v in sorted(json.loads(p.read_text()).items())]


def build(entry):
  """(schedule of a plain group, schedule of a bias group or None) from an entry's official class and settings."""
  s = entry["settings"]
  if "CosineLRScheduler" in entry["official"]:
    sched = schedules.CosineLRSchedule(
        base_lr=s["base_lr"], t_initial=s["num_epochs"], lr_min=s["lr_min"], warmup_t=s["warmup_t"],
        warmup_lr_init=s["warmup_lr_init"], warmup_prefix=s["warmup_prefix"], t_mul=s["t_mul"],
        decay_rate=s["decay_rate"], cycle_limit=s["cycle_limit"])
    if s.get("noise_range") is not None:
      pytest.skip("lr noise is not supported")
    if "create_scheduler" in entry["official"]:  # the factory's fixed arguments must be what the file says
      assert schedules.stage1_cosine(s["base_lr"], s["num_epochs"], s["lr_min"], s["warmup_lr_init"],
                                     s["warmup_t"]) == sched
    return sched, None
  if "WarmupMultiStepLR" in entry["official"]:
    sched = schedules.WarmupMultiStepSchedule(
        base_lr=s["base_lr"], milestones=tuple(s["steps"]), gamma=s["gamma"], warmup_factor=s["warmup_factor"],
        warmup_iters=s["warmup_iters"], warmup_method=s["warmup_method"])
    return sched, sched.scaled(s.get("bias_lr_factor", 1))
  pytest.fail(f"unknown scheduler {entry['official']!r}")


@pytest.mark.parametrize("name,entry", _entries())
def test_every_epoch(name, entry):
  sched, bias = build(entry)
  epochs = entry["epochs"]
  np.testing.assert_allclose([sched(e) for e in epochs], entry["lr"], rtol=RTOL, atol=0)
  if "lr_bias_params" in entry:
    np.testing.assert_allclose([bias(e) for e in epochs], entry["lr_bias_params"], rtol=RTOL, atol=0)
  if "lr_right_after_construction" in entry:
    assert sched.initial_lr() == pytest.approx(entry["lr_right_after_construction"], rel=RTOL)


@pytest.mark.parametrize("name,entry", _entries())
def test_optax_schedule_is_per_epoch(name, entry):
  sched, _ = build(entry)
  epochs, lr = entry["epochs"], np.asarray(entry["lr"])
  spe = 3
  fn = schedules.to_optax(sched, spe)
  counts = np.arange(0, (max(epochs) + 2) * spe)  # two epochs past the end: the held value must stay right
  got = np.asarray([fn(c) for c in counts])
  want = np.asarray([sched(int(c) // spe + 1) for c in counts], np.float32)
  np.testing.assert_array_equal(got, want)
  for e, v in zip(epochs, lr):
    assert float(fn((e - 1) * spe)) == np.float32(v) and float(fn(e * spe - 1)) == np.float32(v)


def test_cosine_restarts_and_t_mul():
  # Forms not in the golden file: restarts with decay, t_mul != 1, warmup_prefix.
  s = schedules.CosineLRSchedule(base_lr=1.0, t_initial=10, lr_min=0.1, decay_rate=0.5, cycle_limit=0)
  assert s(10) == pytest.approx(0.5)  # second cycle starts at lr_max * 0.5
  assert s(15) == pytest.approx(0.05 + 0.5 * 0.45 * (1 + math.cos(math.pi * 0.5)))
  s2 = schedules.CosineLRSchedule(base_lr=1.0, t_initial=4, t_mul=2.0, cycle_limit=2)
  assert s2(4) == pytest.approx(1.0)  # second cycle (length 8) begins at epoch 4
  assert s2(8) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
  assert s2(12) == 0.0 and s2(13) == 0.0
  fn = schedules.to_optax(s2, 1)
  assert float(fn(100)) == 0.0
  s3 = schedules.CosineLRSchedule(base_lr=1.0, t_initial=10, warmup_t=2, warmup_lr_init=0.0, warmup_prefix=True,
                                  cycle_limit=1)
  assert s3(2) == 1.0 and s3(12) == 0.0
  with pytest.raises(ValueError):
    schedules.to_optax(schedules.CosineLRSchedule(base_lr=1.0, t_initial=3), 1)


def test_multistep_constant_warmup():
  s = schedules.WarmupMultiStepSchedule(base_lr=2.0, milestones=(3, 5), gamma=0.5, warmup_factor=0.25,
                                        warmup_iters=2, warmup_method="constant")
  assert [s(e) for e in range(7)] == [0.5, 0.5, 2.0, 1.0, 1.0, 0.5, 0.5]
  with pytest.raises(ValueError):
    schedules.WarmupMultiStepSchedule(base_lr=1.0, milestones=(5, 3))


def test_uneven_epochs_change_lr_at_each_epoch_start():
  """PK epochs differ in length: the lr must change exactly at each epoch's first step."""
  sched = schedules.WarmupMultiStepSchedule(base_lr=1.0, milestones=(2, 3), gamma=0.1, warmup_factor=0.5,
                                            warmup_iters=2, warmup_method="linear")
  lengths = [3, 5, 2, 4]
  fn = schedules.to_optax(sched, lengths)
  expected = np.concatenate([np.full(n, np.float32(sched(e))) for e, n in enumerate(lengths, start=1)])
  got = np.asarray([fn(c) for c in range(sum(lengths))])
  np.testing.assert_array_equal(got, expected)
  assert float(fn(sum(lengths) + 10)) == np.float32(sched(len(lengths)))
  with pytest.raises(ValueError):
    schedules.to_optax(sched, [3, 0])


@pytest.mark.parametrize("milestones", [(2,), ()])
def test_multistep_warmup_longer_than_the_milestones_is_held_exactly(milestones):
  """The lr keeps changing until the warmup ends even after the last milestone: the optax table must reach it."""
  sched = schedules.WarmupMultiStepSchedule(base_lr=1.0, milestones=milestones, gamma=0.1, warmup_factor=0.1,
                                            warmup_iters=5, warmup_method="linear")
  assert sched.constant_from() == 5
  fn = schedules.to_optax(sched, 2)
  got = np.asarray([fn(c) for c in range(16)])
  want = np.asarray([sched(c // 2 + 1) for c in range(16)], np.float32)
  np.testing.assert_array_equal(got, want)
  assert len(set(want[:10].tolist())) == 5  # five different warmup epochs before the lr settles


@pytest.mark.parametrize("kwargs", [dict(num_epochs=120, warmup_t=5), dict(num_epochs=60, warmup_t=5),
                                    dict(num_epochs=7, warmup_t=0)])
def test_cosine_constant_from_is_the_first_epoch_of_the_held_lr(kwargs):
  sched = schedules.stage1_cosine(3.5e-4, lr_min=1e-6, warmup_lr_init=1e-5, **kwargs)
  c = sched.constant_from()
  assert sched(c - 1) != sched(c) and all(sched(e) == sched(c) == 1e-6 for e in range(c, c + 50))
