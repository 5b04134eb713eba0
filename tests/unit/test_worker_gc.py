"""The worker's garbage collector settings (relay.worker.quiet_gc)."""

from __future__ import annotations

import subprocess
import sys

from relay.worker import GC_THRESHOLDS


def test_quiet_gc_freezes_what_exists_and_raises_the_thresholds():
    # In a child: the test process's own collector is left alone.
    script = (
        "import gc, relay.worker as w\n"
        "before = gc.get_freeze_count()\n"
        "w.quiet_gc()\n"
        "print(before, gc.get_freeze_count(), *gc.get_threshold())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, timeout=60)
    before, frozen, *thresholds = map(int, done.stdout.split())
    assert before == 0 and frozen > 1000  # the imported modules' objects
    assert tuple(thresholds) == GC_THRESHOLDS and GC_THRESHOLDS[0] >= 10 * 700  # CPython's 700
