"""The benchmark scripts run (their quick forms from the docs) and end with their goal lines.

Benchmarks measure; tests never time anything. This only keeps the scripts working between the runs that
fill docs/performance.md, docs/evaluation.md and docs/data.md.
"""
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

QUICK = {
    "eval": ["benchmarks/eval_benchmark.py", "--scale", "0.1"],  # docs/evaluation.md "quick check"
    "recipe": ["benchmarks/recipe_benchmark.py", "--tiny", "--scale", "0.001", "--eval_scale", "0.05"],
    "data": ["benchmarks/data_benchmark.py", "--seconds", "1", "--skip-workers"],
    "steps": ["benchmarks/step_benchmark.py", "--list"],
}


@pytest.mark.parametrize("name", sorted(QUICK))
def test_benchmark_runs(name):
  out = subprocess.run([sys.executable, *QUICK[name]], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  if name == "steps":
    assert any("stage 2 ViT-B/16" in l for l in lines)
  else:
    goals = [l for l in lines if l.startswith("goal ")]
    assert goals and all((" met" in l) or ("not measured" in l) for l in goals), goals
