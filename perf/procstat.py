"""What a process tree costs, read from /proc: CPU seconds and resident memory.

Input: process ids (a root such as the relay's supervisor or Postfix's
master, whose children are found through /proc).  Output: CPU seconds
(user + system) of the live tree plus what its reaped children used, the
current RSS and the peak RSS (VmHWM) of each process.

Why reaped children count: Postfix's smtp(8)/smtpd(8) processes come and go;
the kernel adds what an exited child used to its parent's cutime/cstime
once the parent waits for it, so root.cutime + live tree covers all of it.
"""

from __future__ import annotations

import os

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", "rb") as file:
        data = file.read().decode()
    # The command name (field 2) may hold spaces and parentheses: split after it.
    return data[data.rindex(")") + 2:].split()


def cpu_seconds(pid: int, *, reaped_children: bool = False) -> float:
    """utime + stime of ``pid`` (plus cutime + cstime when asked), in seconds."""
    try:
        fields = _stat_fields(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def _status(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/PID/status, in bytes (0 when gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as file:
            for line in file:
                if line.startswith(key.encode() + b":"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def rss_bytes(pid: int) -> int:
    return _status(pid, "VmRSS")


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages divided among their sharers, so a
    sum over many processes (Postfix's) does not count libraries N times."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as file:
            for line in file:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def peak_rss_bytes(pid: int) -> int:
    """VmHWM: the most the process ever had resident."""
    return _status(pid, "VmHWM")


def children(pid: int) -> list[int]:
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as file:
                found += [int(child) for child in file.read().split()]
        except FileNotFoundError:
            pass
    return found


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that are alive now."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children(current)
    return found


def tree_cpu_seconds(root: int) -> float:
    """CPU of a whole tree: every live process, and the root's reaped children.

    Grandchildren reaped by a live child are in that child's cutime: counted
    too, as each live process contributes its reaped children.
    """
    return sum(cpu_seconds(pid, reaped_children=True) for pid in tree(root))


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, PermissionError):
        return 0
