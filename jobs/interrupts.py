"""
Interrupts for long jobs: SIGINT, SIGTERM and SIGHUP all raise [`DashengInterrupted`] (a `KeyboardInterrupt`), so a
tool cleans up the same way whichever arrives and ends with one line and exit status 130; [`finish_first`] holds them
back while a short critical step (publishing files) completes.

`fault_point(name)` is where a tool reaches a dangerous moment. With `DASHENG_FAULT_POINT=name` in the environment it
writes `DASHENG_FAULT_POINT name PID` to stderr and waits there (up to `DASHENG_FAULT_PAUSE` seconds, default 30) so
that a test can send a signal at exactly that moment; otherwise it does nothing.
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

__all__ = ["INTERRUPT_SIGNALS", "DashengInterrupted", "fault_point", "finish_first", "interrupts_raise"]

INTERRUPT_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
_pending: list[int] = []
_holding = [0]


class DashengInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT (Ctrl-C), SIGTERM or SIGHUP; `signal_name` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name


def _handler(signum: int, frame: Any) -> None:
    if _holding[0]:
        _pending.append(signum)
        return
    raise DashengInterrupted(signum)


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """Within the block (main thread only), SIGINT, SIGTERM and SIGHUP raise [`DashengInterrupted`]."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _handler) for signum in INTERRUPT_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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
    if not wanted or name not in wanted.split(","):
        return
    print(f"DASHENG_FAULT_POINT {name} {os.getpid()}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + float(os.environ.get("DASHENG_FAULT_PAUSE", "30"))
    seen = len(_pending)
    while time.monotonic() < deadline and len(_pending) == seen:  # a held-back signal ends the wait too
        time.sleep(0.02)
