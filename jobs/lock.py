"""A lock file that makes one run the owner of an output folder: created with its content in one step (a hard link),
naming the owner's process id and host; a lock whose process is dead is taken over with a warning."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["LOCK_NAME", "DashengLockError", "DashengOutputLock"]

LOCK_NAME = ".dasheng-run.lock"


class DashengLockError(RuntimeError):
    """The folder is owned by another run (or its lock cannot be read); the message says which and what to do."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class DashengOutputLock:
    """
    `with DashengOutputLock(folder, "dasheng-pretrain"):` owns `folder/.dasheng-run.lock` for the block.

    Another live run on the same host, or any run on another host (whose process cannot be checked), is refused with
    [`DashengLockError`]; the lock of a dead process on this host is taken over, and `warn` is called with one line.
    """

    def __init__(self, folder: str | os.PathLike, command: str, warn: Any = None):
        self.path = Path(folder) / LOCK_NAME
        self.command = command
        self.warn = warn or (lambda message: print(f"{command}: warning: {message}", file=sys.stderr))
        self.token = uuid.uuid4().hex
        self.held = False

    def _owner(self) -> dict[str, Any] | None:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> DashengOutputLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "token": self.token,
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        temporary = self.path.with_name(f"{LOCK_NAME}.{self.token}")
        temporary.write_text(json.dumps(me))
        try:
            for _ in range(3):
                try:
                    os.link(temporary, self.path)  # fails if a lock exists: created whole, or not at all
                    self.held = True
                    return self
                except FileExistsError:
                    pass
                owner = self._owner()
                if owner is None:  # released meanwhile
                    continue
                if not owner:
                    raise DashengLockError(
                        f"{self.path} is not a lock file this tool wrote; if no run uses {self.path.parent}, delete it."
                    )
                started = f"{owner.get('command')}, started {owner.get('started')}"
                where = f"process {owner['pid']} on {owner.get('host')} ({started})"
                if owner.get("host") != me["host"]:
                    raise DashengLockError(
                        f"{self.path.parent} is in use by {where}; one run per output folder. If that run has ended, "
                        f"delete {self.path}."
                    )
                if _alive(owner["pid"]) and owner["pid"] != me["pid"]:
                    raise DashengLockError(
                        f"{self.path.parent} is in use by {where}; one run per output folder: wait for it, stop it, "
                        f"or pass another output folder."
                    )
                stale = self.path.with_name(f"{LOCK_NAME}.stale-{owner['pid']}-{self.token}")
                try:
                    os.rename(self.path, stale)  # only one of several runs taking over gets it
                except FileNotFoundError:
                    continue
                stale.unlink(missing_ok=True)
                self.warn(f"took over {self.path} from {where}, which is no longer running.")
            raise DashengLockError(f"{self.path}: could not take the lock; another run keeps taking it.")
        finally:
            temporary.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            owner = self._owner()
            if owner and owner.get("token") == self.token:
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> DashengOutputLock:
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()
