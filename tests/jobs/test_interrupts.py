"""Interrupts raised where Python cannot raise them (a finaliser) still stop the run, and are remembered."""

from __future__ import annotations

import os
import signal
import time

import pytest
from dasheng_hf.jobs.interrupts import DashengInterrupted, interrupts_raise, received_interrupt


class _FinalisedDuringTheSignal:
    """An object whose finaliser runs when the signal arrives (as pyarrow's writers' `__del__` can)."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises inside `__del__`, where the exception is lost
        time.sleep(0.05)


def test_an_interrupt_raised_inside_a_finaliser_is_delivered_again_and_stops_the_run(capfd):
    reached_the_end, before = False, signal.getsignal(signal.SIGTERM)
    with pytest.raises(DashengInterrupted) as raised:
        with interrupts_raise():
            _FinalisedDuringTheSignal()  # made and dropped: its finaliser runs here
            for _ in range(200):
                time.sleep(0.01)
            reached_the_end = True
    assert raised.value.signal_name == "SIGTERM" and not reached_the_end
    assert "Exception ignored" not in capfd.readouterr().err
    assert received_interrupt() == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_received_interrupt_is_forgotten_when_the_next_block_begins():
    with pytest.raises(DashengInterrupted):
        with interrupts_raise():
            signal.raise_signal(signal.SIGINT)
    assert received_interrupt() == "SIGINT"
    with interrupts_raise():
        assert received_interrupt() is None


def test_an_interrupt_lost_in_a_finaliser_just_before_the_block_ends_raises_as_it_ends():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(DashengInterrupted) as raised:
        with interrupts_raise():
            _FinalisedDuringTheSignal()  # the block ends before the signal is sent again
    assert raised.value.signal_name == "SIGTERM" and signal.getsignal(signal.SIGTERM) is before
    stray = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stray.append(signum))
    try:
        time.sleep(0.1)  # the signal is not sent again after the block
    finally:
        signal.signal(signal.SIGTERM, before)
    assert stray == []
