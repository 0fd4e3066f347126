"""Shared test fixtures.

Golden fixtures (outputs of the official PyTorch code) live in the directory named by the environment
variable CLIPREID_GOLDEN, default `../shared/golden` relative to the repository root. Tests discover their
cases from what is there and assume no sizes, seeds or counts the files do not state.
"""
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def golden_root() -> pathlib.Path:
  return pathlib.Path(os.environ.get("CLIPREID_GOLDEN", REPO.parent / "shared" / "golden")).resolve()


def golden_cases(*parts: str) -> list[pathlib.Path]:
  """Sub-directories of golden/<parts> (e.g. the variants under vit/), sorted; [] if absent."""
  d = golden_root().joinpath(*parts)
  return sorted(p for p in d.iterdir() if p.is_dir()) if d.is_dir() else []


@pytest.fixture(scope="session")
def golden() -> pathlib.Path:
  root = golden_root()
  if not root.is_dir():
    raise FileNotFoundError(f"{root}: golden fixtures not found (set CLIPREID_GOLDEN)")
  return root


@pytest.fixture(scope="session", autouse=True)
def _own_cache_folder(tmp_path_factory):
  """main keeps JAX's compilation cache under $XDG_CACHE_HOME (`compilation_cache` 'auto'): the suite's processes use
  a folder of the session's (one per test worker), not the user's ~/.cache, so a session starts cold and leaves
  nothing behind."""
  saved = os.environ.get("XDG_CACHE_HOME")
  os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
  yield
  if saved is None:
    os.environ.pop("XDG_CACHE_HOME", None)
  else:
    os.environ["XDG_CACHE_HOME"] = saved
