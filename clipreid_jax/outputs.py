"""Output folders, checked before the work that fills them (which can take hours), and files written whole."""
from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from typing import Iterator


def output_anchor(out: str | os.PathLike, key: str, error: type[Exception] = ValueError) -> pathlib.Path:
  """The folder `out` is (or will be) created in: `out` itself where it exists, else its nearest existing ancestor.

  Raises `error`, naming `key`, where `out` or that ancestor is not a folder.
  """
  out = pathlib.Path(out).resolve()
  if out.exists():
    if not out.is_dir():
      raise error(f"{key}: {out} exists and is not a folder; expected a folder (or a new name)")
    return out
  anchor = out.parent
  while not anchor.exists():
    anchor = anchor.parent
  if not anchor.is_dir():
    raise error(f"{key}: cannot create {out}: {anchor} is not a folder")
  return anchor


def check_writable(out: str | os.PathLike, key: str, error: type[Exception] = ValueError) -> pathlib.Path:
  """`out`, where it is a folder that can be written or created; else raises `error` naming `key`."""
  anchor = output_anchor(out, key, error)
  if not os.access(anchor, os.W_OK | os.X_OK):
    raise error(f"{key}: cannot create or write {out} ({anchor} is not a writable folder)")
  try:  # permissions are not the whole story (root passes os.access; /proc, a full or read-only mount refuse)
    os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=anchor))
  except OSError as e:
    raise error(f"{key}: cannot create or write {out} (in {anchor}: {e.strerror or type(e).__name__})") from None
  return pathlib.Path(out)


@contextlib.contextmanager
def created_folder(out: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Creates the folder `out` (and its missing parents) for the block; where the block fails, the folders it
  created are removed again (those still empty): a failed first write (a full disk) leaves nothing behind."""
  out = pathlib.Path(out)
  missing, p = [], out.resolve()
  while not p.exists():
    missing.append(p)
    p = p.parent
  out.mkdir(parents=True, exist_ok=True)
  try:
    yield out
  except BaseException:
    for p in missing:  # innermost first
      with contextlib.suppress(OSError):
        p.rmdir()
    raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """A staging path beside `path` that replaces it when the block finishes: a killed or failed write leaves the old
  file (or none), never half of the new one, and a failed one no staging file either."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, text: str) -> None:
  with atomic_file(path) as tmp:
    tmp.write_text(text)
