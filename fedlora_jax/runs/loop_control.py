"""How the run loop ends: a Ctrl-C finishes the round in progress; the writers are closed (and the
last row handed over) however the loop ends."""

from __future__ import annotations

import logging

log = logging.getLogger("fedlora_jax")


class closing:
    """Close the run's writers however the loop ends (a crash or a second Ctrl-C included)."""

    def __init__(self, w):
        self.w = w

    def __enter__(self):
        return self.w

    def __exit__(self, *exc):
        if exc[0] is None:
            self.w.close()
            return False
        try:  # the loop failed: still hand the last row to the thinned writers, close, keep the error
            self.w.flush_stop()
            self.w.close()
        except Exception:
            log.warning("closing the metric writers failed after an error", exc_info=True)
        return False


class StopOnSignal:
    """SIGINT (Ctrl-C) during the loop: finish the round in progress, then stop cleanly. A second
    Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False
