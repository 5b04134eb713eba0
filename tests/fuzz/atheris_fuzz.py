"""The long fuzz run: one target of tests/fuzz/targets.py under atheris (libFuzzer).

    python tests/fuzz/atheris_fuzz.py TARGET SECONDS [WORKDIR] [libFuzzer flags...]

(scripts/fuzz wraps this.)  The relay's Python code and the targets are
instrumented for coverage; the checked-in corpus (tests/fuzz/corpus/TARGET)
seeds the run and stays read-only; new interesting inputs go to
WORKDIR/corpus and a failing input to WORKDIR/crash-*.  A failed property
is an uncaught exception: libFuzzer stops, prints it and exits non-zero.

relay._fast (Cython, built with the system C compiler) is not instrumented:
that needs a clang -fsanitize=fuzzer build.  Coverage is steered by relay._ref,
which the dkim target runs on every input beside _fast.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # targets, support


def main(argv: list[str]) -> None:
    import atheris

    if len(argv) < 3:
        sys.exit(__doc__)
    target, seconds = argv[1], int(argv[2])
    workdir = argv[3] if len(argv) > 3 else os.path.join("var", "fuzz", target)
    corpus = os.path.join(workdir, "corpus")
    os.makedirs(corpus, exist_ok=True)
    with atheris.instrument_imports(include=["relay", "targets"]):
        import targets
    if target not in targets.TARGETS:
        sys.exit(f"unknown target {target!r}; one of {', '.join(targets.TARGETS)}")
    run = targets.TARGETS[target]
    flags = [
        f"-max_total_time={seconds}",
        "-max_len=4096",
        "-rss_limit_mb=1024",
        "-print_final_stats=1",
        f"-artifact_prefix={workdir}{os.sep}",
        *argv[4:],
        corpus,
        os.path.join(HERE, "corpus", target),
    ]
    atheris.Setup([argv[0], *flags], run)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
