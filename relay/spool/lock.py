"""One relay per spool: an exclusive lock on the spool and run directories.

Input: the two directories.  Output: held ``flock`` locks on
``DIR/relay.lock`` (each file records the holder's pid), or ``SpoolLocked``
naming the pid that holds them.  The supervisor takes them before spool
recovery; its workers inherit the descriptors through fork, so the locks
are released only when the last process of the relay has exited — a
supervisor killed with SIGKILL keeps its spool until its orphaned workers
are gone too.
"""

from __future__ import annotations

import fcntl
import os

from relay.errors import SpoolError

LOCK_NAME = "relay.lock"


class SpoolLocked(SpoolError):
    """Another relay holds the spool or run directory."""


def holder_pid(path: str) -> int | None:
    """The pid recorded in a lock file, or None when unreadable."""
    try:
        with open(path, "rb") as file:
            return int(file.read(32).strip() or b"0") or None
    except (OSError, ValueError):
        return None


class InstanceLock:
    """Exclusive locks on a set of directories, held until ``release()``
    (or until every process that inherited them has exited)."""

    def __init__(self, *directories: str) -> None:
        # The same directory twice (spool inside run, say) is locked once.
        self.paths = list(dict.fromkeys(
            os.path.join(os.path.abspath(d), LOCK_NAME) for d in directories
        ))
        self._fds: list[int] = []

    def acquire(self) -> None:
        """Take every lock or none; raises SpoolLocked when one is held."""
        try:
            for path in self.paths:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    pid = holder_pid(path)
                    who = f"pid {pid}" if pid else "another process"
                    raise SpoolLocked(
                        f"another relay ({who}) is running on {os.path.dirname(path)}"
                        f" (lock {path})"
                    ) from None
                self._fds.append(fd)
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            self.release()
            raise SpoolError(f"cannot lock {path}: {exc.strerror}") from None
        except SpoolLocked:
            self.release()
            raise

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> "InstanceLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
