"""Every command in README.md runs: quick ones for real in a sandbox, training runs with --dry_run.

The sandbox has what the commands name: a synthetic Market-1501 under data/, small random CLIP files named
`ViT-B-16.pt` / `RN50.pt` (plain state dicts), and small official-layout CLIP-ReID checkpoints with the real
geometry (129 or 211 positional rows, 751 or 1041 identities, a 15-camera SIE table).
"""
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

from clip_reference import random_clip, state_dict_numpy
from clipreid_jax.convert import resize_pos_embed
from clipreid_jax.data.synthetic import write_synthetic_market

REPO = pathlib.Path(__file__).resolve().parents[1]


def readme_commands(path: str = "README.md") -> list[str]:
  """Shell commands of the ```bash blocks: continuation lines joined, comments dropped."""
  text = (REPO / path).read_text()
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
    for cmd in block.replace("\\\n", " ").splitlines():
      cmd = cmd.strip()
      if cmd and not cmd.startswith("#"):
        commands.append(" ".join(cmd.split()))
  return commands


def indented_commands(path: str) -> list[str]:
  """`python -m ...` lines of indented code blocks (data/README.md), trailing comments dropped."""
  lines = (REPO / path).read_text().splitlines()
  return [" ".join(l.split("#")[0].split()) for l in lines if l.startswith("    python -m")]


def without_optional(cmd: str) -> str:
  """Usage lines show optional arguments in [brackets]; run the command without them."""
  return " ".join(re.sub(r"\[[^\]]*\]", " ", cmd).split())


def _official_checkpoint(clip_sd: dict, grid, num_classes: int, sie_rows: int = 0) -> dict:
  """An official CLIP-ReID state dict (names and layouts of `build_transformer`) from a CLIP state dict."""
  sd = {}
  for k, v in clip_sd.items():
    if k.startswith("visual."):
      sd["image_encoder." + k[len("visual."):]] = v
    elif k.startswith(("transformer.", "positional_embedding", "ln_final.", "text_projection")):
      sd["text_encoder." + k] = v
  sd["image_encoder.positional_embedding"] = resize_pos_embed(clip_sd["visual.positional_embedding"], grid)
  d, e, w = clip_sd["visual.conv1.weight"].shape[0], clip_sd["text_projection"].shape[1], clip_sd["ln_final.weight"].shape[0]
  rng = np.random.default_rng(0)
  sd.update({"classifier.weight": 0.001 * rng.standard_normal((num_classes, d)),
             "classifier_proj.weight": 0.001 * rng.standard_normal((num_classes, e)),
             "prompt_learner.cls_ctx": 0.02 * rng.standard_normal((num_classes, 4, w)),
             "prompt_learner.token_prefix": rng.standard_normal((1, 5, w)),
             "prompt_learner.token_suffix": rng.standard_normal((1, 68, w))})
  for neck, n in (("bottleneck", d), ("bottleneck_proj", e)):
    sd.update({f"{neck}.weight": np.ones(n), f"{neck}.bias": np.zeros(n), f"{neck}.running_mean": np.zeros(n),
               f"{neck}.running_var": np.ones(n)})
  if sie_rows:
    sd["cv_embed"] = 0.02 * rng.standard_normal((sie_rows, d))
  return {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in sd.items()}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
  box = tmp_path_factory.mktemp("docs")
  (box / "configs").symlink_to(REPO / "configs")
  write_synthetic_market(box / "data" / "Market-1501-v15.09.15", num_train_ids=6, num_test_ids=4, imgs_per_id=4,
                         num_cams=3, size=(128, 64), seed=5)
  small = dict(context_length=77, transformer_width=64, transformer_heads=1, transformer_layers=1)
  vit = state_dict_numpy(random_clip(1, embed_dim=32, image_resolution=224, vision_layers=1, vision_width=64,
                                     vision_patch_size=16, **small))
  rn = state_dict_numpy(random_clip(2, embed_dim=32, image_resolution=224, vision_layers=(1, 1, 1, 1), vision_width=8,
                                    vision_patch_size=None, **small))
  torch.save({k: torch.from_numpy(v) for k, v in vit.items()}, box / "ViT-B-16.pt")
  torch.save({k: torch.from_numpy(v) for k, v in rn.items()}, box / "RN50.pt")
  torch.save(_official_checkpoint(vit, (16, 8), 751), box / "Market1501_clipreid_ViT-B-16_60.pth")
  torch.save(_official_checkpoint(vit, (21, 10), 1041, sie_rows=15), box / "MSMT17_clipreid_12x12sie_ViT-B-16_60.pth")
  return box


def _as_argv(cmd: str) -> list[str]:
  argv = shlex.split(cmd)
  assert argv[:2] == ["python", "-m"], cmd
  return [sys.executable] + argv[1:]


