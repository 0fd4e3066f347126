"""Exceptions and warnings of the data package.

Every error a user can cause with their data (a wrong root, an empty split, a broken image, a bad list file, too few
identities for the sampler) raises a subclass of `DataError` with a one-line message that names the file or folder,
so a CLI can print `str(err)` and exit with code 2. `first_line` and `describe` give the one-line form of any other
library's exception for such messages (the whole package uses them).
"""
import contextlib
import os
import re
import sys
import warnings



class DataError(ValueError):
  """Base class of the data errors a user can fix by fixing their data or options."""


class DatasetNotFoundError(DataError):
  """The root does not hold the expected layout (the message shows the expected layout)."""


class UnknownDatasetError(DataError):
  """A dataset name that the registry does not know."""


class EmptySplitError(DataError):
  """A split (train, query or gallery) has no usable images."""


class ListFileError(DataError):
  """A list file is malformed or names an image that does not exist."""


class ImageReadError(DataError):
  """An image file is empty, is not an image, or cannot be decoded."""


class NotEnoughIdentitiesError(DataError):
  """The identity sampler cannot fill one batch of P distinct identities."""


class DataWarning(UserWarning):
  """Something suspicious but usable: counts that differ from the published ones, a truncated JPEG, no view labels."""


@contextlib.contextmanager
def warnings_as_lines():
  """Inside the block every warning reaches stderr as one line, `warning: ...`, as the CLIs print their errors
  (not Python's two lines with the source line)."""
  with warnings.catch_warnings():
    warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
    yield


def io_cause(e: BaseException) -> str:
  """What of a failed write to tell the user: tensorstore (under orbax) reports a full disk as a ValueError whose
  first line is 300 characters of paths, ending in `[os_error_code='28']`; that code says it."""
  code = re.search(r"os_error_code='?(\d+)", str(e))
  if code:
    return f"[Errno {code.group(1)}] {os.strerror(int(code.group(1)))}"
  return describe(e) if isinstance(e, OSError) else first_line(e)


def first_line(e: BaseException, limit: int = 200) -> str:
  """The first line of `e`'s message cut to `limit` characters ("..." marks a cut), or its type's name where the
  message is empty: what of a library's error fits in a one-line message."""
  text = str(e).strip()
  if not text:
    return type(e).__name__
  line = text.splitlines()[0]
  return line if len(line) <= limit else line[:limit - 3] + "..."


def describe(e: BaseException, limit: int = 200) -> str:
  """`Type: first line of the message`, or `Type` where the message is empty."""
  return f"{type(e).__name__}: {first_line(e, limit)}" if str(e).strip() else type(e).__name__
