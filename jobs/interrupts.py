"""
Interrupts for long jobs: SIGINT, SIGTERM and SIGHUP all raise [`DashengInterrupted`] (a `KeyboardInterrupt`), so a
tool cleans up the same way whichever arrives and ends with one line and exit status 130; [`finish_first`] holds them
back while a short critical step (publishing files) completes.

`fault_point(name)` is where a tool reaches a dangerous moment. With `DASHENG_FAULT_POINT=name` in the environment
(or `name:N`, for its N-th arrival there only) it writes `DASHENG_FAULT_POINT name PID` to stderr and waits there
(up to `DASHENG_FAULT_PAUSE` seconds, default 30) so that a test can send a signal at exactly that moment; otherwise
it does nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = [
    "INTERRUPT_SIGNALS",
    "DashengInterrupted",
    "fault_point",
    "finish_first",
    "interrupts_raise",
    "received_interrupt",
]

INTERRUPT_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
_pending: list[int] = []
_received: list[int] = []  # since the last `interrupts_raise` block began
_holding = [0]
_raised = [0]  # interrupts the handler has raised, in this process
_arrivals: dict[str, int] = {}


class DashengInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT (Ctrl-C), SIGTERM or SIGHUP; `signal_name` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name


def _handler(signum: int, frame: Any) -> None:
    _received.append(signum)
    if _holding[0]:
        _pending.append(signum)
        return
    _raised[0] += 1
    raise DashengInterrupted(signum)


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """
    Within the block (main thread only), SIGINT, SIGTERM and SIGHUP raise [`DashengInterrupted`]. One raised where
    Python cannot raise (in a finaliser, `__del__`) would be printed as "Exception ignored" and lost: the signal is
    sent again a moment later (from a thread; sent at once, it would land in the same place), and if the block ends
    first, it raises as the block ends.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    del _received[:]
    previous = {signum: signal.signal(signum, _handler) for signum in INTERRUPT_SIGNALS}
    previous_hook = sys.unraisablehook
    lost: list[tuple[int, int]] = []  # (signal, interrupts raised by then) of each swallowed interrupt
    timers: list[threading.Timer] = []

    def send_again(signum: int, raised: int) -> None:
        if _raised[0] == raised:  # none raised since it was lost
            os.kill(os.getpid(), signum)

    def redeliver(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, DashengInterrupted):
            lost.append((unraisable.exc_value.signum, _raised[0]))
            timers.append(threading.Timer(0.02, send_again, lost[-1]))
            timers[-1].daemon = True
            timers[-1].start()
        else:
            previous_hook(unraisable)

    sys.unraisablehook = redeliver
    propagating = False
    try:
        yield
    except BaseException:
        propagating = True
        raise
    finally:
        sys.unraisablehook = previous_hook
        try:
            for timer in timers:
                timer.cancel()
            for timer in timers:
                timer.join()  # one that fired meanwhile raises here
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        unanswered = [signum for signum, raised in lost if _raised[0] == raised]
        if unanswered and not propagating:
            raise DashengInterrupted(unanswered[0])


def received_interrupt() -> str | None:
    """The name of the first interrupt signal received in the latest [`interrupts_raise`] block, or None: for a tool
    whose run ended in another error that the interrupt caused (its worker processes, stopped by the same signal)."""
    return signal.Signals(_received[0]).name if _received else None


@contextlib.contextmanager
def finish_first() -> Iterator[list[int]]:
    """
    Signals that arrive within the block are held back until it ends, then raised as [`DashengInterrupted`]; the
    list yielded holds them (for a message saying the step finished anyway).
    """
    _holding[0] += 1
    start = len(_pending)
    try:
        yield _pending
    finally:
        _holding[0] -= 1
        if not _holding[0] and len(_pending) > start:
            signum = _pending[start]
            del _pending[start:]
            raise DashengInterrupted(signum)


def fault_point(name: str) -> None:
    """Announce `name` and wait there when the tests ask for it (see the module docstring); else nothing."""
    wanted = os.environ.get("DASHENG_FAULT_POINT")
    if not wanted:
        return
    _arrivals[name] = _arrivals.get(name, 0) + 1
    if name not in wanted.split(",") and f"{name}:{_arrivals[name]}" not in wanted.split(","):
        return
    print(f"DASHENG_FAULT_POINT {name} {os.getpid()}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + float(os.environ.get("DASHENG_FAULT_PAUSE", "30"))
    seen = len(_pending)
    while time.monotonic() < deadline and len(_pending) == seen:  # a held-back signal ends the wait too
        time.sleep(0.02)
