"""Loads one basis in a fresh process and prints JSON: first-load seconds, cached-load seconds, peak RSS increase.

Used by bench_lorweb.py (a fresh process per measurement, so peak RSS belongs to this load alone). With
``--compare`` it measures, each in its own process, the ways a basis file can be read side by side:

* ``pack``: the pack's reader (the safetensors library validates, plain reads copy the bytes out);
* ``library-view``: ``safetensors.safe_open`` / ``get_tensor`` alone (tensors are views of a shared memory map);
* ``library-copy``: the same, each tensor cloned out of the map;
* ``plain-read``: the whole file in one read into a fresh buffer (no parsing, no checks: the floor);

plus the cost of telling a replaced file from the cached one: a ``stat`` (what the cache uses), a hash of the
header, a hash of the whole file.

With ``--vs-read`` it measures the pack's first load against ``plain-read`` (one read of the whole file into a
fresh buffer: the least any reader can do), alternating the two in fresh processes, the page cache warmed first;
it prints each one's runs, their medians and the ratio (the target: at most 2).

    python benchmarks/load_probe.py --compare models/lorweb/lorweb_model.safetensors
    python benchmarks/load_probe.py --vs-read --repeats 7 models/lorweb/lorweb_model.safetensors
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

READERS = ("pack", "library-view", "library-copy", "plain-read")


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
    if reader == "plain-read":
        return {"file": plain_read(path)}
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        if reader == "library-view":
            return {key: handle.get_tensor(key) for key in handle.keys()}
        return {key: handle.get_tensor(key).clone() for key in handle.keys()}


def plain_read(path: str) -> torch.Tensor:
    """The whole file in one read into memory of its own, as the pack's reader ends up (no checks, no parsing)."""
    buffer = torch.empty(os.path.getsize(path), dtype=torch.uint8)
    with open(path, "rb") as handle:
        handle.readinto(buffer.numpy())
    return buffer


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
        runs = [probe(reader, path) for _ in range(repeats)]
        results["readers"][reader] = {k: statistics.median(run[k] for run in runs) for k in runs[0] if k != "reader"}
    results["identity"] = identity_costs(path)
    return results


def probe(reader: str, path: str) -> dict:
    """One measurement in a fresh process (its own torch start-up, empty basis cache, its own peak RSS)."""
    command = [sys.executable, __file__, "--reader", reader, path]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def versus_read(path: str, repeats: int) -> dict:
    """The pack's first load against a plain read of the same file, alternating so both see the same load."""
    plain_read(path)  # the page cache warm for both, as for any file read twice
    runs: dict[str, list[float]] = {"pack": [], "plain-read": []}
    for _ in range(repeats):
        for reader in runs:
            runs[reader].append(probe(reader, path)["first_seconds"])
    medians = {reader: statistics.median(times) for reader, times in runs.items()}
    return {
        "file_bytes": os.path.getsize(path),
        "torch_threads": torch.get_num_threads(),
        "runs_seconds": {reader: [round(t, 3) for t in times] for reader, times in runs.items()},
        "median_seconds": medians,
        "pack_vs_plain_read": medians["pack"] / medians["plain-read"],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--reader", choices=READERS, default="pack")
    parser.add_argument("--compare", action="store_true", help="all readers side by side, and identity costs")
    parser.add_argument("--vs-read", action="store_true", help="the pack's first load against a plain read")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.vs_read:
        print(json.dumps(versus_read(args.path, args.repeats), indent=1))
        return
    result = compare(args.path, args.repeats) if args.compare else measure(args.reader, args.path)
    print(json.dumps(result, indent=1 if args.compare else None))


if __name__ == "__main__":
    main()
