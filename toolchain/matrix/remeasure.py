"""`python -m toolchain.matrix.remeasure BUILD_DIR N OUT.json`: batch-1 p50 latency of the FP32
reference and every artifact of a build, measured N more times in this one process with the
build's own settings; writes {name: [p50_ms, ...]} to OUT.json. A matrix cell runs it after
its build, so that the history holds each cell's run-to-run spread."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def remeasure(folder: Path, times: int) -> dict[str, list[float]]:
    from ..bench import bench_build

    series: dict[str, list[float]] = {}
    for _ in range(times):
        for name, r in bench_build(folder, batch_sizes=(1,))["results"].items():
            series.setdefault(name, []).append(r["sweep"][0]["p50_ms"])
    return series


if __name__ == "__main__":
    from ..console import Terminal

    Terminal(quiet=True).configure()
    folder, times, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    out.write_text(json.dumps(remeasure(folder, times)) + "\n")
