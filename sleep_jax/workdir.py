"""The workdir of a command: checked before any compute, locked while a process uses it, with a
log file of every invocation (``run.log``: time, command line, the whole config).

A lock is ``WORKDIR/.lock`` holding the holder's host and pid, created atomically (O_EXCL) and
removed when the process ends. A second process on the same workdir stops at once naming the
holder; a lock whose process is gone (same host, pid not alive) is stale and taken over. Remote
workdirs (``gs://...``) and multi-host jobs (every host writes the same workdir) are not locked.
"""

from __future__ import annotations

import atexit
import datetime
import errno
import json
import os
import shutil
import socket
import tempfile
from typing import Optional, Sequence

from sleep_jax.errors import UserError

LOCK = ".lock"
LOG = "run.log"


def is_remote(workdir: str) -> bool:
  return "://" in workdir


def prepare(workdir: str) -> None:
  """The workdir exists (created if needed), is a directory and is writable; else UserError."""
  if is_remote(workdir):
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"workdir {workdir!r} is a file, not a directory; pass a directory "
                    "(it is created if missing)")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test_"):
      pass
  except OSError as e:
    raise UserError(f"workdir {workdir!r} is not writable ({e.strerror}); pass a directory you "
                    "can write to") from None


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # someone else's live process
  return True


class Lock:
  """``with Lock(workdir):`` (or ``acquire()``/``release()``)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK)
    self.held = False

  def _holder(self) -> Optional[dict]:
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None

  def acquire(self) -> "Lock":
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "since": datetime.datetime.now().isoformat(timespec="seconds")}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        h = self._holder()
        if h and h.get("host") == me["host"] and not _alive(int(h.get("pid", -1))):
          os.remove(self.path)  # stale: its process is gone
          continue
        who = (f"pid {h.get('pid')} on host {h.get('host')} (since {h.get('since')})" if h
               else "another process")
        raise UserError(f"workdir {os.path.dirname(self.path)!r} is in use by {who}; wait for it "
                        f"to finish, use another --workdir, or delete {self.path} if that "
                        "process is gone") from None
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self.held = True
      atexit.register(self.release)
      return self
    raise UserError(f"could not take the lock {self.path}")

  def release(self) -> None:
    if self.held:
      self.held = False
      h = self._holder()
      if h and h.get("pid") == os.getpid():
        os.remove(self.path)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def log_invocation(workdir: str, argv: Sequence[str], config_text: str) -> str:
  """Appends the time, the command line and the config to ``WORKDIR/run.log``; returns its path."""
  path = os.path.join(workdir, LOG)
  if is_remote(workdir):
    return path
  with open(path, "a", encoding="utf-8") as f:
    f.write(f"=== {datetime.datetime.now().isoformat(timespec='seconds')} "
            f"pid {os.getpid()}\n{' '.join(argv)}\n{config_text}\n")
  return path


def _size(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def is_disk_full(e: BaseException) -> bool:
  while e is not None:  # orbax may wrap the OSError
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    e = e.__cause__ or e.__context__
  return False


def disk_full(path: str, like: str = "") -> UserError:
  """The error for a save into ``path`` that ran out of space; ``like`` is an earlier save of the
  same kind (its size is what the next one needs)."""
  d = path if os.path.isdir(path) else os.path.dirname(path) or "."
  while not os.path.exists(d):
    d = os.path.dirname(d) or "."
  free = shutil.disk_usage(d).free
  need = f"; the last save took {_size(like) / 2**20:.0f} MiB" if like and os.path.exists(like) else ""
  return UserError(f"disk full while saving to {path}: {free / 2**20:.0f} MiB free{need}. Free "
                   "space (or use another --workdir) and run the same command: it resumes from "
                   "the last complete checkpoint")
