"""bikewatch.service.signals: handlers that run on a relay thread, never inside the interrupted code.

Real signals sent to this process (SIGUSR1/SIGUSR2, which pytest does not use).
"""

from __future__ import annotations

import os
import signal
import threading

from bikewatch.service.signals import SignalRelay


def test_a_signal_arriving_while_the_main_thread_holds_the_handlers_lock_does_not_deadlock() -> None:
    """The service hung on SIGTERM when it arrived in the middle of a log line: the handler
    wanted structlog's write lock, held by the very thread it interrupted. With the relay the
    handler waits for the lock on its own thread, and gets it once the main thread lets go."""
    lock = threading.Lock()
    handled = threading.Event()

    def handler(_signum: int) -> None:
        with lock:
            handled.set()

    relay = SignalRelay({signal.SIGUSR1: handler}).install()
    try:
        with lock:  # like a log write in progress on the main thread
            os.kill(os.getpid(), signal.SIGUSR1)  # the Python-level handler runs right here, and returns
        assert handled.wait(10)
    finally:
        relay.close()


def test_each_signal_goes_to_its_own_handler_in_order_and_close_restores_the_previous_ones() -> None:
    seen: list[int] = []
    done = threading.Event()

    def record(signum: int) -> None:
        seen.append(signum)
        if len(seen) == 3:
            done.set()

    before = signal.getsignal(signal.SIGUSR2)
    relay = SignalRelay({signal.SIGUSR1: record, signal.SIGUSR2: record}).install()
    try:
        for sig in (signal.SIGUSR2, signal.SIGUSR1, signal.SIGUSR2):
            os.kill(os.getpid(), sig)
        assert done.wait(10)
        assert seen == [signal.SIGUSR2, signal.SIGUSR1, signal.SIGUSR2]
    finally:
        relay.close()
    assert signal.getsignal(signal.SIGUSR2) == before