def _run(cmd_argv, cwd):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run(cmd_argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


COMMANDS = readme_commands()


def test_readme_has_the_commands():
  assert any("configs/demo.py" in c for c in COMMANDS) and any("pytest" in c for c in COMMANDS)
  assert len(COMMANDS) >= 10


def _kind(cmd: str) -> str:
  if "pip install" in cmd:
    return "quickstart"  # installing is CI's job; the demo runs in test_demo_command
  if cmd.startswith("gcloud"):
    return "pod"
  if "clipreid_jax.main" in cmd and "mode=eval" not in cmd and "mode=extract" not in cmd:
    return "train"
  return "quick"


ORDERED = sorted(COMMANDS, key=lambda c: ("clipreid_jax.main" in c, c))  # conversions before evaluation


def test_quick_commands_run(sandbox):
  """In README order within kind: conversions before the evaluation that uses their output."""
  quick = [c for c in ORDERED if _kind(c) == "quick"]
  assert any("convert clipreid" in c for c in quick) and any("mode=eval" in c for c in quick)
  for cmd in quick:
    out = _run(_as_argv(cmd), sandbox)
    assert out.returncode == 0, f"{cmd}\n{out.stderr[-3000:]}"
    if "mode=eval" in cmd:
      assert out.stdout.strip().splitlines()[-1].startswith("final: mAP")


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if _kind(c) in ("train", "pod")])
def test_training_command_config_is_valid(sandbox, cmd):
  if cmd.startswith("gcloud"):
    cmd = re.search(r'"cd [^&]+&& (python -m [^"]+)"', cmd).group(1)
  out = _run(_as_argv(cmd) + ["--dry_run"], sandbox)
  assert out.returncode == 0, f"{cmd}\n{out.stderr[-3000:]}"
  assert "config OK" in out.stdout


def test_demo_command(tmp_path):
  """The first Quickstart command (after its install step), for real."""
  cmd = next(c for c in COMMANDS if "configs/demo.py" in c).split("&&")[-1].strip()
  (tmp_path / "configs").symlink_to(REPO / "configs")
  out = _run(_as_argv(cmd), tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  final = [l for l in out.stdout.splitlines() if l.startswith("final:")]
  assert final and "mAP" in final[0]
  # The demo learns: the synthetic data is hard enough (untrained below 40% mAP) and training at least doubles mAP.
  metrics = json.loads((tmp_path / "workdirs" / "demo" / "metrics.json").read_text())
  assert set(metrics) == {"untrained", "final", "evaluated"} and {"mAP", "R1"} <= set(metrics["final"])
  assert metrics["untrained"]["mAP"] < 40 and metrics["final"]["mAP"] >= 2 * metrics["untrained"]["mAP"]
  assert abs(metrics["final"]["mAP"] - float(final[0].split()[2])) < 0.051
  assert (tmp_path / "workdirs" / "demo" / "model" / "config.json").is_file()
  assert (tmp_path / "workdirs" / "demo" / "visualizations" / "tsne.png").is_file()
  # docs/visualize.md's commands, on the demo's outputs.
  for cmd in readme_commands("docs/visualize.md"):
    out = _run(_as_argv(without_optional(cmd)), tmp_path)
    assert out.returncode == 0, f"{cmd}\n{out.stderr[-2000:]}"
  assert (tmp_path / "vis" / "curves.png").is_file() and (tmp_path / "vis" / "tsne.png").is_file()


@pytest.mark.parametrize("cmd", indented_commands("data/README.md"))
def test_data_readme_commands(sandbox, cmd):
  cmd = cmd.replace("python -m clipreid_jax.data NAME data", "python -m clipreid_jax.data market1501 data")
  out = _run(_as_argv(cmd), sandbox)
  assert out.returncode == 0, f"{cmd}\n{out.stderr[-2000:]}"


def test_lower_bounds_are_the_versions_the_suite_ran_with():
  """pyproject.toml's lower bound of each pinned package is the pin of .ci/min-versions.txt, which
  .ci/min_versions runs the whole suite with: a bound is raised or lowered with the file, never alone (the bounds
  the project started with, jax 0.4.35 and Pillow 10, failed dozens of tests: no jit compiler_options, no
  grain.MultiprocessingOptions, tfds needing TensorFlow, other PIL rounding)."""
  pins = dict(line.split("==") for line in (REPO / ".ci" / "min-versions.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#"))
  assert {"jax", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "pillow"} <= set(pins), pins
  deps = re.search(r"^dependencies = \[(.*?)^\]", (REPO / "pyproject.toml").read_text(), flags=re.S | re.M).group(1)
  bounds = dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([^"]+)"', deps))
  for name, version in pins.items():
    if name == "jaxlib":  # installed with jax, which pins its own jaxlib
      assert version == pins["jax"]
      continue
    assert bounds.get(name) == version, (name, bounds.get(name), version)
  ci = (REPO / ".ci" / "min_versions").read_text()
  assert "-c .ci/min-versions.txt" in ci and "pytest -q -n 2 tests" in ci
