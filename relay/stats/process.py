"""Figures of the current process for the stats ring: RSS, CPU, open files,
uptime and time spent in garbage collection (Linux /proc)."""

from __future__ import annotations

import gc
import os
import resource
import time

_PAGE = os.sysconf("SC_PAGE_SIZE")


class ProcessFigures:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.gc_seconds = 0.0
        self._gc_started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_seconds += time.perf_counter() - self._gc_started

    def gauges(self) -> dict[str, float]:
        times = os.times()
        try:
            with open("/proc/self/statm") as file:
                rss = int(file.read().split()[1]) * _PAGE
        except OSError:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        try:
            fds = len(os.listdir("/proc/self/fd"))
        except OSError:
            fds = 0
        return {
            "rss_bytes": rss,
            "cpu_user": times.user,
            "cpu_system": times.system,
            "open_fds": fds,
            "uptime": time.monotonic() - self.started,
            "gc_seconds": self.gc_seconds,
            "pid": os.getpid(),
        }

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
