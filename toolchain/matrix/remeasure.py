"""`python -m toolchain.matrix.remeasure BUILD_DIR N OUT.json`: batch-1 p50 latency of the FP32
reference and every artifact of a build, measured N times in this one process with the build's
own settings, and how busy the machine was meanwhile. Writes {"latency": {name: [p50_ms, ...]},
"others_cpu": [share, ...]} to OUT.json. A matrix cell runs it after its build, so that the
history holds each cell's run-to-run spread, and knows which timings were taken on a quiet machine.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path


def remeasure(folder: Path, times: int) -> dict:
    from toolchain.bench import bench_build

    series: dict[str, list[float]] = {}
    others = []
    for _ in range(times):
        with OthersCpu() as load:
            results = bench_build(folder, batch_sizes=(1,))["results"]
        others.append(load.share)
        for name, r in results.items():
            series.setdefault(name, []).append(r["sweep"][0]["p50_ms"])
    return {"latency": series, "others_cpu": others}


class OthersCpu:
    """The share of the machine's CPU time (all cores) that other processes used while the block
    ran: the system's busy time from /proc/stat less this process's own. None off Linux."""

    def __enter__(self) -> "OthersCpu":
        self.share = None
        self._start = (_busy_seconds(), _own_seconds(), time.monotonic())
        return self

    def __exit__(self, *exc) -> None:
        busy, own, t = self._start
        now_busy = _busy_seconds()
        if busy is None or now_busy is None:
            return
        wall = time.monotonic() - t
        self.share = round(
            max(0.0, (now_busy - busy) - (_own_seconds() - own)) / (wall * (os.cpu_count() or 1)), 3
        )


def _busy_seconds() -> float | None:
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    from toolchain.reporting.console import Terminal

    Terminal(quiet=True).configure()
    folder, times, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    out.write_text(json.dumps(remeasure(folder, times)) + "\n")
