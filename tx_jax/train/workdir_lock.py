"""An exclusive lock on a training workdir: one `tx-jax train` at a time.

`<workdir>/.lock` is held with `fcntl.flock` and holds a JSON record
{host, pid, since, heartbeat} that a background thread refreshes every
HEARTBEAT_S seconds. A second run finds the flock taken (same host, or a
shared filesystem whose flock works) and stops with a UserError naming the
holder. A lock left by a dead process is taken over with one warning line:
on this host the kernel has released the flock and the record's pid is gone;
on a shared filesystem where flock does not reach other hosts, the record's
heartbeat is older than the stale timeout (`TX_JAX_LOCK_STALE_S`, default
600 s). Releasing removes the file, so a finished run leaves no trace.

Only training writes to a workdir; eval, embed and generate read and take no
lock. In a multi-host job process 0 takes it for the whole job.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time

from tx_jax.errors import UserError

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
_HELD: set[str] = set()  # lock files this process holds (where flock cannot tell)


def stale_after_s() -> float:
  """Seconds without a heartbeat after which another host's lock counts as dead."""
  try:
    return float(os.environ.get("TX_JAX_LOCK_STALE_S", 600))
  except ValueError:
    return 600.0


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _age_s(stamp) -> float:
  """Seconds since an ISO time stamp (inf when unreadable)."""
  try:
    then = datetime.datetime.fromisoformat(str(stamp))
  except ValueError:
    return float("inf")
  if then.tzinfo is None:
    then = then.replace(tzinfo=datetime.timezone.utc)
  return (datetime.datetime.now(datetime.timezone.utc) - then).total_seconds()


def _pid_alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except (ProcessLookupError, ValueError, TypeError, OverflowError):
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def _read_record(fd: int) -> dict | None:
  """The JSON record in the open lock file, or None if empty / unreadable."""
  for _ in range(5):  # the holder may be rewriting it right now
    try:
      raw = os.pread(fd, 4096, 0)
      record = json.loads(raw.decode("utf-8")) if raw.strip() else None
      return record if isinstance(record, dict) else None
    except (ValueError, UnicodeDecodeError):
      time.sleep(0.02)
    except OSError:
      return None
  return None


def _holder(record: dict | None) -> str:
  if not record:
    return "another process (its lock record is empty)"
  return (f"pid {record.get('pid')} on host {record.get('host')} since {record.get('since')} "
          f"(last heartbeat {record.get('heartbeat')})")


class WorkdirLock:
  """Context manager: holds `<workdir>/.lock` for the life of a training run."""

  def __init__(self, workdir: str, heartbeat_s: float = HEARTBEAT_S):
    self.path = os.path.join(workdir, LOCK_NAME)
    self.heartbeat_s = heartbeat_s
    self._fd: int | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._record: dict = {}

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()

  def acquire(self):
    """Takes the lock or raises UserError naming the holder."""
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        flocked = self._flock(fd)
        if not flocked:
          record = _read_record(fd)
          raise UserError(f"workdir {os.path.dirname(self.path)!r} is in use by "
                          f"{_holder(record)}; wait for that run to finish, stop it, or "
                          f"use another --workdir")
        try:
          same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:  # the holder released (and removed) it meanwhile
          same_file = False
        if not same_file:
          os.close(fd)
          continue
        self._take_over_or_refuse(fd)
      except BaseException:
        if self._fd is None:
          os.close(fd)
        raise
      break
    self._record = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}
    self._write()
    _HELD.add(os.path.realpath(self.path))
    self._thread = threading.Thread(target=self._beat, name="workdir_lock_heartbeat",
                                    daemon=True)
    self._thread.start()

  def _flock(self, fd: int) -> bool:
    """True if flock was granted or is unsupported here (the record decides then)."""
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return True
    except BlockingIOError:
      return False
    except OSError as e:
      if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return True  # e.g. NFS without a lock manager: heartbeats decide
      raise

  def _take_over_or_refuse(self, fd: int):
    """With the flock held: a record left in the file is a dead run's, or flock is not shared."""
    record = _read_record(fd)
    if not record:
      self._fd = fd
      return
    here = record.get("host") == socket.gethostname()
    age = _age_s(record.get("heartbeat"))
    if here and record.get("pid") == os.getpid():
      alive = os.path.realpath(self.path) in _HELD  # else left by an earlier run in it
    elif here:
      alive = _pid_alive(record.get("pid")) and age < stale_after_s()
    else:  # another host: its flock may not reach us, so trust a fresh heartbeat
      alive = age < stale_after_s()
    if alive:
      raise UserError(f"workdir {os.path.dirname(self.path)!r} is in use by {_holder(record)}; "
                      f"wait for that run to finish, stop it, or use another --workdir")
    why = ("which is no longer running" if here else
           f"whose heartbeat is {age:.0f} s old (over TX_JAX_LOCK_STALE_S={stale_after_s():.0f})")
    sys.stderr.write(f"tx-jax: warning: taking over the workdir lock of {_holder(record)}, "
                     f"{why}\n")
    self._fd = fd

  def _write(self):
    self._record["heartbeat"] = _now()
    data = json.dumps(self._record).encode()
    try:
      os.ftruncate(self._fd, 0)
      os.pwrite(self._fd, data, 0)
    except OSError:
      pass  # a full disk must not kill the heartbeat; the flock still holds

  def _beat(self):
    while not self._stop.wait(self.heartbeat_s):
      self._write()

  def release(self):
    if self._fd is None:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    _HELD.discard(os.path.realpath(self.path))
    try:
      os.remove(self.path)  # while still holding the flock (see acquire's inode check)
    except OSError:
      pass
    os.close(self._fd)
    self._fd = None
