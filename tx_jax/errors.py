"""The exception types for failures a user can fix, and their exit statuses.

`UserError`: a problem in the input (bad flags, files, configs); exit status 2.
`IOFailure`: the machine could not read or write the run's own files (disk
full, quota, read-only or failing filesystem); exit status 3. The CLI prints
either as a single line; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil

USER_ERROR_STATUS = 2
IO_FAILURE_STATUS = 3
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class UserError(Exception):
  """A problem in the user's input, with a message that names it and the fix."""


class IOFailure(Exception):
  """Reading or writing a file failed in the machine, not in the input (exit status 3)."""


def is_out_of_space(error: BaseException) -> bool:
  """True for ENOSPC / EDQUOT, also when a library (tensorstore) reports it as text."""
  if isinstance(error, OSError) and error.errno in _NO_SPACE:
    return True
  text = str(error)
  return ("No space left on device" in text or "Disk quota exceeded" in text
          or "os_error_code='28'" in text or "os_error_code='122'" in text)


def is_io_error(error: BaseException) -> bool:
  """An OSError, or a library error that carries an operating-system error code."""
  return isinstance(error, OSError) or is_out_of_space(error) or "os_error_code=" in str(error)


def _mib(n: float) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
    if n >= size:
      return f"{n / size:.1f} {unit}"
  return f"{n / 2**10:.0f} KiB"


def free_bytes(path: str) -> int | None:
  """Free bytes on the filesystem holding path (or its nearest existing parent)."""
  path = os.path.abspath(path)
  while path and not os.path.exists(path):
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


def describe_io_error(error: BaseException, operation: str, path: str,
                      needs_bytes: int | None = None, kept: str | None = None) -> str:
  """One line: the operation, the path, the system's reason, and for a full disk the room needed."""
  if isinstance(error, OSError):
    reason = error.strerror or str(error)
    path = error.filename if error.filename else path
  else:
    reason = ("No space left on device" if is_out_of_space(error)
              else str(error).splitlines()[0][:200])
  line = f"{operation} '{path}' failed: {reason}" + (f"; {kept}" if kept else "")
  if is_out_of_space(error):
    free = free_bytes(path)
    line += (f"; it needs about {_mib(needs_bytes)}" if needs_bytes else "") + (
        f", {_mib(free)} is free there" if free is not None else "")
    line += "; free some space and run the same command again"
  return line


@contextlib.contextmanager
def io_operation(operation: str, path: str, needs_bytes: int | None = None):
  """Turns an OSError inside into an IOFailure naming the operation and path."""
  try:
    yield
  except OSError as e:
    raise IOFailure(describe_io_error(e, operation, path, needs_bytes)) from None
