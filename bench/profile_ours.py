"""Runs ``renewer`` under cProfile in every certificate's worker thread, not only the main one.

    python bench/profile_ours.py STATS_FILE run --config F --force

cProfile follows one thread; the job issues each certificate in a worker thread
(``renewal.concurrency``), so each ``renew_certificate`` call gets a profiler of its own
and all of them are merged with the main thread's into STATS_FILE (pstats format).
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import threading

import renewer.run as run_module
from renewer.__main__ import main


def _profiled_main(stats_file: str, argv: list[str]) -> int:
    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()
    original = run_module.renew_certificate

    def renew_profiled(ctx: run_module.RunContext, cert: object) -> object:
        profile = cProfile.Profile()
        profile.enable()
        try:
            return original(ctx, cert)  # type: ignore[arg-type]
        finally:
            profile.disable()
            with lock:
                profiles.append(profile)

    run_module.renew_certificate = renew_profiled  # type: ignore[assignment]
    main_profile = cProfile.Profile()
    main_profile.enable()
    try:
        code = main(argv)
    finally:
        main_profile.disable()
    stats = pstats.Stats(main_profile)
    for profile in profiles:
        stats.add(profile)
    stats.dump_stats(stats_file)
    return code


if __name__ == "__main__":
    sys.exit(_profiled_main(sys.argv[1], sys.argv[2:]))
