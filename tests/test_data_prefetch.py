"""Prefetching batches to the devices: order, the iterator position that goes with each batch, bad depth."""
import numpy as np
import pytest

from clipreid_jax.data.prefetch import prefetch


class Counter:
  """A checkpointable iterator: its state is how many items it has handed out."""

  def __init__(self, n):
    self.n, self.next_index = n, 0

  def __iter__(self):
    return self

  def __next__(self):
    if self.next_index >= self.n:
      raise StopIteration
    self.next_index += 1
    return {"x": np.full(2, self.next_index - 1)}

  def get_state(self):
    return {"next_index": self.next_index}


@pytest.mark.parametrize("depth", [1, 2, 5, 9])
def test_order_and_positions(depth):
  it = Counter(7)
  seen = []
  for batch, state in prefetch(it, lambda b: b["x"] * 10, depth=depth, get_state=it.get_state):
    i = len(seen)
    np.testing.assert_array_equal(batch, [10 * i, 10 * i])
    assert state == {"next_index": i + 1}  # the position after this batch, not the iterator's (ahead)
    assert it.next_index == min(7, i + 1 + depth)  # `depth` batches are already pulled and sent
    seen.append(i)
  assert seen == list(range(7))


def test_resume_from_a_recorded_position_repeats_nothing():
  it = Counter(6)
  gen = prefetch(it, lambda b: int(b["x"][0]), depth=3, get_state=it.get_state)
  first = [next(gen) for _ in range(2)]
  position = first[-1][1]  # what a pre-emption after the second step records
  resumed = Counter(6)
  resumed.next_index = position["next_index"]
  rest = [b for b, _ in prefetch(resumed, lambda b: int(b["x"][0]), depth=3, get_state=resumed.get_state)]
  assert [b for b, _ in first] + rest == list(range(6))


def test_bad_depth():
  with pytest.raises(ValueError, match="prefetch depth: expected at least 1, got 0"):
    next(prefetch(iter([1]), lambda b: b, depth=0))
