"""Ctrl-C and SIGTERM as a request to stop at the next safe point.

    with StopRequest(log) as stop:     # the handlers are this process's while the block runs
        ...                            # the loop checks stop.signum between two steps
"""
from __future__ import annotations

import signal


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the training to stop at the next safe point (between two
    steps, never inside a checkpoint write); a second Ctrl-C stops at once. `signum` is the
    signal that asked, or 0."""

    def __init__(self, log=print):
        self.signum, self.log, self._old = 0, log, {}

    def _handler(self, signum, frame):
        if self.signum:  # asked twice: stop now
            raise KeyboardInterrupt
        self.signum = signum
        self.log(f"\n{signal.Signals(signum).name}: stopping after this step "
                 "(the last checkpoint is kept; Ctrl-C again to stop at once)")

    def __enter__(self):
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self._old = {}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
