"""Graceful stop on SIGTERM/SIGINT: the work in progress reaches a safe point, then the run checkpoints.

Installed for a run's whole life (start-up, training, evaluation), so a signal at any moment ends
in a clean, resumable stop. A second Ctrl-C exits at once, without a traceback; the last
checkpoint written stays the one to resume from.
"""
import os
import signal
import sys


class StopRequest:
    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            # A second Ctrl-C means "now": no traceback, no half-written file (writes are atomic).
            print("\ninterrupted again: exiting now; the last checkpoint written is intact", file=sys.stderr,
                  flush=True)
            os._exit(130)
        self.signum = signum

    @property
    def requested(self):
        return self.signum is not None

    @property
    def exit_code(self):
        # SIGTERM is how schedulers preempt: a clean, resumable stop is a success.
        return 0 if self.signum == signal.SIGTERM else 130
