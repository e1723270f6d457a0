"""Loads one basis in a fresh process and prints JSON: first-load seconds, cached-load seconds, peak RSS increase.

Used by bench_lorweb.py (a fresh process per measurement, so peak RSS belongs to this load alone).
"""

import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).absolute().parents[1]))

import torch  # noqa: E402

import lorweb_ops  # noqa: E402


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM), so the peak seen next is this load's."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # kB


def main(path: str) -> None:
    # torch's first operations set up its CPU libraries (a fixed cost, not the load's): do that before measuring
    torch.isfinite(torch.zeros(64, dtype=torch.float16)).all()
    before = current_rss()
    reset_peak_rss()
    start = time.perf_counter()
    lorweb_ops.load_basis(path)
    first = time.perf_counter() - start
    peak = peak_rss()
    start = time.perf_counter()
    lorweb_ops.load_basis(path)
    cached = time.perf_counter() - start
    print(json.dumps({"first_seconds": first, "cached_seconds": cached, "peak_rss_increase": peak - before}))


if __name__ == "__main__":
    main(sys.argv[1])
