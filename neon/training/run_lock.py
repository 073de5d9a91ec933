"""One run per run directory: an exclusive lock on --save (and the metrics directory).

Without it two runs on one --save write the same .tmp_iter_* directories, delete each other's
temporary checkpoints and interleave metrics.jsonl and config.yaml. Rank 0 takes a POSIX
record lock (fcntl F_SETLK via `fcntl.lockf`, non-blocking) on DIR/.neon_run.lock and writes its
owner (host, pid, start time) into it; every rank learns the outcome, so all of them stop with
the same `RunDirectoryInUse`.

The kernel drops the lock when its process dies, however it dies (SIGKILL, OOM; on NFS the
server drops a dead client's locks when its lease expires), so a crashed run's lock never blocks
the next one: the file stays behind with the dead owner's details and the next run takes it.
POSIX locks belong to the process and are not inherited by fork, so DataLoader workers or
checkpoint writers that outlive a killed trainer for a moment do not hold it. On a file system
without locking (some parallel file systems mount without it) the lock is skipped with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from neon.errors import RunDirectoryInUse

LOCK_FILE = ".neon_run.lock"


class RunLock:
    """The held locks (open file descriptors); released at close() or when the process exits."""

    def __init__(self, fds: list[int]):
        self._fds = fds

    def release(self) -> None:
        for fd in self._fds:
            try:
                fcntl.lockf(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        self._fds = []


def _owner(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return "another run"
    if not info:
        return "another run"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} (started {since})"


def _take(directory: Path) -> tuple[Optional[int], Optional[str]]:
    """(fd of the held lock, None) or (None, why not)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            owner = _owner(fd)
            os.close(fd)
            return None, (f"{directory} is in use by {owner}, which holds {directory / LOCK_FILE}. Two runs "
                          f"on one directory would overwrite each other's checkpoints and mix metrics.jsonl. "
                          f"Fix: wait for that run to end (or stop it), or give this run another --save "
                          f"(and --run-dir) directory.")
        os.close(fd)
        print(f"warning: cannot lock {directory} ({e.strerror}: no file locks on this file system); "
              f"make sure no other run uses it.", file=sys.stderr, flush=True)
        return -1, None
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)
    return fd, None


def acquire(directories) -> RunLock:
    """Lock every given directory (None entries skipped) on rank 0; collective. Raises
    RunDirectoryInUse on every rank when one is held by a live run."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    fds: list[int] = []
    problem = None
    if rank0:
        for directory in dict.fromkeys(Path(d).resolve() for d in directories if d):
            fd, problem = _take(directory)
            if problem:
                break
            if fd >= 0:
                fds.append(fd)
    failed = torch.tensor([float(problem is not None)])
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            failed = failed.cuda()
        dist.all_reduce(failed)
    lock = RunLock(fds)
    if failed.item():
        lock.release()
        raise RunDirectoryInUse(problem or "the run directory is in use by another run (see rank 0's message)")
    return lock
