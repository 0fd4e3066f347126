"""Prefetching batches to the devices: order, how far ahead the iterator runs, bad depth."""
import numpy as np
import pytest

from clipreid_jax.data.prefetch import prefetch


class Counter:
  """An iterator that remembers how many items it has handed out."""

  def __init__(self, n):
    self.n, self.next_index = n, 0

  def __iter__(self):
    return self

  def __next__(self):
    if self.next_index >= self.n:
      raise StopIteration
    self.next_index += 1
    return {"x": np.full(2, self.next_index - 1)}


@pytest.mark.parametrize("depth", [1, 2, 5, 9])
def test_order_and_lookahead(depth):
  it = Counter(7)
  seen = []
  for batch in prefetch(it, lambda b: b["x"] * 10, depth=depth):
    i = len(seen)
    np.testing.assert_array_equal(batch, [10 * i, 10 * i])
    assert it.next_index == min(7, i + 1 + depth)  # `depth` batches are already pulled and sent
    seen.append(i)
  assert seen == list(range(7))


def test_bad_depth():
  with pytest.raises(ValueError, match="prefetch depth: expected at least 1, got 0"):
    next(prefetch(iter([1]), lambda b: b, depth=0))
