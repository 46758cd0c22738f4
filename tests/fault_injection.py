"""
Fault injection for the interruption tests: a tool's `main` run in a real child process, stopped by a real signal at
the moment the tool announces (`dasheng_hf.jobs.interrupts.fault_point`, enabled by `DASHENG_FAULT_POINT`).

Children are forked from a multiprocessing fork server that has imported the tools once, so a run starts in
milliseconds instead of re-importing torch and transformers; each is still its own process with its own signal
handlers, file descriptors and exit status.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

__all__ = ["SIGNALS", "FaultRun", "start"]

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["dasheng_hf.audio.make_shards", "dasheng_hf.pretraining.trainer"])


def _run(module: str, argv: list[str], log: str, environment: dict[str, str]) -> None:
    os.setpgrp()  # its own process group (with its workers), as a command started from a shell
    os.environ.update(environment)
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    import torch

    torch.set_num_threads(1)
    importlib.import_module(module).main(argv)


class FaultRun:
    """A tool running in a child process; its stdout and stderr go to `log`."""

    def __init__(self, module: str, argv: list[str], log: Path, point: str | None, **environment: str):
        self.log = Path(log)
        self.log.write_text("")
        environment = {"DASHENG_FAULT_PAUSE": "60", **environment}
        if point:
            environment["DASHENG_FAULT_POINT"] = point
        self.process = _CONTEXT.Process(target=_run, args=(module, argv, str(self.log), environment))
        self.process.start()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, marker: str, timeout: float = 120) -> bool:
        """Whether `marker` appeared in the output before the process ended (or `timeout` passed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.text():
                return True
            if not self.process.is_alive():
                return marker in self.text()
            time.sleep(0.02)
        return False

    def stop_at(self, point: str, signum: int, group: bool = False) -> int:
        """Wait for the fault point, send `signum` (to the process group with `group`), return the exit status."""
        assert self.wait_for(f"DASHENG_FAULT_POINT {point} "), f"never reached {point}:\n{self.text()[-3000:]}"
        if group:
            os.killpg(os.getpgid(self.process.pid), signum)
        else:
            os.kill(self.process.pid, signum)
        return self.finish()

    def finish(self, timeout: float = 120) -> int:
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
            raise AssertionError(f"still running after {timeout} s:\n{self.text()[-3000:]}")
        return self.process.exitcode


def start(module: str, argv: list[str], log: Path, point: str | None = None, **environment: str) -> FaultRun:
    return FaultRun(module, argv, log, point, **environment)


SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGHUP": signal.SIGHUP, "SIGKILL": signal.SIGKILL}
