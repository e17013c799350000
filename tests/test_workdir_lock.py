"""The workdir lock: a second `train` exits 2 naming the holder; dead holders are taken over."""

import datetime
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from tx_jax import cli
from tx_jax.errors import UserError
from tx_jax.train import workdir_lock
from tx_jax.train.workdir_lock import LOCK_NAME, WorkdirLock

from test_bad_inputs import NEW, ROOT, run_main, tree_digest

HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from tx_jax.train.workdir_lock import WorkdirLock
    lock = WorkdirLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    sys.stdin.read()  # holds the lock until the test closes stdin
    lock.release()
    """)


@pytest.fixture
def holder(tmp_path):
  """A subprocess that holds the lock on tmp_path/wd until the test ends."""
  workdir = tmp_path / "wd"
  workdir.mkdir()
  proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=ROOT), str(workdir)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "locked"
  yield workdir, proc
  proc.stdin.close()
  proc.wait(timeout=30)


def write_record(workdir, **record):
  now = datetime.datetime.now(datetime.timezone.utc)
  record.setdefault("since", (now - datetime.timedelta(hours=1)).isoformat())
  if "heartbeat_age_s" in record:
    record["heartbeat"] = (now - datetime.timedelta(seconds=record.pop("heartbeat_age_s"))
                           ).isoformat()
  (workdir / LOCK_NAME).write_text(json.dumps(record))


def dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_second_train_exits_2_naming_the_holder(holder, capsys):
  workdir, proc = holder
  before = tree_digest(workdir)
  capsys.readouterr()
  code = run_main([a.format(new=workdir) for a in NEW])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1, err
  assert f"pid {proc.pid} on host {socket.gethostname()} since " in err[0]
  assert "is in use" in err[0]
  assert tree_digest(workdir) == before  # the holder's record untouched


def test_lock_in_one_process_refuses_a_second_and_release_removes_the_file(tmp_path):
  first = WorkdirLock(str(tmp_path))
  with first:
    record = json.loads((tmp_path / LOCK_NAME).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert set(record) == {"host", "pid", "since", "heartbeat"}
    with pytest.raises(UserError, match=rf"in use by pid {os.getpid()} on host"):
      WorkdirLock(str(tmp_path)).acquire()
  assert not (tmp_path / LOCK_NAME).exists()
  with WorkdirLock(str(tmp_path)):  # free again
    pass


def test_heartbeat_is_refreshed(tmp_path):
  with WorkdirLock(str(tmp_path), heartbeat_s=0.05):
    first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
    import time
    deadline = time.time() + 5
    while json.loads((tmp_path / LOCK_NAME).read_text() or "{}").get("heartbeat") == first:
      assert time.time() < deadline, "heartbeat never refreshed"
      time.sleep(0.2)


def test_lock_of_a_dead_process_is_taken_over_with_one_warning(tmp_path, capsys):
  pid = dead_pid()
  write_record(tmp_path, host=socket.gethostname(), pid=pid, heartbeat_age_s=1)
  with WorkdirLock(str(tmp_path)):
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"taking over the workdir lock of pid {pid}" in err[0]
  assert "no longer running" in err[0]


def test_other_hosts_fresh_heartbeat_refuses_and_a_stale_one_is_taken_over(tmp_path, capsys,
                                                                          monkeypatch):
  # flock may not reach across hosts on a shared filesystem: the heartbeat decides.
  write_record(tmp_path, host="other-host", pid=1234, heartbeat_age_s=5)
  with pytest.raises(UserError, match=r"in use by pid 1234 on host other-host"):
    WorkdirLock(str(tmp_path)).acquire()
  monkeypatch.setenv("TX_JAX_LOCK_STALE_S", "60")
  write_record(tmp_path, host="other-host", pid=1234, heartbeat_age_s=120)
  with WorkdirLock(str(tmp_path)):
    pass
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "other-host" in err[0] and "120 s old" in err[0]


def test_flock_unsupported_falls_back_to_the_record(tmp_path, monkeypatch):
  def no_flock(fd, op):
    raise OSError(workdir_lock.errno.ENOLCK, "No locks available")
  monkeypatch.setattr(workdir_lock.fcntl, "flock", no_flock)
  with WorkdirLock(str(tmp_path)):
    with pytest.raises(UserError, match="in use by"):  # live pid, fresh heartbeat
      WorkdirLock(str(tmp_path)).acquire()


def test_failed_first_run_leaves_no_workdir_and_no_lock(tmp_path, capsys):
  workdir = tmp_path / "new"
  code = run_main([a.format(new=workdir) for a in NEW] + ["--config.data.source=file:/nope.txt"])
  assert code == 2 and not workdir.exists()
  # An existing empty workdir stays, empty.
  workdir.mkdir()
  code = run_main([a.format(new=workdir) for a in NEW] + ["--config.data.source=file:/nope.txt"])
  assert code == 2 and os.listdir(workdir) == []
