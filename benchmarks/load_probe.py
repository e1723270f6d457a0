"""Loads one basis in a fresh process and prints JSON: first-load seconds, cached-load seconds, peak RSS increase.

Used by bench_lorweb.py (a fresh process per measurement, so peak RSS belongs to this load alone).
"""

import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).absolute().parents[1]))

import lorweb_ops  # noqa: E402


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def main(path: str) -> None:
    before = current_rss()
    start = time.perf_counter()
    lorweb_ops.load_basis(path)
    first = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    start = time.perf_counter()
    lorweb_ops.load_basis(path)
    cached = time.perf_counter() - start
    print(json.dumps({"first_seconds": first, "cached_seconds": cached, "peak_rss_increase": peak - before}))


if __name__ == "__main__":
    main(sys.argv[1])
