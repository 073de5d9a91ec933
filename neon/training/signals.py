"""SIGTERM / SIGUSR1 (Slurm's pre-emption warning, torchrun's forwarding): remembered, acted on
by the Trainer at the end of the step (save, then exit cleanly).

SIGINT (Ctrl-C) stops the run at once without a save (KeyboardInterrupt, exit status 130), as
Python's default handler does; it is also remembered, so that a KeyboardInterrupt that library
code catches on its way (seen once in a test: the run went on to the end) still stops the run at
the end of the step (`raise_if_interrupted`)."""

from __future__ import annotations

import signal
from typing import Optional

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class SignalFlag:
    """Remembers the first SIGTERM/SIGUSR1; the loop saves and exits at the end of the step."""

    def __init__(self, enabled: bool):
        self.received: Optional[str] = None
        self.interrupted = False
        self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._interrupt)}
        if enabled:
            for sig in EXIT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.received = self.received or signal.Signals(signum).name

    def _interrupt(self, _signum, _frame):
        self.interrupted = True
        raise KeyboardInterrupt

    def raise_if_interrupted(self):
        if self.interrupted:
            raise KeyboardInterrupt

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
