"""SIGTERM / SIGUSR1 (Slurm's pre-emption warning, torchrun's forwarding): remembered, acted on
by the Trainer at the end of the step (save, then exit cleanly).

SIGINT (Ctrl-C) stops the run at once without a save (KeyboardInterrupt, exit status 130), as
Python's default handler does; it is also remembered, so that a KeyboardInterrupt that library
code catches on its way (seen once in a test: the run went on to the end) still stops the run at
the end of the step (`raise_if_interrupted`).

A stop signal the run cannot act on does not leave it hanging: when the main thread is blocked
in a C call (a collective waiting on a lost rank), Python's handlers cannot run, so the first
SIGTERM is never seen. A thread watches the signals through Python's wakeup fd, which the
interpreter writes even then: a further stop signal (SIGTERM, SIGUSR1 or SIGINT) that arrives
at least GRACE_S seconds after a first one the handlers have not run for ends the process at
once. It kills the DataLoader workers (they ignore the stop signals) and exits with status 128 +
the signal's number, as a process killed by it would; the checkpoint being written, if any,
never becomes the latest (its marker is moved last). A signal delivered twice at once (Slurm
signals a job step's processes and torchrun forwards the same signal) or a second one while the
run saves after the first changes nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Optional

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_SIGNALS = (*EXIT_SIGNALS, signal.SIGINT)
GRACE_S = 2.0  # the main thread has this long to run the first signal's handler


class SignalFlag:
    """Remembers the first SIGTERM/SIGUSR1; the loop saves and exits at the end of the step."""

    def __init__(self, enabled: bool):
        self.received: Optional[str] = None
        self.interrupted = False
        self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._interrupt)}
        if enabled:
            for sig in EXIT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        self._watch = _SecondSignal(self)

    def _handle(self, signum, _frame):
        self.received = self.received or signal.Signals(signum).name

    def _interrupt(self, _signum, _frame):
        self.interrupted = True
        raise KeyboardInterrupt

    def raise_if_interrupted(self):
        if self.interrupted:
            raise KeyboardInterrupt

    def restore(self):
        self._watch.stop()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _SecondSignal:
    """The watcher thread: reads the signals the interpreter writes to its wakeup fd."""

    def __init__(self, flag: SignalFlag):
        self.flag = flag
        self._read, write = os.pipe()
        os.set_blocking(write, False)
        self._previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._write = write
        self._thread = threading.Thread(target=self._watch, name="neon-second-signal", daemon=True)
        self._thread.start()

    def _watch(self):
        first = None  # when the first stop signal arrived
        while True:
            try:
                data = os.read(self._read, 64)
            except OSError:
                return
            if not data:
                return
            now = time.monotonic()
            for signum in data:
                if signum not in STOP_SIGNALS:
                    continue
                if first is None:
                    first = now
                elif now - first >= GRACE_S and self.flag.received is None and not self.flag.interrupted:
                    _exit_now(signum)  # the first one's handler never ran: the main thread is stuck

    def stop(self):
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._write)  # the watcher reads end-of-file and returns


def _exit_now(signum: int) -> None:
    name = signal.Signals(signum).name
    print(f"pretrain_neon.py: a second stop signal ({name}): stopping now, without a save; the latest "
          f"complete checkpoint in --save stays the one to resume from.", file=sys.stderr, flush=True)
    try:
        import psutil

        for child in psutil.Process().children(recursive=True):  # DataLoader workers, a checkpoint writer
            child.kill()
    except Exception:  # noqa: BLE001 - exiting regardless
        pass
    os._exit(128 + signum)
