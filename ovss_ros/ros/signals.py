"""SIGINT and SIGTERM: as a stop request for the batch tools (``StopSignals``) and as the end of a
node process (``ShutdownSignals``; ``ros.entry`` installs them before the heavy imports). Only the
standard library is imported here.

Batch tools (ovss-bag, ovss-segment):

A batch tool writes each item's outputs together, so that what it reports is what is on disk.
While :class:`StopSignals` is entered, a signal raises ``KeyboardInterrupt`` only inside an
:meth:`StopSignals.interruptible` block, the expensive per-item work that writes nothing, so that
Ctrl-C answers at once; anywhere else (reading, writing an item's outputs, closing the output) it
is only recorded, and :meth:`StopSignals.interruptible` raises at the next item. Any number of
further signals is recorded and nothing more: a second Ctrl-C cannot abort the closing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager: installs the handlers (main thread only) and restores the old ones."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None  # the first stop signal, once one came
        self._interruptible = False
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(number)
        if self._interruptible:
            self._interruptible = False  # one KeyboardInterrupt at most, however many signals
            raise KeyboardInterrupt

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A block a stop signal ends at once; raises KeyboardInterrupt if one came before it.

        Also when the block swallowed the handler's KeyboardInterrupt or turned it into another
        exception (C extensions do: rclpy's ``deserialize_message`` reports it as a TypeError,
        which a caller may take for a broken message): a signal received during the block
        always ends it with KeyboardInterrupt, so no result of an interrupted block is used.
        """
        if self.received is not None:
            raise KeyboardInterrupt
        self._interruptible = True
        try:
            yield
        except Exception as error:
            if self.received is not None:
                raise KeyboardInterrupt from error
            raise
        finally:
            self._interruptible = False
        if self.received is not None:
            raise KeyboardInterrupt

    def ignore_further(self) -> None:
        """Ignore the stop signals from now on, also after the block: for a process that was told
        to stop and has only to exit (a further Ctrl-C would otherwise kill it on the way out)."""
        for number in self._previous:
            signal.signal(number, signal.SIG_IGN)
        self._previous.clear()

    def exit_status(self) -> int:
        """128 + the signal's number, as a shell reports it (SIGINT 130, SIGTERM 143)."""
        return 128 + int(self.received or signal.SIGINT)


SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A shutdown signal that arrived during start-up; the process exits with ``exit_status``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process a signal ended."""
        return 128 + self.signum


class ShutdownSignals:
    """SIGINT and SIGTERM handlers for a node process (handlers run in the main thread).

    Starting (from ``install`` until ``serve``): the first signal raises ``Interrupted`` in the
    main thread. Serving: the first signal calls ``on_request`` (e.g. sets the engine's stop
    event) and ``requested`` becomes true; the spin loop polls it. Every later signal is ignored.
    """

    def __init__(self) -> None:
        self.received: list[int] = []  # signal numbers, in arrival order
        self._on_request: Callable[[], None] | None = None
        self._serving = False

    @classmethod
    def install(cls) -> ShutdownSignals:
        """Handlers for SIGINT and SIGTERM; call from the main thread, before heavy imports."""
        signals = cls()
        for signum in SHUTDOWN_SIGNALS:
            signal.signal(signum, signals._handle)
        return signals

    def serve(self, on_request: Callable[[], None] | None = None) -> None:
        """Start-up is over: from now on a signal asks for an orderly stop."""
        self._on_request = on_request
        self._serving = True

    @property
    def requested(self) -> bool:
        return bool(self.received)

    def name(self) -> str:
        """The first signal's name (SIGINT, SIGTERM), or an empty string."""
        return signal.Signals(self.received[0]).name if self.received else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if len(self.received) > 1:
            return  # shutting down already: let it finish
        if not self._serving:
            raise Interrupted(signum)
        if self._on_request is not None:
            self._on_request()


def ignore_shutdown_signals() -> None:
    """Ignore SIGINT and SIGTERM from now on (a process that is ending)."""
    for signum in SHUTDOWN_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
