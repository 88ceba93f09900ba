"""Graceful stop on SIGTERM/SIGINT: the step in progress finishes, then the run checkpoints."""
import signal


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
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        self.signum = signum

    @property
    def requested(self):
        return self.signum is not None

    @property
    def exit_code(self):
        # SIGTERM is how schedulers preempt: a clean, resumable stop is a success.
        return 0 if self.signum == signal.SIGTERM else 130
