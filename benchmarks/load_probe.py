"""Loads one basis in a fresh process and prints JSON: first-load seconds, cached-load seconds, peak RSS increase.

Used by bench_lorweb.py (a fresh process per measurement, so peak RSS belongs to this load alone). With
``--compare`` it measures, each in its own process, the ways a basis file can be read side by side:

* ``pack``: the pack's reader (the safetensors library validates, plain reads copy the bytes out);
* ``library-view``: ``safetensors.safe_open`` / ``get_tensor`` alone (tensors are views of a shared memory map);
* ``library-copy``: the same, each tensor cloned out of the map;

plus the cost of telling a replaced file from the cached one: a ``stat`` (what the cache uses), a hash of the
header, a hash of the whole file.

    python benchmarks/load_probe.py --compare models/lorweb/lorweb_model.safetensors
"""

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).absolute().parents[1]))

import torch  # noqa: E402

import lorweb_ops  # noqa: E402

READERS = ("pack", "library-view", "library-copy")


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


def anonymous_rss() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


def read_with(reader: str, path: str) -> dict:
    if reader == "pack":
        return lorweb_ops.load_basis(path).weights
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        if reader == "library-view":
            return {key: handle.get_tensor(key) for key in handle.keys()}
        return {key: handle.get_tensor(key).clone() for key in handle.keys()}


def measure(reader: str, path: str) -> dict:
    # torch's first operations set up its CPU libraries (a fixed cost, not the load's): do that before measuring
    torch.isfinite(torch.zeros(64, dtype=torch.float16)).all()
    before, before_anonymous = current_rss(), anonymous_rss()
    reset_peak_rss()
    start = time.perf_counter()
    loaded = read_with(reader, path)
    first = time.perf_counter() - start
    result = {
        "reader": reader,
        "first_seconds": first,
        "peak_rss_increase": peak_rss() - before,
        "rss_after": current_rss() - before,
        "anonymous_after": anonymous_rss() - before_anonymous,
    }
    if reader == "pack":
        start = time.perf_counter()
        lorweb_ops.load_basis(path)
        result["cached_seconds"] = time.perf_counter() - start
    del loaded
    return result


def identity_costs(path: str, repeats: int = 5) -> dict:
    def median(run) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def header_hash():
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            hashlib.sha256(handle.read(length)).digest()

    def file_hash():
        with open(path, "rb") as handle:
            hashlib.file_digest(handle, "sha256")

    return {
        "stat_seconds": median(lambda: lorweb_ops.basis.file_identity(path)),
        "header_sha256_seconds": median(header_hash),
        "file_sha256_seconds": median(file_hash),
    }


def compare(path: str, repeats: int) -> dict:
    """Every reader in fresh processes (median of ``repeats``), and the identity costs."""
    results = {"file_bytes": os.path.getsize(path), "readers": {}}
    for reader in READERS:
        runs = [
            json.loads(
                subprocess.run(
                    [sys.executable, __file__, "--reader", reader, path], capture_output=True, text=True, check=True
                ).stdout
            )
            for _ in range(repeats)
        ]
        results["readers"][reader] = {k: statistics.median(run[k] for run in runs) for k in runs[0] if k != "reader"}
    results["identity"] = identity_costs(path)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--reader", choices=READERS, default="pack")
    parser.add_argument("--compare", action="store_true", help="all readers side by side, and identity costs")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    result = compare(args.path, args.repeats) if args.compare else measure(args.reader, args.path)
    print(json.dumps(result, indent=1 if args.compare else None))


if __name__ == "__main__":
    main()
