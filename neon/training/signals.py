"""SIGTERM / SIGUSR1 (Slurm's pre-emption warning, torchrun's forwarding): remembered, acted on
by the Trainer at the end of the step (save, then exit cleanly)."""

from __future__ import annotations

import signal
from typing import Optional

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class SignalFlag:
    """Remembers the first SIGTERM/SIGUSR1; the loop saves and exits at the end of the step."""

    def __init__(self, enabled: bool):
        self.received: Optional[str] = None
        self._previous = {}
        if enabled:
            for sig in EXIT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.received = self.received or signal.Signals(signum).name

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
