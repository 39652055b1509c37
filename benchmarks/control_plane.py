"""Benchmark: start-up time and memory of the local control plane. Prints figures; asserts nothing.

Usage: .venv/bin/python benchmarks/control_plane.py [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from forge_dev.controlplane import ControlPlane


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    ready_times: list[float] = []
    stop_times: list[float] = []
    memory: dict[str, list[float]] = {}
    for _ in range(args.runs):
        plane = ControlPlane()
        started = time.perf_counter()
        plane.start()
        ready_times.append(time.perf_counter() - started)
        time.sleep(5)  # let the controller-manager finish its informer sync before reading memory
        for name, pid in plane.pids().items():
            memory.setdefault(name, []).append(rss_mib(pid))
        stopping = time.perf_counter()
        plane.stop()
        stop_times.append(time.perf_counter() - stopping)
    print(f"runs: {args.runs}")
    print(f"start until /readyz (s): median {statistics.median(ready_times):.2f}, max {max(ready_times):.2f}")
    print(f"stop (s): median {statistics.median(stop_times):.2f}, max {max(stop_times):.2f}")
    total = 0.0
    for name, values in memory.items():
        total += statistics.median(values)
        print(f"RSS {name} (MiB): median {statistics.median(values):.0f}")
    print(f"RSS total (MiB): {total:.0f}")


if __name__ == "__main__":
    main()
