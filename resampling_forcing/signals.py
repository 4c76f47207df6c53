"""Stop at the next safe point on SIGTERM / SIGINT: the trainer (drops the step in progress, saves, exits),
sample.py (finishes the chunk in progress, writes the video so far) and the synthetic data set's renderer
(Ctrl+C after the video in progress). A second signal raises KeyboardInterrupt at once."""
from __future__ import annotations

import contextlib
import logging
import signal
from typing import Optional

logger = logging.getLogger(__name__)

__all__ = ["GracefulStop", "SecondSignal", "exit_code", "stop_at_once"]


def exit_code(name: str) -> int:
    """What a shell reports for a process ended by signal `name`: 128 + its number (130 SIGINT, 143 SIGTERM)."""
    return 128 + int(signal.Signals[name])


class SecondSignal(KeyboardInterrupt):
    """What GracefulStop raises on a second signal: str() is the message for the user, `exit_code` what a
    shell reports for the signal (128 + its number: 130 SIGINT, 143 SIGTERM)."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.exit_code = exit_code(name)


class GracefulStop:
    """SIGTERM / SIGINT set `requested` (the signal's name) and log `what_happens`; the holder polls
    `requested` at its safe points. A second signal raises SecondSignal (a KeyboardInterrupt) saying
    `second`. `signals`: the ones handled (default both). `install()` is a no-op off the main thread (some
    notebook runners); `close()` restores the previous handlers. Also a context manager."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, what_happens: str, second: str, signals: tuple = SIGNALS):
        self.what_happens, self.second, self.signals = what_happens, second, tuple(signals)
        self.requested: Optional[str] = None
        self._old = {}

    def install(self) -> "GracefulStop":
        for s in self.signals:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is not None:
            raise SecondSignal(name, f"second {name}: {self.second}")
        self.requested = name
        logger.warning("%s received: %s (a second one stops at once)", name, self.what_happens)

    def exit_code(self) -> int:
        """The exit code for the signal received (signals.exit_code)."""
        return exit_code(self.requested or "SIGINT")

    def close(self) -> None:
        for s, h in self._old.items():
            try:
                signal.signal(s, h)
            except ValueError:
                pass
        self._old.clear()

    def __enter__(self) -> "GracefulStop":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def stop_at_once(message: str, signals: tuple = GracefulStop.SIGNALS):
    """While the context runs, SIGTERM / SIGINT raise SecondSignal (a KeyboardInterrupt: the CLIs' guard
    prints it as one line and exits 128 + the signal) saying `message`: for the part of a command with
    nothing to finish (loading), so that a stop there is not silent. A GracefulStop inside it takes over
    and gives it back. Off the main thread: no handlers."""
    def handle(signum, frame):
        name = signal.Signals(signum).name
        raise SecondSignal(name, f"{name}: {message}")

    old = {}
    for s in signals:
        try:
            old[s] = signal.signal(s, handle)
        except ValueError:
            pass
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
