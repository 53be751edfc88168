#!/usr/bin/env python3
"""Run ``nbs ARGS`` (e.g. ``serve ...``) in this process with cProfile on every thread, and
write the merged profile to OUT (a pstats file) when it exits.

The clock is each thread's CPU time (``time.thread_time``): on a machine where CPU is the
limit, that is where the time goes; a thread blocked on a lock or a socket costs nothing.
``--wall`` uses the wall clock instead (cProfile's default), which shows the waits.

cProfile profiles only the thread that enables it, and ``nbs serve`` does its work on
threads (sessions, storage workers, the replication engine's fan-out pool): so every thread
started here runs its target under a profiler of its own, and the profiles are added up at
exit.  Threads still running then (daemons) are included as far as they got.  Expect the
profiled server to be about twice as slow; the profile tells where the time goes, not how
much there is.

    python bench/profile_serve.py [--wall] OUT.pstats serve --listen 127.0.0.1:0 --data-dir DIR
    python -c "import pstats; pstats.Stats('OUT.pstats').sort_stats('tottime').print_stats(30)"

bench/replication.py --profile-engine OUT runs its engine this way.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_profiles: list[cProfile.Profile] = []
_lock = threading.Lock()
_thread_run = threading.Thread.run
_clock: Callable[[], float] = time.thread_time


def _profiled_run(self: threading.Thread) -> None:
    profile = cProfile.Profile(_clock)
    with _lock:
        _profiles.append(profile)
    profile.enable()
    try:
        _thread_run(self)
    finally:
        profile.disable()


def main() -> int:
    global _clock  # set once, before any thread starts
    args = sys.argv[1:]
    if args[:1] == ["--wall"]:
        _clock = time.perf_counter
        args = args[1:]
    if len(args) < 2:
        print("usage: profile_serve.py [--wall] OUT.pstats NBS-ARGS...", file=sys.stderr)
        return 2
    out = Path(args[0])
    threading.Thread.run = _profiled_run  # type: ignore[method-assign]
    from backend.cli import main as nbs_main  # noqa: PLC0415 - after the patch above

    own = cProfile.Profile(_clock)
    own.enable()
    try:
        return nbs_main(args[1:])
    finally:
        own.disable()
        with _lock:
            profiles = [own, *_profiles]
        stats = pstats.Stats(profiles[0])
        # A thread still running (a daemon) adds what it has so far.
        stats.add(*profiles[1:])
        stats.dump_stats(out)


if __name__ == "__main__":
    sys.exit(main())
